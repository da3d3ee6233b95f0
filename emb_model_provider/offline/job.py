"""One bulk job: read the input in chunks, embed the chunks not done yet, assemble the output.

Resuming: the manifest names the job; chunk ``i`` is always inputs ``[i * chunk_size, (i + 1) *
chunk_size)`` of the input read in its fixed order, so a rerun skips the chunks whose parts exist
(their inputs are read, not embedded) and computes the rest.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from emb_model_provider.offline.base import BulkError, Embedder
from emb_model_provider.offline.parts import Parts, errors_path, output_format
from emb_model_provider.offline.progress import Progress
from emb_model_provider.offline.records import InputSpec, Record, count_records, read_records


@dataclass(frozen=True)
class Summary:
    inputs: int
    embedded: int
    errors: int
    #: Inputs whose chunks an earlier run had finished (read, not embedded again).
    resumed: int
    tokens: int
    seconds: float
    output: Path

    def line(self) -> str:
        computed = self.inputs - self.resumed
        rate = computed / self.seconds if self.seconds > 0 else 0.0
        parts = [f"{self.inputs} inputs", f"{self.embedded} embedded"]
        if self.errors:
            parts.append(f"{self.errors} errors in {errors_path(self.output).name}")
        if self.resumed:
            parts.append(f"{self.resumed} done by an earlier run, not recomputed")
        return (
            f"{', '.join(parts)}; {self.tokens} tokens; {self.seconds:.1f} s; "
            f"{rate:.1f} inputs/s computed this run -> {self.output}"
        )


def manifest(spec: InputSpec, embedder: Embedder, chunk_size: int, output: Path) -> dict[str, Any]:
    found = {
        "version": 1,
        "input": spec.describe(),
        "model": embedder.model,
        "dimensions": embedder.dimensions,
        "chunk_size": chunk_size,
        "output_format": output_format(output),
    }
    precision = getattr(embedder, "precision", None)  # offline/quantized.py
    if precision is not None:  # absent for floats: earlier runs' manifests still match
        found["encoding_format"] = precision
    if embedder.sparse:  # absent for dense vectors, as above; a resume must not mix the two
        found["vectors"] = "sparse"
        found["top_k"] = embedder.top_k
    return found


def check_sparse_output(model: str, output: Path, *, sparse: bool) -> None:
    """A sparse model's vectors are ragged: Parquet list columns hold them, a .npy array cannot."""
    if sparse and output_format(output) != "parquet":
        raise BulkError(
            f"{model} gives sparse vectors (indices and values of varying length), "
            f"which a {output.suffix} array cannot hold; name the output .parquet"
        )


def check_output(output: Path, *, overwrite: bool) -> None:
    output_format(output)
    if output.exists() and not overwrite:
        raise BulkError(f"{output} exists; pass --overwrite to replace it")
    if not output.parent.is_dir():
        raise BulkError(f"the output's folder {output.parent} does not exist")


def run_job(
    spec: InputSpec,
    embedder: Embedder,
    output: Path,
    *,
    chunk_size: int,
    overwrite: bool = False,
    progress_interval_s: float = 10.0,
) -> Summary:
    started = time.monotonic()
    check_output(output, overwrite=overwrite)
    check_sparse_output(embedder.model, output, sparse=embedder.sparse)
    parts = Parts.open(output, manifest(spec, embedder, chunk_size, output), resume=not overwrite)
    progress = Progress(count_records(spec), interval_s=progress_interval_s)
    inputs = resumed = tokens = 0
    try:
        for index, chunk in enumerate(chunks(read_records(spec, embedder.kind), chunk_size)):
            info = parts.done(index)
            if info is None:
                result = embedder.embed(chunk)
                parts.write(index, result, len(chunk))
                tokens += result.tokens
                progress.advance(len(chunk), tokens=tokens, computed=True)
            else:
                if info.inputs != len(chunk):
                    raise BulkError(f"part {index} holds {info.inputs} inputs, not {len(chunk)}")
                resumed += len(chunk)
                tokens += info.tokens
                progress.advance(len(chunk), tokens=tokens, computed=False)
            inputs += len(chunk)
    finally:
        progress.close()
    rows, errors = parts.finish()
    return Summary(
        inputs=inputs,
        embedded=rows,
        errors=len(errors),
        resumed=resumed,
        tokens=tokens,
        seconds=time.monotonic() - started,
        output=output,
    )


def chunks(records: Iterable[Record], size: int) -> Iterator[list[Record]]:
    iterator = iter(records)
    while chunk := list(islice(iterator, size)):
        yield chunk
