"""``emb-model-provider embed`` with a sparse (SPLADE) model: the vectors of
``SparseEncoder(dir).encode`` (prompts, ``--dimensions`` as top-k, the models file's default) as
two Parquet list columns, in process, on Ray and through a live server; ``.npy`` and integer
encodings refused; a resume refuses to mix sparse and dense parts."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from numpy.testing import assert_allclose
from sentence_transformers import SparseEncoder

from benchmarks.sparse_models import build_splade
from emb_model_provider.cli import main
from emb_model_provider.core.config import ENV_PREFIX
from emb_model_provider.offline.base import ChunkResult
from emb_model_provider.offline.job import run_job
from emb_model_provider.offline.local import LocalConfig, LocalEmbedder
from emb_model_provider.offline.records import Record, input_spec
from tests.live import live_server, test_settings
from tests.tiny_text_models import text_models_file

VOCABULARY = 30522
TEXTS = [
    "how do foxes find food in winter",
    "Foxes hunt small rodents under the snow, listening for them before they pounce. " * 3,
    "x",
    "The stock market closed higher on Tuesday.",
    "Bake the bread for forty minutes at a high heat.",
    "A red fox eats mice and voles when the ground is frozen.",
    "Bond yields climbed again as inflation stayed high.",
]
PROMPTS = {"query": "query: ", "document": "passage: "}


@pytest.fixture(autouse=True)
def _settings_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """None of the developer's EMB_PROVIDER_*, and one torch thread (a shared 2-core machine)."""
    for key in list(os.environ):
        if key.startswith(ENV_PREFIX):
            monkeypatch.delenv(key)
    monkeypatch.setenv(f"{ENV_PREFIX}NUM_THREADS", "1")


@pytest.fixture(scope="module")
def splade(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_splade(tmp_path_factory.mktemp("splade") / "m", max_seq_length=24)


@pytest.fixture(scope="module")
def splade_prompts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Query and document prompts, sum pooling, log1p_relu, a saved top-k of 40."""
    return build_splade(
        tmp_path_factory.mktemp("splade-prompts") / "m",
        prompts=PROMPTS,
        pooling="sum",
        activation="log1p_relu",
        max_active_dims=40,
        max_seq_length=24,
        seed=1,
    )


@pytest.fixture(scope="module")
def models(splade: Path, splade_prompts: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return text_models_file(
        tmp_path_factory.mktemp("models") / "models.yaml",
        [
            {"name": "splade", "source": str(splade)},
            {"name": "splade-prompts", "source": str(splade_prompts)},
            # A name that pins the query prompt, and one whose dimensions is the default top-k.
            {"name": "splade-query", "base": "splade-prompts", "prompt_name": "query"},
            {"name": "splade-top5", "source": str(splade), "dimensions": 5},
        ],
    )


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.jsonl"
    lines = [json.dumps({"id": f"doc-{i}", "text": text}) for i, text in enumerate(TEXTS)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _embed(source: Path, output: Path, models: Path, *flags: str) -> int:
    return main(
        [
            *("embed", str(source), "-o", str(output), "--models-file", str(models)),
            *("--device", "cpu", *flags),
        ]
    )


def _dense_rows(output: Path) -> tuple[list[str], npt.NDArray[np.float32]]:
    """The output's ids and its pairs as vocabulary-wide rows."""
    table = pq.read_table(output)
    rows = np.zeros((table.num_rows, VOCABULARY), dtype=np.float32)
    indices = table.column("indices").to_pylist()
    values = table.column("values").to_pylist()
    for row, (terms, weights) in enumerate(zip(indices, values, strict=True)):
        assert terms == sorted(terms)  # ascending, as the server gives them
        rows[row, terms] = weights
    return [str(id_) for id_ in table.column("id").to_pylist()], rows


def _library(rows: Any) -> npt.NDArray[np.float32]:
    dense: npt.NDArray[np.float32] = rows.to_dense().numpy() if rows.is_sparse else rows.numpy()
    return dense


def _same(ours: npt.NDArray[np.float32], expected: npt.NDArray[np.float32]) -> None:
    assert ((ours != 0) == (expected != 0)).all()  # the same non-zero terms
    assert_allclose(ours, expected, rtol=0, atol=1e-4)


def test_local_engine_writes_the_librarys_pairs(
    splade: Path, models: Path, source: Path, tmp_path: Path
) -> None:
    output = tmp_path / "sparse.parquet"
    assert _embed(source, output, models, "--model", "splade", "--batch-size", "3") == 0
    schema = pq.read_schema(output)
    assert schema.names == ["id", "indices", "values"]
    assert schema.field("indices").type == pa.list_(pa.int32())
    assert schema.field("values").type == pa.list_(pa.float32())
    metadata = schema.metadata or {}
    assert metadata[b"vectors"] == b"sparse"
    assert metadata[b"dimensions"] == str(VOCABULARY).encode()
    assert b"top_k" not in metadata
    ids, rows = _dense_rows(output)
    assert ids == [f"doc-{index}" for index in range(len(TEXTS))]
    expected = _library(SparseEncoder(str(splade), device="cpu").encode(TEXTS))
    _same(rows, expected)
    assert ((expected != 0).sum(axis=1) > 10).all()  # sparse, but not trivially


@pytest.mark.parametrize(
    ("model", "method"),
    [("splade-prompts", "encode"), ("splade-query", "encode_query")],
)
def test_prompts_as_the_library(
    splade_prompts: Path, models: Path, source: Path, tmp_path: Path, *, model: str, method: str
) -> None:
    """No prompt (the saved top-k of 40 applies), and a name that pins the query prompt."""
    output = tmp_path / "prompts.parquet"
    assert _embed(source, output, models, "--model", model) == 0
    _, rows = _dense_rows(output)
    reference = SparseEncoder(str(splade_prompts), device="cpu")
    expected = _library(getattr(reference, method)(TEXTS))
    _same(rows, expected)
    assert ((rows != 0).sum(axis=1) == 40).all()


def test_dimensions_is_the_top_k_and_the_models_file_its_default(
    splade: Path, models: Path, source: Path, tmp_path: Path
) -> None:
    reference = SparseEncoder(str(splade), device="cpu")
    seven = tmp_path / "top7.parquet"
    assert _embed(source, seven, models, "--model", "splade", "--dimensions", "7") == 0
    _same(_dense_rows(seven)[1], _library(reference.encode(TEXTS, max_active_dims=7)))
    assert (pq.read_schema(seven).metadata or {})[b"top_k"] == b"7"
    default = tmp_path / "top5.parquet"
    assert _embed(source, default, models, "--model", "splade-top5") == 0
    _same(_dense_rows(default)[1], _library(reference.encode(TEXTS, max_active_dims=5)))
    # --dimensions wins over the models file's, as a request's does on the server.
    wider = tmp_path / "top9.parquet"
    assert _embed(source, wider, models, "--model", "splade-top5", "--dimensions", "9") == 0
    assert ((_dense_rows(wider)[1] != 0).sum(axis=1) == 9).all()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["-o", "{tmp}/out.npy"], "a .npy array cannot hold"),
        (["-o", "{tmp}/out.parquet", "--encoding-format", "int8"], "written as floats only"),
        (["-o", "{tmp}/out.parquet", "--encoding-format", "ubinary"], "written as floats only"),
        (["-o", "{tmp}/out.npy", "--engine", "ray", "--ray-cpus", "2"], "a .npy array cannot"),
    ],
)
def test_what_cannot_hold_sparse_vectors_is_refused(
    models: Path,
    source: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    *,
    flags: list[str],
    message: str,
) -> None:
    args = [flag.format(tmp=tmp_path) for flag in flags]
    code = main(
        [
            *("embed", str(source), "--model", "splade", "--models-file", str(models)),
            *("--device", "cpu", *args),
        ]
    )
    assert code == 1
    assert message in capsys.readouterr().err
    assert not list(tmp_path.glob("out.*"))


class _Interrupted(LocalEmbedder):
    """Stopped (as by Ctrl-C) after ``chunks`` chunks: what a killed run leaves."""

    def __init__(self, config: LocalConfig, chunks: int) -> None:
        super().__init__(config)
        self._left = chunks

    def embed(self, records: Sequence[Record]) -> ChunkResult:
        if self._left == 0:
            raise KeyboardInterrupt
        self._left -= 1
        return super().embed(records)


def test_resume_keeps_sparse_parts_and_refuses_a_dense_model(
    splade: Path,
    models: Path,
    source: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    output = tmp_path / "resumed.parquet"
    config = LocalConfig.create("splade", models_file=str(models), device="cpu", num_threads=1)
    embedder = _Interrupted(config, chunks=2)
    spec = input_spec(source, column=None, id_column=None)
    with pytest.raises(KeyboardInterrupt):
        run_job(spec, embedder, output, chunk_size=2)
    embedder.close()
    manifest = json.loads((tmp_path / "resumed.parquet.parts" / "manifest.json").read_text())
    assert manifest["vectors"] == "sparse" and manifest["top_k"] is None
    # The default (dense) model on the same output: refused, the sparse parts kept.
    assert _embed(source, output, models, "--chunk-size", "2") == 1
    assert "another dimensions, model, vectors" in capsys.readouterr().err
    assert _embed(source, output, models, "--model", "splade", "--chunk-size", "2") == 0
    assert "4 done by an earlier run" in capsys.readouterr().err
    ids, rows = _dense_rows(output)
    assert ids == [f"doc-{index}" for index in range(len(TEXTS))]
    _same(rows, _library(SparseEncoder(str(splade), device="cpu").encode(TEXTS)))


def test_url_engine_writes_the_servers_pairs(
    splade: Path, splade_prompts: Path, models: Path, source: Path, tmp_path: Path
) -> None:
    reference = SparseEncoder(str(splade), device="cpu")
    outputs = {name: tmp_path / f"{name}.parquet" for name in ("plain", "top7", "query", "top5")}
    flags = {
        "plain": ["--model", "splade"],
        "top7": ["--model", "splade", "--dimensions", "7"],
        "query": ["--model", "splade-query"],
        "top5": ["--model", "splade-top5"],
    }
    with live_server(test_settings(models_file=models)) as url:
        for name, output in outputs.items():
            remote = ["--url", url, "--batch-size", "3", "--concurrency", "2"]
            assert _embed(source, output, models, *flags[name], *remote) == 0

    ids, rows = _dense_rows(outputs["plain"])
    assert ids == [f"doc-{index}" for index in range(len(TEXTS))]
    _same(rows, _library(reference.encode(TEXTS)))
    assert (pq.read_schema(outputs["plain"]).metadata or {})[b"vectors"] == b"sparse"
    _same(_dense_rows(outputs["top7"])[1], _library(reference.encode(TEXTS, max_active_dims=7)))
    query = SparseEncoder(str(splade_prompts), device="cpu").encode_query(TEXTS)
    _same(_dense_rows(outputs["query"])[1], _library(query))
    _same(_dense_rows(outputs["top5"])[1], _library(reference.encode(TEXTS, max_active_dims=5)))
    assert (pq.read_schema(outputs["top5"]).metadata or {})[b"top_k"] == b"5"


def test_ray_engine_equals_the_in_process_engine(
    splade: Path, models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("ray")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = tmp_path / "corpus.txt"
    lines = [*TEXTS[:3], "", *TEXTS[3:]]  # line 4 is empty: an error in both engines
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    common = ["--model", "splade", "--batch-size", "2", "--dimensions", "7"]
    on_ray, in_process = tmp_path / "ray.parquet", tmp_path / "local.parquet"
    assert _embed(source, on_ray, models, *common, "--engine", "ray", "--ray-cpus", "2") == 0
    assert _embed(source, in_process, models, *common) == 0
    ray_table, local_table = pq.read_table(on_ray), pq.read_table(in_process)
    assert ray_table.schema.equals(local_table.schema, check_metadata=True)
    assert ray_table.column("id").to_pylist() == [str(n) for n in range(1, 9) if n != 4]
    assert ray_table.column("indices").equals(local_table.column("indices"))
    ray_rows = _dense_rows(on_ray)[1]
    _same(ray_rows, _dense_rows(in_process)[1])
    reference = SparseEncoder(str(splade), device="cpu")
    _same(ray_rows, _library(reference.encode(TEXTS, max_active_dims=7)))
    errors = (tmp_path / "ray.parquet.errors.jsonl").read_text(encoding="utf-8")
    assert errors == '{"id": "4", "error": "the input is empty"}\n'


@pytest.mark.parametrize(
    ("prompt_name", "method"),
    [(None, "encode"), ("query", "encode_query"), ("document", "encode_document")],
)
def test_an_inference_free_splade_takes_the_route_of_its_pinned_prompt_name(
    source: Path, tmp_path: Path, prompt_name: str | None, method: str
) -> None:
    """A Router model: the name's pinned prompt name picks the route as on the server
    (``encode_query`` / ``encode_document``; none: ``encode``, the default route)."""
    from tests.test_sparse_router import build_inference_free_splade

    model = build_inference_free_splade(tmp_path / "if-splade")
    entries: list[dict[str, object]] = [{"name": "if-splade", "source": str(model)}]
    if prompt_name is not None:
        entries.append({"name": "if-pinned", "base": "if-splade", "prompt_name": prompt_name})
    models = text_models_file(tmp_path / "models.yaml", entries)
    output = tmp_path / "routed.parquet"
    name = "if-splade" if prompt_name is None else "if-pinned"
    assert _embed(source, output, models, "--model", name) == 0
    _, rows = _dense_rows(output)
    expected = _library(getattr(SparseEncoder(str(model), device="cpu"), method)(TEXTS))
    _same(rows, expected)
