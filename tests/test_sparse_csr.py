"""CSR sparse models (a dense sentence-transformers pipeline, then a ``SparseAutoEncoder``):
vectors equal to ``SparseEncoder(dir).encode`` on the same weights (prompts, the autoencoder's
layer norm, a Dense + Normalize before it, ``max_active_dims`` below and above the saved k), on
a live server (the openai SDK, TEI's /embed_sparse, the Batch API, requests of different k at
once) and from the embed command."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import openai
import pyarrow.parquet as pq
import pytest
from numpy.testing import assert_allclose
from sentence_transformers import SparseEncoder

from benchmarks.sparse_models import build_csr
from emb_model_provider.cli import main
from emb_model_provider.core.config import ENV_PREFIX
from emb_model_provider.encoders.base import EncoderInput, LatentSparseEncoder, LoadOptions
from emb_model_provider.encoders.csr import CsrModel
from emb_model_provider.encoders.sources import SourceError
from emb_model_provider.encoders.sparse import load_sparse_encoder
from emb_model_provider.encoders.tasks import detect_task
from tests.live import live_server, test_settings
from tests.test_batch_api import _line, _lines_of, _upload, _wait
from tests.tiny_text_models import text_models_file

CPU = LoadOptions(device="cpu", dtype="float32")
LATENTS = 256
TEXTS = [
    "how do foxes find food in winter",
    "Foxes hunt small rodents under the snow, listening for them before they pounce. " * 3,
    "x",
    "The stock market closed higher on Tuesday.",
    "Bake the bread for forty minutes at a high heat.",
]
PROMPTS = {"query": "query: ", "document": "passage: "}
#: Below the saved k (16), at it, above it, and every latent.
TOP_KS = [4, 16, 40, LATENTS]


@pytest.fixture(scope="module")
def csr(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Transformer + mean Pooling + SparseAutoEncoder(32 -> 256, k 16), no layer norm."""
    return build_csr(tmp_path_factory.mktemp("csr") / "m", hidden_dim=LATENTS, k=16)


@pytest.fixture(scope="module")
def csr_norm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Dense + Normalize before the autoencoder, its layer norm on, prompts, and a saved
    ``max_active_dims`` of 24 (above its k of 16: the saved one wins, as in the library)."""
    return build_csr(
        tmp_path_factory.mktemp("csr-norm") / "m",
        hidden_dim=LATENTS,
        k=16,
        normalize=True,
        dense_out=24,
        prompts=PROMPTS,
        max_active_dims=24,
        seed=1,
    )


def _dense(rows: Any) -> npt.NDArray[np.float32]:
    dense: npt.NDArray[np.float32] = rows.to_dense().numpy() if rows.is_sparse else rows.numpy()
    return dense


def _same(ours: npt.NDArray[np.float32], expected: npt.NDArray[np.float32]) -> None:
    assert ((ours != 0) == (expected != 0)).all()  # the same non-zero terms
    assert_allclose(ours, expected, rtol=0, atol=1e-4)


def _library(path: Path, prompt_name: str | None = None, k: int | None = None) -> Any:
    reference = SparseEncoder(str(path), device="cpu")
    encode = {
        None: reference.encode,
        "query": reference.encode_query,
        "document": reference.encode_document,
    }[prompt_name]
    return _dense(encode(TEXTS, max_active_dims=k))


def _load(path: Path) -> CsrModel:
    encoder = load_sparse_encoder(str(path), revision=None, max_input_tokens=None, options=CPU)
    assert isinstance(encoder, CsrModel)
    return encoder


def _ours(encoder: CsrModel, prompt_name: str | None, k: int | None) -> npt.NDArray[np.float32]:
    inputs: list[EncoderInput] = list(TEXTS)
    prepared = encoder.prepare(inputs, truncate=True, prompt=encoder.prompt_text(prompt_name))
    return encoder.sparsify(encoder.encode(prepared), k)


# -- the encoder against sentence-transformers --------------------------------------------------


def test_task_is_read_from_the_files(csr: Path, tmp_path: Path) -> None:
    assert detect_task(csr) == "sparse"
    copy = Path(shutil.copytree(csr, tmp_path / "copy"))
    (copy / "config_sentence_transformers.json").unlink()  # modules.json alone says it too
    assert detect_task(copy) == "sparse"


@pytest.mark.parametrize("model", ["csr", "csr_norm"])
@pytest.mark.parametrize("prompt_name", [None, "query", "document"])
def test_vectors_are_sparse_encoder_encode(
    request: pytest.FixtureRequest, model: str, prompt_name: str | None
) -> None:
    path: Path = request.getfixturevalue(model)
    encoder = _load(path)
    assert isinstance(encoder, LatentSparseEncoder)
    assert encoder.dimensions == LATENTS
    saved = 24 if model == "csr_norm" else 16
    assert encoder.max_active_dims == saved == SparseEncoder(str(path)).max_active_dims
    expected = _library(path, prompt_name)
    _same(_ours(encoder, prompt_name, None), expected)
    assert ((expected != 0).sum(axis=1) == saved).all()
    if model == "csr_norm" and prompt_name == "query":  # the prompt changes the vectors
        assert not np.array_equal(expected != 0, _library(path) != 0)


@pytest.mark.parametrize("model", ["csr", "csr_norm"])
def test_max_active_dims_is_the_autoencoders_k(request: pytest.FixtureRequest, model: str) -> None:
    """A k above the saved one gives more non-zero terms, as ``encode(max_active_dims=k)``."""
    path: Path = request.getfixturevalue(model)
    encoder = _load(path)
    inputs: list[EncoderInput] = list(TEXTS)
    latents = encoder.encode(encoder.prepare(inputs, truncate=True))  # one forward for every k
    active = []
    for k in TOP_KS:
        expected = _library(path, k=k)
        _same(encoder.sparsify(latents, k), expected)
        active.append(int((expected != 0).sum()))
    assert active == sorted(active) and active[0] < active[-1]
    assert active[2] == 40 * len(TEXTS)  # 40 positive latents of each text


def test_usage_counts_the_librarys_tokens(csr_norm: Path) -> None:
    reference = SparseEncoder(str(csr_norm), device="cpu")
    encoder = _load(csr_norm)
    inputs: list[EncoderInput] = list(TEXTS)
    tokens = [len(reference.preprocess([text])["input_ids"][0]) for text in TEXTS]  # type: ignore[index]
    assert [item.n_tokens for item in encoder.prepare(inputs, truncate=True)] == tokens


def test_an_autoencoder_not_last_is_refused(csr: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(csr, tmp_path / "reordered"))
    modules = json.loads((copy / "modules.json").read_text(encoding="utf-8"))
    modules[1], modules[2] = modules[2], modules[1]
    (copy / "modules.json").write_text(json.dumps(modules), encoding="utf-8")
    with pytest.raises(SourceError, match="not the model's last module"):
        load_sparse_encoder(str(copy), revision=None, max_input_tokens=None, options=CPU)


def test_a_size_mismatch_is_refused(csr: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(csr, tmp_path / "mismatch"))
    config_file = copy / "2_SparseAutoEncoder" / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    (config_file).write_text(json.dumps({**config, "input_dim": 48}), encoding="utf-8")
    with pytest.raises(SourceError, match="encoder weight"):
        load_sparse_encoder(str(copy), revision=None, max_input_tokens=None, options=CPU)


# -- the live server ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server_url(
    csr: Path, csr_norm: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    models = text_models_file(
        tmp_path_factory.mktemp("models-file") / "models.yaml",
        [
            {"name": "csr", "source": str(csr)},
            {"name": "csr-norm", "source": str(csr_norm)},
            # A models-file dimensions is the default top-k (here above the saved k).
            {"name": "csr-top40", "source": str(csr), "dimensions": 40},
        ],
    )
    with live_server(test_settings(models_file=models, cache="memory")) as url:
        yield url


@pytest.fixture(scope="module")
def client(server_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def http(server_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server_url, timeout=60) as session:
        yield session


def _from_pairs(indices: list[int], values: list[float]) -> npt.NDArray[np.float32]:
    row = np.zeros(LATENTS, dtype=np.float32)
    row[indices] = values
    return row


def _rows(response: Any) -> npt.NDArray[np.float32]:
    rows = []
    for item in response.data:
        embedding: Any = item.embedding  # the SDK keeps the object as it came
        assert isinstance(embedding, dict) and set(embedding) == {"indices", "values"}
        assert embedding["indices"] == sorted(embedding["indices"])
        rows.append(_from_pairs(embedding["indices"], embedding["values"]))
    return np.stack(rows)


@pytest.mark.parametrize(("model", "prompt_name"), [("csr", None), ("csr-norm", "query")])
def test_openai_sdk_gets_the_librarys_vectors(
    client: openai.OpenAI, csr: Path, csr_norm: Path, model: str, prompt_name: str | None
) -> None:
    expected = _library(csr if model == "csr" else csr_norm, prompt_name)
    extra = {"prompt_name": prompt_name} if prompt_name else None
    for _ in range(2):  # the second answer comes from the result cache
        response = client.embeddings.create(
            model=model, input=TEXTS, encoding_format="float", extra_body=extra
        )
        _same(_rows(response), expected)


def test_dimensions_below_and_above_the_saved_k(client: openai.OpenAI, csr: Path) -> None:
    """Each k from the same cached latents: the cache holds them whatever the k."""
    for k in TOP_KS:
        response = client.embeddings.create(
            model="csr", input=TEXTS, encoding_format="float", dimensions=k
        )
        _same(_rows(response), _library(csr, k=k))


def test_models_file_dimensions_is_the_default_k(client: openai.OpenAI, csr: Path) -> None:
    response = client.embeddings.create(model="csr-top40", input=TEXTS, encoding_format="float")
    _same(_rows(response), _library(csr, k=40))
    narrower = client.embeddings.create(
        model="csr-top40", input=TEXTS, encoding_format="float", dimensions=4
    )
    _same(_rows(narrower), _library(csr, k=4))


def test_requests_of_different_k_at_once(client: openai.OpenAI, csr_norm: Path) -> None:
    """Concurrent requests (the batcher may merge them), each with its own k, each correct."""
    asks: list[int | None] = [None, 3, 16, 24, 60, LATENTS, 7, None]
    expected = {k: _library(csr_norm, "document", k) for k in set(asks)}

    def ask(at: int) -> npt.NDArray[np.float32]:
        shift = at % len(TEXTS)
        texts = TEXTS[shift:] + TEXTS[:shift]  # the same texts, in another order each time
        extra: dict[str, Any] = {"prompt_name": "document"}
        if asks[at] is not None:
            extra["dimensions"] = asks[at]
        response = client.embeddings.create(
            model="csr-norm", input=texts, encoding_format="float", extra_body=extra
        )
        return _rows(response)

    with ThreadPoolExecutor(max_workers=len(asks)) as pool:
        answers = list(pool.map(ask, range(len(asks))))
    for at, (k, rows) in enumerate(zip(asks, answers, strict=True)):
        _same(rows, np.roll(expected[k], -(at % len(TEXTS)), axis=0))


def test_dimensions_above_the_latents_is_refused(http: httpx.Client) -> None:
    response = http.post(
        "/v1/embeddings",
        json={"model": "csr", "input": "a fox", "encoding_format": "float", "dimensions": 257},
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "dimensions" and "1 to 256" in error["message"]


def test_models_lists_the_latents(client: openai.OpenAI) -> None:
    client.embeddings.create(model="csr", input="load it", encoding_format="float")
    card: Any = next(model for model in client.models.list().data if model.id == "csr")
    assert card.dimensions == LATENTS == card.max_dimensions


def test_tei_embed_sparse(http: httpx.Client, csr_norm: Path, csr: Path) -> None:
    response = http.post(
        "/embed_sparse",
        json={"inputs": TEXTS, "prompt_name": "document", "model": "csr-norm"},
    )
    assert response.status_code == 200, response.text
    rows = [
        _from_pairs([term["index"] for term in terms], [term["value"] for term in terms])
        for terms in response.json()
    ]
    _same(np.stack(rows), _library(csr_norm, "document"))
    # The models file's dimensions is the default k here too.
    top40 = http.post("/embed_sparse", json={"inputs": TEXTS, "model": "csr-top40"})
    rows = [
        _from_pairs([term["index"] for term in terms], [term["value"] for term in terms])
        for terms in top40.json()
    ]
    _same(np.stack(rows), _library(csr, k=40))


def test_batch_api_lines(server_url: str, csr: Path) -> None:
    client = openai.OpenAI(base_url=f"{server_url}/v1", api_key="unused", max_retries=0)
    lines = [
        _line("k", {"model": "csr", "input": TEXTS, "encoding_format": "float", "dimensions": 40}),
        _line("saved", {"model": "csr", "input": TEXTS, "encoding_format": "float"}),
    ]
    batch = client.batches.create(
        input_file_id=_upload(client, lines), endpoint="/v1/embeddings", completion_window="24h"
    )
    done = _wait(client, batch.id)
    assert done.status == "completed", done.errors
    out = {line["custom_id"]: line["response"] for line in _lines_of(client, done.output_file_id)}
    for name, k in (("k", 40), ("saved", None)):
        rows = [
            _from_pairs(item["embedding"]["indices"], item["embedding"]["values"])
            for item in out[name]["body"]["data"]
        ]
        _same(np.stack(rows), _library(csr, k=k))


# -- the embed command --------------------------------------------------------------------------


def _parquet_rows(output: Path) -> npt.NDArray[np.float32]:
    table = pq.read_table(output)
    assert (table.schema.metadata or {})[b"dimensions"] == str(LATENTS).encode()
    rows = np.zeros((table.num_rows, LATENTS), dtype=np.float32)
    pairs = zip(
        table.column("indices").to_pylist(), table.column("values").to_pylist(), strict=True
    )
    for row, (indices, values) in enumerate(pairs):
        rows[row, indices] = values
    return rows


@pytest.fixture
def corpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The texts as JSON lines; none of the developer's EMB_PROVIDER_*, one torch thread."""
    for key in list(os.environ):
        if key.startswith(ENV_PREFIX):
            monkeypatch.delenv(key)
    monkeypatch.setenv(f"{ENV_PREFIX}NUM_THREADS", "1")
    source = tmp_path / "corpus.jsonl"
    lines = [json.dumps({"id": f"doc-{i}", "text": text}) for i, text in enumerate(TEXTS)]
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return source


@pytest.mark.parametrize("flags", [(), ("--dimensions", "40")])
def test_embed_command(
    csr_norm: Path, corpus: Path, tmp_path: Path, flags: tuple[str, ...]
) -> None:
    models = text_models_file(
        tmp_path / "models.yaml", [{"name": "csr-norm", "source": str(csr_norm)}]
    )
    output = tmp_path / "csr.parquet"
    args = ["embed", str(corpus), "-o", str(output), "--models-file", str(models)]
    assert main([*args, "--device", "cpu", "--model", "csr-norm", "--batch-size", "2", *flags]) == 0
    _same(_parquet_rows(output), _library(csr_norm, k=40 if flags else None))


@pytest.mark.parametrize(
    ("flags", "k"), [(("--model", "csr-top40"), 40), (("--model", "csr", "--dimensions", "60"), 60)]
)
def test_embed_command_through_the_server(
    server_url: str, csr: Path, corpus: Path, tmp_path: Path, *, flags: tuple[str, ...], k: int
) -> None:
    output = tmp_path / "remote.parquet"
    args = ["embed", str(corpus), "-o", str(output), "--url", server_url, "--batch-size", "2"]
    assert main([*args, *flags]) == 0
    _same(_parquet_rows(output), _library(csr, k=k))
    assert (pq.read_schema(output).metadata or {})[b"top_k"] == str(k).encode()


def test_embed_command_refuses_a_k_above_the_latents(
    csr: Path, corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    models = text_models_file(tmp_path / "models.yaml", [{"name": "csr", "source": str(csr)}])
    args = ["embed", str(corpus), "-o", str(tmp_path / "out.parquet"), "--models-file", str(models)]
    assert main([*args, "--device", "cpu", "--model", "csr", "--dimensions", "257"]) != 0
    assert "ask for 1 to 256" in capsys.readouterr().err
