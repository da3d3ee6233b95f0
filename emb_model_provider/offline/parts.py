"""Files of a job: one Parquet part per finished chunk, a manifest, the atomic final output.

``<output>.parts/`` holds ``manifest.json`` (what the job is: input fingerprint, model,
dimensions, chunk size) and ``part-NNNNNN.parquet`` for each finished chunk. A part is written
to a temporary name and renamed, so it exists whole or not at all: a killed run leaves only
finished parts (and perhaps a ``.tmp`` that is overwritten). The final output is assembled from
the parts the same way (temporary file, then rename), then the parts folder is removed.

Output formats, by the output's suffix:

- ``.parquet``: columns ``id`` (string) and ``embedding`` (fixed-size list of float32), with
  ``model`` and ``dimensions`` in the schema metadata; a sparse model's vectors as two list
  columns, ``indices`` (int32, ascending) and ``values`` (float32), the metadata adding
  ``vectors: sparse`` and ``top_k`` (the vocabulary's size is ``dimensions``);
- ``.npy``: a float32 array (rows x dimensions) and ``<stem>.ids.jsonl`` (one JSON id per line);
  dense vectors only (sparse ones are ragged).

Inputs that failed go to ``<output>.errors.jsonl``: ``{"id": .., "error": ..}`` per line.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from emb_model_provider import __version__
from emb_model_provider.core.quantization import IntVectors
from emb_model_provider.core.vectors import Vectors
from emb_model_provider.offline.base import BulkError, ChunkResult
from emb_model_provider.services.sparse import SparseVector

OutputFormat = Literal["parquet", "npy"]
MANIFEST = "manifest.json"


def output_format(path: Path) -> OutputFormat:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return "parquet"
    if suffix == ".npy":
        return "npy"
    raise BulkError(f"cannot tell the output format of {path.name}; name it .parquet or .npy")


def parts_dir(output: Path) -> Path:
    return output.with_name(output.name + ".parts")


def errors_path(output: Path) -> Path:
    return output.with_name(output.name + ".errors.jsonl")


def ids_path(output: Path) -> Path:
    return output.with_name(output.stem + ".ids.jsonl")


#: ``--encoding-format`` -> the numpy type of the stored components.
_DTYPES: dict[str, type[np.generic]] = {
    "float": np.float32,
    "int8": np.int8,
    "binary": np.int8,
    "uint8": np.uint8,
    "ubinary": np.uint8,
}


def schema(
    dimensions: int,
    model: str,
    encoding_format: str = "float",
    *,
    sparse: bool = False,
    top_k: int | None = None,
) -> pa.Schema:
    metadata = {
        "model": model,
        "dimensions": str(dimensions),
        "generator": f"emb-model-provider {__version__}",
    }
    if sparse:
        metadata["vectors"] = "sparse"
        if top_k is not None:
            metadata["top_k"] = str(top_k)
        return pa.schema(
            [
                pa.field("id", pa.string(), nullable=False),
                pa.field("indices", pa.list_(pa.int32()), nullable=False),
                pa.field("values", pa.list_(pa.float32()), nullable=False),
            ],
            metadata=metadata,
        )
    if encoding_format != "float":
        metadata["encoding_format"] = encoding_format
    value_type = pa.from_numpy_dtype(_DTYPES[encoding_format])
    return pa.schema(
        [
            pa.field("id", pa.string(), nullable=False),
            pa.field("embedding", pa.list_(value_type, dimensions), nullable=False),
        ],
        metadata=metadata,
    )


def table(
    ids: Sequence[str],
    vectors: Vectors | IntVectors | list[SparseVector],
    *,
    dimensions: int,
    model: str,
    encoding_format: str = "float",
    top_k: int | None = None,
) -> pa.Table:
    if isinstance(vectors, list):
        return _sparse_table(ids, vectors, dimensions=dimensions, model=model, top_k=top_k)
    dtype = _DTYPES[encoding_format]
    values = np.ascontiguousarray(vectors, dtype=dtype).reshape(-1)
    flat = pa.array(values, pa.from_numpy_dtype(dtype))
    embedding = pa.FixedSizeListArray.from_arrays(flat, dimensions)
    return pa.Table.from_arrays(
        [pa.array(list(ids), pa.string()), embedding],
        schema=schema(dimensions, model, encoding_format),
    )


def _sparse_table(
    ids: Sequence[str],
    vectors: list[SparseVector],
    *,
    dimensions: int,
    model: str,
    top_k: int | None,
) -> pa.Table:
    lengths = np.fromiter((len(vector.indices) for vector in vectors), np.int32, len(vectors))
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32), pa.int32())

    def flat(parts: list[np.ndarray[Any, Any]], dtype: type[np.generic]) -> pa.Array:
        joined = np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)
        return pa.array(joined, pa.from_numpy_dtype(dtype))

    indices = flat([vector.indices for vector in vectors], np.int32)
    values = flat([vector.values for vector in vectors], np.float32)
    return pa.Table.from_arrays(
        [
            pa.array(list(ids), pa.string()),
            pa.ListArray.from_arrays(offsets, indices),
            pa.ListArray.from_arrays(offsets, values),
        ],
        schema=schema(dimensions, model, sparse=True, top_k=top_k),
    )


@dataclass(frozen=True)
class PartInfo:
    rows: int
    inputs: int
    tokens: int
    errors: list[tuple[str, str]]


class Parts:
    """The parts folder of one output."""

    def __init__(self, output: Path, manifest: dict[str, Any]) -> None:
        self.output = output
        self.folder = parts_dir(output)
        self.manifest = manifest
        self.dimensions = int(manifest["dimensions"])
        self.model = str(manifest["model"])
        self.encoding_format = str(manifest.get("encoding_format", "float"))
        self.sparse = manifest.get("vectors") == "sparse"
        top_k = manifest.get("top_k")
        self.top_k = int(top_k) if top_k is not None else None

    @classmethod
    def open(cls, output: Path, manifest: dict[str, Any], *, resume: bool) -> Parts:
        """The folder for this job: the existing one when it is the same job (resume), else a
        new one. A folder of another job is an error (nothing is deleted unasked)."""
        folder = parts_dir(output)
        existing = folder / MANIFEST
        if existing.is_file() and resume:
            found = json.loads(existing.read_text(encoding="utf-8"))
            if found == manifest:
                return cls(output, manifest)
            changed = sorted(
                key for key in {*found, *manifest} if found.get(key) != manifest.get(key)
            )
            raise BulkError(
                f"{folder} holds an unfinished run with another {', '.join(changed)}; "
                "rerun it as it was, or pass --overwrite to start over"
            )
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        _write_atomic(existing, json.dumps(manifest, indent=2, sort_keys=True).encode())
        return cls(output, manifest)

    def part_path(self, index: int) -> Path:
        return self.folder / f"part-{index:06d}.parquet"

    def done(self, index: int) -> PartInfo | None:
        path = self.part_path(index)
        if not path.is_file():
            return None
        return _part_info(pq.read_schema(path).metadata or {})

    def write(self, index: int, result: ChunkResult, inputs: int) -> None:
        data = table(
            result.ids,
            result.vectors,
            dimensions=self.dimensions,
            model=self.model,
            encoding_format=self.encoding_format,
            top_k=self.top_k,
        )
        metadata = {
            **(data.schema.metadata or {}),
            b"inputs": str(inputs).encode(),
            b"tokens": str(result.tokens).encode(),
            b"errors": json.dumps(result.errors).encode(),
        }
        path = self.part_path(index)
        temporary = path.with_name(path.name + ".tmp")
        pq.write_table(data.replace_schema_metadata(metadata), temporary)
        _fsync(temporary)
        os.replace(temporary, path)

    def indices(self) -> list[int]:
        return sorted(
            int(path.name.removeprefix("part-").removesuffix(".parquet"))
            for path in self.folder.glob("part-*.parquet")
        )

    def finish(self) -> tuple[int, list[tuple[str, str]]]:
        """Assemble the output from the parts, in order; returns rows and the errors."""
        indices = self.indices()
        infos = [self.done(index) for index in indices]
        rows = sum(info.rows for info in infos if info is not None)
        errors = [error for info in infos if info is not None for error in info.errors]
        tables = (pq.read_table(self.part_path(index)) for index in indices)
        if output_format(self.output) == "parquet":
            target = schema(
                self.dimensions,
                self.model,
                self.encoding_format,
                sparse=self.sparse,
                top_k=self.top_k,
            )
            _write_parquet(self.output, tables, target)
        else:
            dtype = _DTYPES[self.encoding_format]
            _write_npy(self.output, tables, rows, self.dimensions, dtype)
        _write_errors(errors_path(self.output), errors)
        shutil.rmtree(self.folder)
        return rows, errors


def _part_info(metadata: dict[bytes, bytes]) -> PartInfo:
    errors = [(str(id_), str(reason)) for id_, reason in json.loads(metadata[b"errors"])]
    inputs = int(metadata[b"inputs"])
    return PartInfo(inputs - len(errors), inputs, int(metadata[b"tokens"]), errors)


def _write_parquet(output: Path, tables: Iterator[pa.Table], target: pa.Schema) -> None:
    temporary = output.with_name(output.name + ".tmp")
    with pq.ParquetWriter(temporary, target) as writer:
        for part in tables:
            writer.write_table(part.replace_schema_metadata(target.metadata))
    _fsync(temporary)
    os.replace(temporary, output)


def _write_npy(
    output: Path,
    tables: Iterator[pa.Table],
    rows: int,
    dimensions: int,
    dtype: type[np.generic] = np.float32,
) -> None:
    temporary = output.with_name(output.name + ".tmp")
    ids_temporary = output.with_name(output.name + ".ids.tmp")
    array = np.lib.format.open_memmap(temporary, mode="w+", dtype=dtype, shape=(rows, dimensions))
    row = 0
    with ids_temporary.open("w", encoding="utf-8") as ids:
        for part in tables:
            count = part.num_rows
            flat = part.column("embedding").combine_chunks().flatten().to_numpy()
            array[row : row + count] = flat.reshape(count, dimensions)
            ids.writelines(json.dumps(id_) + "\n" for id_ in part.column("id").to_pylist())
            row += count
    array.flush()
    del array
    _fsync(temporary)
    os.replace(ids_temporary, ids_path(output))
    os.replace(temporary, output)


def _write_errors(path: Path, errors: list[tuple[str, str]]) -> None:
    if not errors:
        path.unlink(missing_ok=True)
        return
    lines = "".join(json.dumps({"id": id_, "error": reason}) + "\n" for id_, reason in errors)
    _write_atomic(path, lines.encode("utf-8"))


def _write_atomic(path: Path, data: bytes) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_bytes(data)
    _fsync(temporary)
    os.replace(temporary, path)


def _fsync(path: Path) -> None:
    """On disk before the rename that publishes it, so a crash never leaves a renamed empty file."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
