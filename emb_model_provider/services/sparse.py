"""Sparse (SPLADE) vectors without HTTP or torch: the shared path of every task
(``EmbeddingService.run(task="sparse")``: cache, tokenisation, token limits, the dynamic
batcher), then each vocabulary-wide row cut to its non-zero terms.

A vector is its non-zero terms, indices ascending, with their weights: Qdrant's and Pinecone's
``{"indices", "values"}`` on /v1/embeddings, TEI's ``[{"index", "value"}]`` on /embed_sparse.
``top_k`` (the request's ``dimensions``) keeps the k largest weights, as the library's
``max_active_dims`` does. A CSR model's rows are its autoencoder's latents, whatever the k (so the
batcher merges and the cache shares requests of different k): ``vectors_of`` applies the
request's k there (``LatentSparseEncoder.sparsify``), as ``encode(max_active_dims=k)`` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
import orjson

from emb_model_provider.core.errors import InvalidRequest
from emb_model_provider.core.kinds import TruncationSide
from emb_model_provider.encoders.base import Encoder, EncoderInput, LatentSparseEncoder, Vectors
from emb_model_provider.registry import ModelSpec

if TYPE_CHECKING:  # the service imports this module to route sparse models here
    from emb_model_provider.services.embedding_service import EmbeddingService, TokenCap


@dataclass(frozen=True)
class SparseVector:
    """The non-zero terms of one vector: vocabulary indices, ascending, and their weights."""

    indices: npt.NDArray[np.int64]
    values: npt.NDArray[np.float32]


@dataclass(frozen=True)
class SparseResult:
    vectors: list[SparseVector]
    prompt_tokens: int
    model: str


def refuse_encoding(spec: ModelSpec, encoding_format: str | None) -> None:
    """Sparse vectors are written as JSON numbers only: a base64 or integer form of a
    vocabulary-wide vector would be mostly zeros, and clients that store sparse vectors take
    (indices, values) pairs."""
    if encoding_format not in (None, "float"):
        raise InvalidRequest(
            f"The model `{spec.name}` gives sparse vectors ({{indices, values}}), written as "
            f"JSON numbers only: encoding_format {encoding_format} is not available for it; "
            "send encoding_format float (the OpenAI SDK asks for base64 unless told).",
            param="encoding_format",
            code="unsupported_encoding_format",
        )


def non_zero(rows: Vectors, top_k: int | None) -> list[SparseVector]:
    """Each row's non-zero terms; with ``top_k`` only the k largest (ties: the lower index),
    as ``select_max_active_dims`` keeps them."""
    vectors: list[SparseVector] = []
    for full in rows:
        row = full
        if top_k is not None and top_k < row.shape[0]:
            kept = np.argsort(-row, kind="stable")[:top_k]
            mask = np.zeros(row.shape[0], dtype=bool)
            mask[kept] = True
            row = np.where(mask, row, np.float32(0))
        indices = np.flatnonzero(row)
        vectors.append(SparseVector(indices.astype(np.int64), row[indices].astype(np.float32)))
    return vectors


def vectors_of(encoder: Encoder, rows: Vectors, top_k: int | None) -> list[SparseVector]:
    """``rows`` as ``encoder`` computed them, made the sparse vectors of ``top_k``."""
    if isinstance(encoder, LatentSparseEncoder):
        return non_zero(encoder.sparsify(rows, top_k), None)
    return non_zero(rows, top_k)


def check_top_k(name: str, encoder: Encoder, top_k: int | None) -> None:
    """A CSR model's top-k is its autoencoder's: at most its latents (the library's
    ``torch.topk`` fails above that). A SPLADE model takes any k."""
    if (
        isinstance(encoder, LatentSparseEncoder)
        and top_k is not None
        and not 1 <= top_k <= encoder.dimensions
    ):
        raise InvalidRequest(
            f"Invalid value for 'dimensions': {top_k}. The model `{name}` keeps the top-k of "
            f"its {encoder.dimensions} latents; ask for 1 to {encoder.dimensions}.",
            param="dimensions",
        )


async def sparse_vectors(
    service: EmbeddingService,
    spec: ModelSpec,
    data: Sequence[EncoderInput],
    *,
    top_k: int | None = None,
    prompt_name: str | None = None,
    truncate: bool | None = None,
    background: bool = False,
    truncation_side: TruncationSide | None = None,
    max_tokens: TokenCap | None = None,
) -> SparseResult:
    """The sparse vectors of ``data`` (texts) from ``spec``'s SPLADE model."""
    computed = await service.run(
        spec,
        data,
        task="sparse",
        background=background,
        prompt_name=prompt_name,
        truncate=truncate,
        truncation_side=truncation_side,
        max_tokens=max_tokens,
        check=lambda encoder: check_top_k(spec.name, encoder, top_k),
    )
    vectors = vectors_of(computed.encoder, computed.rows, top_k)
    return SparseResult(vectors, computed.prompt_tokens, spec.name)


def render_openai(result: SparseResult) -> bytes:
    """The CreateEmbeddingResponse body with ``{"indices", "values"}`` embeddings."""
    body = {
        "object": "list",
        "data": [
            {
                "object": "embedding",
                "index": index,
                "embedding": {"indices": vector.indices, "values": vector.values},
            }
            for index, vector in enumerate(result.vectors)
        ],
        "model": result.model,
        "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
    }
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)


def render_tei(result: SparseResult) -> bytes:
    """TEI's /embed_sparse answer: per input, its terms as ``{"index", "value"}`` objects."""
    body = [
        [
            {"index": index, "value": value}
            for index, value in zip(vector.indices.tolist(), vector.values.tolist(), strict=True)
        ]
        for vector in result.vectors
    ]
    return orjson.dumps(body)
