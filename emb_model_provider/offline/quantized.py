"""``embed --encoding-format int8|uint8|binary|ubinary``: the vectors of any engine, quantised as
the server quantises them (``core/quantization.py``): the int8/uint8 ranges come from the
model's calibration set (the built-in one, or the models file's ``calibration_texts``), embedded
once by the same engine, cut and normalised as the job's vectors; never from the job's inputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from emb_model_provider.core.kinds import Quantization
from emb_model_provider.core.quantization import Ranges, quantize, ranges_of
from emb_model_provider.offline.base import BulkError, ChunkResult, Embedder, dense
from emb_model_provider.offline.records import ModelKind, Record


class QuantizingEmbedder:
    """``inner``'s vectors as integers; ``dimensions`` is the integer vectors' length (binary:
    ``ceil(dimensions / 8)`` bytes)."""

    def __init__(
        self, inner: Embedder, precision: Quantization, calibration: Sequence[str]
    ) -> None:
        if inner.sparse:  # as the server's encoding_format (services/sparse.refuse_encoding)
            raise BulkError(
                f"{inner.model} gives sparse vectors ({{indices, values}}), written as floats "
                f"only: --encoding-format {precision} is not available for it"
            )
        self._inner = inner
        self.sparse = False
        self.top_k: int | None = None
        self.model: str = inner.model
        self.kind: ModelKind = inner.kind
        self.precision: Quantization = precision
        self._ranges: Ranges | None = None
        if precision in ("int8", "uint8"):
            if inner.kind == "image":
                raise BulkError(
                    f"{inner.model} takes images only: it has no int8/uint8 calibration; "
                    "use --encoding-format binary or ubinary"
                )
            records = [
                Record(id=str(index), value=text, kind="text")
                for index, text in enumerate(calibration)
            ]
            result = inner.embed(records)
            if result.errors:
                raise BulkError(f"calibration text {result.errors[0][0]}: {result.errors[0][1]}")
            self._ranges = ranges_of(dense(result).astype(np.float32, copy=False))
        binary = precision in ("binary", "ubinary")
        self.dimensions = (inner.dimensions + 7) // 8 if binary else inner.dimensions

    def embed(self, records: Sequence[Record]) -> ChunkResult:
        result = self._inner.embed(records)
        return ChunkResult(
            ids=result.ids,
            vectors=quantize(
                dense(result).astype(np.float32, copy=False), self.precision, self._ranges
            ),
            tokens=result.tokens,
            errors=result.errors,
        )

    def close(self) -> None:
        self._inner.close()
