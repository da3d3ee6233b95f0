"""The Ray engine: Ray Data ``map_batches`` over a pool of encoder actors, Parquet in and out.

Each actor loads the encoder once (``local.LocalEmbedder``, the same code as the in-process
engine, so the vectors are the same) and embeds the batches Ray streams to it; one actor per GPU
(``gpus_per_actor=1``) or per CPU share (``cpus_per_actor`` CPUs and as many torch threads).
Ray Data streams blocks through the pool, so a corpus larger than memory flows from Parquet to
Parquet.

Python entry point, on a dataset with a text (or image path/URL) column::

    import ray
    from emb_model_provider.offline.local import LocalConfig
    from emb_model_provider.offline.ray_engine import embed_dataset

    ds = ray.data.read_parquet("corpus/")
    vectors = embed_dataset(ds, LocalConfig.create("all-MiniLM-L6-v2"), value_column="text",
                            id_column="doc_id")
    vectors.write_parquet("vectors/")   # columns id, embedding, error ("" when none), tokens

``run_ray_job`` is ``emb-model-provider embed --engine ray``: it stages the input as Parquet,
runs ``embed_dataset`` and assembles the same output files as the other engines, in input order.

Ray is an optional extra (``pip install emb-model-provider[ray]``) and is imported only here.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from emb_model_provider.core.vectors import Vectors
from emb_model_provider.offline.base import BulkError, ChunkResult, dense
from emb_model_provider.offline.job import Summary, check_output, check_sparse_output, chunks
from emb_model_provider.offline.local import LocalConfig, LocalEmbedder
from emb_model_provider.offline.parts import Parts, output_format
from emb_model_provider.offline.progress import Progress
from emb_model_provider.offline.records import (
    InputKind,
    InputSpec,
    Record,
    count_records,
    read_records,
)
from emb_model_provider.services.sparse import SparseVector

if TYPE_CHECKING:
    from ray.data import Dataset


_BLOCK_BYTES = 1024 * 1024


class EncoderActor:
    """One encoder per actor, loaded in ``__init__``; called with numpy batches."""

    def __init__(
        self,
        config: LocalConfig,
        value_column: str,
        id_column: str | None,
        error_column: str | None,
    ) -> None:
        self._embedder = LocalEmbedder(config)
        self._value_column = value_column
        self._id_column = id_column
        self._error_column = error_column

    def __call__(self, batch: dict[str, np.ndarray[Any, Any]]) -> dict[str, np.ndarray[Any, Any]]:
        values = batch[self._value_column]
        count = len(values)
        ids = (
            [str(value) for value in batch[self._id_column]]
            if self._id_column
            else [str(row) for row in range(count)]
        )
        errors = batch[self._error_column] if self._error_column else [None] * count
        kind: InputKind = "image" if self._embedder.kind == "image" else "text"
        # Positions as ids inside the batch, so that duplicate user ids still map back.
        records = [
            Record(str(row), "", kind, str(errors[row]))
            if errors[row]
            else Record(str(row), "", kind, "the input is empty")
            if not isinstance(values[row], str) or not values[row].strip()
            else Record(str(row), str(values[row]), kind)
            for row in range(count)
        ]
        result = self._embedder.embed(records)
        tokens = np.zeros(count, dtype=np.int64)
        reasons = np.array([""] * count, dtype=object)
        for id_, reason in result.errors:
            reasons[int(id_)] = reason
        # Tokens per row are not kept by ``embed``; the batch's total goes on its first row.
        if count:
            tokens[0] = result.tokens
        columns = {"id": np.array(ids, dtype=object), "error": reasons, "tokens": tokens}
        if isinstance(result.vectors, list):
            return {**columns, **self._sparse_columns(result.ids, result.vectors, count)}
        embedding = np.zeros((count, self._embedder.dimensions), dtype=np.float32)
        for position, id_ in enumerate(result.ids):
            embedding[int(id_)] = result.vectors[position]
        return {**columns, "embedding": embedding}

    def _sparse_columns(
        self, kept: list[str], vectors: list[SparseVector], count: int
    ) -> dict[str, np.ndarray[Any, Any]]:
        """Indices and values as Python lists, which Ray Data stores as Arrow list columns
        (ragged numpy rows would become its tensor extension type); a failed row's are empty.
        ``dimensions`` (the vocabulary's size, on every row) is for the driver's manifest."""
        indices = np.empty(count, dtype=object)
        values = np.empty(count, dtype=object)
        for row in range(count):
            indices[row], values[row] = [], []
        for position, id_ in enumerate(kept):
            indices[int(id_)] = vectors[position].indices.tolist()
            values[int(id_)] = vectors[position].values.tolist()
        return {
            "indices": indices,
            "values": values,
            "dimensions": np.full(count, self._embedder.dimensions, dtype=np.int64),
        }


def embed_dataset(
    ds: Dataset,
    config: LocalConfig,
    *,
    value_column: str = "text",
    id_column: str | None = "id",
    error_column: str | None = None,
    actors: int | None = None,
    cpus_per_actor: float = 1.0,
    gpus_per_actor: float = 0.0,
) -> Dataset:
    """``ds`` with columns id, embedding (float32, ``dimensions`` long), error ("" or why the row
    failed; its embedding is zeros) and tokens (per batch, on its first row). A sparse (SPLADE)
    model's rows have indices and values (lists; empty for a failed row) and dimensions (the
    vocabulary's size) instead of embedding."""
    from ray.data import ActorPoolStrategy

    pool = actors or default_actors(cpus_per_actor, gpus_per_actor)
    threads = max(1, math.floor(cpus_per_actor)) if gpus_per_actor == 0 else config.num_threads
    actor_config = dataclasses.replace(config, num_threads=threads)
    return ds.map_batches(
        EncoderActor,
        fn_constructor_args=(actor_config, value_column, id_column, error_column),
        batch_size=config.batch_size,
        batch_format="numpy",
        compute=ActorPoolStrategy(size=pool),
        num_cpus=cpus_per_actor,
        num_gpus=gpus_per_actor,
    )


def default_actors(cpus_per_actor: float, gpus_per_actor: float) -> int:
    """One actor per GPU share, else one per CPU share, leaving one CPU to read and write."""
    import ray

    cluster_resources = cast(Callable[[], dict[str, float]], ray.cluster_resources)  # untyped
    resources = cluster_resources()
    if gpus_per_actor > 0:
        return max(1, math.floor(resources.get("GPU", 0.0) / gpus_per_actor))
    return max(1, math.floor((resources.get("CPU", 1.0) - 1) / cpus_per_actor))


def run_ray_job(
    spec: InputSpec,
    config: LocalConfig,
    output: Path,
    *,
    address: str | None = None,
    num_cpus: int | None = None,
    actors: int | None = None,
    cpus_per_actor: float = 1.0,
    gpus_per_actor: float = 0.0,
    chunk_size: int = 1024,
    overwrite: bool = False,
    progress_interval_s: float = 10.0,
) -> Summary:
    """``embed --engine ray``: the same files as the other engines (not resumable: a rerun
    computes everything again; the output still appears whole or not at all)."""
    started = time.monotonic()
    check_output(output, overwrite=overwrite)
    model_spec = config.spec()
    if model_spec.modality == "multimodal":
        # Staged rows keep a value, not its kind, and a multimodal model takes both.
        raise BulkError(
            f"{model_spec.name} takes texts and images: embed it with the in-process engine "
            "or --url, not --engine ray"
        )
    # Before Ray starts when the files say the model is sparse (a hub model: at its first batch).
    check_sparse_output(model_spec.name, output, sparse=config.specs()[1].task == "sparse")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage reports from a batch job
    import ray
    import ray.data

    # Ray Data logs each execution plan at INFO; the job's own progress lines say enough.
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(
            address=address,
            num_cpus=num_cpus,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    staging = output.with_name(output.name + ".ray-input")
    try:
        kind = model_spec.modality
        files = _stage(read_records(spec, kind), staging, chunk_size)
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True  # the output in input order
        context.enable_progress_bars = False  # the job's own progress lines instead
        # Small output blocks (a few hundred vectors): the actors hand results on as they go,
        # instead of one block per input file, so the driver writes parts while they work
        # (measured: first part after the actor starts, not after the whole input).
        context.target_max_block_size = _BLOCK_BYTES
        ds = ray.data.read_parquet([str(path) for path in files])
        vectors = embed_dataset(
            ds,
            config,
            value_column="value",
            id_column="id",
            error_column="error",
            actors=actors,
            cpus_per_actor=cpus_per_actor,
            gpus_per_actor=gpus_per_actor,
        )
        progress = Progress(count_records(spec), interval_s=progress_interval_s)
        parts: Parts | None = None
        inputs = tokens = 0
        try:
            for index, batch in enumerate(
                vectors.iter_batches(batch_size=None, batch_format="numpy")  # a part per block
            ):
                result = _result(batch)
                if parts is None:
                    parts = _parts(spec, output, config, result, chunk_size, batch=batch)
                parts.write(index, result, len(batch["id"]))
                inputs += len(batch["id"])
                tokens += result.tokens
                progress.advance(len(batch["id"]), tokens=tokens, computed=True)
        finally:
            progress.close()
        if parts is None:
            dims = config.dimensions or model_spec.dimensions
            if dims is None or config.specs()[1].task == "sparse":
                raise BulkError("the input is empty and the model's dimensions are unknown")
            empty = ChunkResult([], np.zeros((0, dims), np.float32), 0)
            parts = _parts(spec, output, config, empty, chunk_size)
        rows, errors = parts.finish()
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if started_ray:
            ray.shutdown()
    return Summary(
        inputs=inputs,
        embedded=rows,
        errors=len(errors),
        resumed=0,
        tokens=tokens,
        seconds=time.monotonic() - started,
        output=output,
    )


def _stage(records: Iterable[Record], folder: Path, chunk_size: int) -> list[Path]:
    """The inputs as Parquet files of ``chunk_size`` rows (id, value, error), in order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    files: list[Path] = []
    for index, chunk in enumerate(chunks(records, chunk_size)):
        path = folder / f"input-{index:06d}.parquet"
        table = pa.table(
            {
                "id": pa.array([record.id for record in chunk], pa.string()),
                "value": pa.array([record.value for record in chunk], pa.string()),
                "error": pa.array([record.error or "" for record in chunk], pa.string()),
            }
        )
        pq.write_table(table, path)
        files.append(path)
    return files


def _result(batch: dict[str, np.ndarray[Any, Any]]) -> ChunkResult:
    ids = [str(id_) for id_ in batch["id"]]
    reasons = [str(reason) for reason in batch["error"]]
    good = [row for row, reason in enumerate(reasons) if not reason]
    vectors: Vectors | list[SparseVector]
    if "indices" in batch:  # a sparse model's (``EncoderActor._sparse_columns``)
        vectors = [
            SparseVector(
                np.asarray(batch["indices"][row], dtype=np.int64),
                np.asarray(batch["values"][row], dtype=np.float32),
            )
            for row in good
        ]
    else:
        vectors = np.ascontiguousarray(np.asarray(batch["embedding"], dtype=np.float32)[good])
    return ChunkResult(
        ids=[ids[row] for row in good],
        vectors=vectors,
        tokens=int(np.asarray(batch["tokens"]).sum()),
        errors=[(ids[row], reason) for row, reason in enumerate(reasons) if reason],
    )


def _parts(
    spec: InputSpec,
    output: Path,
    config: LocalConfig,
    first: ChunkResult,
    chunk_size: int,
    *,
    batch: dict[str, np.ndarray[Any, Any]] | None = None,
) -> Parts:
    """The parts of the job, named by its first batch (a sparse model's carries the
    vocabulary's size, ``EncoderActor._sparse_columns``)."""
    model = config.spec()
    vocabulary = (
        int(batch["dimensions"][0]) if batch is not None and "dimensions" in batch else None
    )
    manifest: dict[str, Any] = {
        "version": 1,
        "engine": "ray",
        "input": spec.describe(),
        "model": model.name,
        "dimensions": vocabulary or int(dense(first).shape[1]),
        "chunk_size": chunk_size,
        "output_format": output_format(output),
    }
    if vocabulary is not None:
        check_sparse_output(model.name, output, sparse=True)
        manifest["vectors"] = "sparse"
        # The top-k as the in-process engine's (``LocalEmbedder.top_k``).
        manifest["top_k"] = config.dimensions or model.dimensions
    return Parts.open(output, manifest, resume=False)
