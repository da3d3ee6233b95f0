"""What the job runner needs from an engine: embed one chunk of records, keeping bad ones apart."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from emb_model_provider.core.quantization import IntVectors
from emb_model_provider.core.vectors import Vectors
from emb_model_provider.offline.records import ModelKind, Record
from emb_model_provider.services.sparse import SparseVector


class BulkError(Exception):
    """A job that cannot go on (no such model, the server refuses the key): one line for users.
    The parts finished so far stay on disk, so a rerun resumes."""


@dataclass
class ChunkResult:
    """Vectors of the usable inputs of a chunk, in input order, and why the others failed."""

    ids: list[str]
    #: float32, or int8/uint8 with ``--encoding-format`` (``offline/quantized.py``); a sparse
    #: model's (indices, values) pairs, as the server gives them.
    vectors: Vectors | IntVectors | list[SparseVector]
    tokens: int
    #: (id, reason) of each input that could not be embedded.
    errors: list[tuple[str, str]] = field(default_factory=list)


class Embedder(Protocol):
    #: The model's canonical name (written to the output's metadata).
    model: str
    kind: ModelKind
    #: Length of the vectors (``--dimensions`` when given); a sparse model's vocabulary size
    #: (its indices fall below it).
    dimensions: int
    #: A sparse (SPLADE) model: ``ChunkResult.vectors`` holds ``SparseVector`` pairs.
    sparse: bool
    #: A sparse model's top-k (``--dimensions``, else the models file's): its vectors keep the k
    #: largest weights, as the server's ``dimensions``; None keeps every non-zero weight.
    top_k: int | None

    def embed(self, records: Sequence[Record]) -> ChunkResult: ...

    def close(self) -> None: ...


def unit_prefix(vectors: Vectors, dimensions: int | None, *, normalize: bool) -> Vectors:
    """What the server returns (services/embedding_service.py): the first ``dimensions``
    components, then L2-normalised when the model's entry says so."""
    if dimensions is not None:
        vectors = vectors[:, :dimensions]
    if normalize:
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = vectors / np.maximum(norms, 1e-12)
    result: Vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    return result


def empty_vectors(dimensions: int) -> Vectors:
    result: Vectors = np.zeros((0, dimensions), dtype=np.float32)
    return result


def dense(result: ChunkResult) -> Vectors | IntVectors:
    """``result``'s vectors of a dense model (a sparse one is refused before any is made)."""
    if isinstance(result.vectors, list):
        raise BulkError("sparse vectors where dense ones were expected")
    return result.vectors
