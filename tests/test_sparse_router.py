"""Inference-free SPLADE: a ``SparseEncoder`` whose ``Router`` sends queries through a
``SparseStaticEmbedding`` (one learned weight per vocabulary term) and documents through an MLM
transformer + ``SpladePooling``. Vectors equal the library's ``encode_query`` /
``encode_document`` / ``encode`` on the same weights (prompts and ``max_active_dims`` included),
the route chosen as the library chooses it, requests of different routes batched together
without mixing, and the served model on a live server (/v1/embeddings through the openai SDK,
TEI's /embed_sparse, the result cache, /v1/models)."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import torch
from numpy.testing import assert_allclose
from sentence_transformers import SparseEncoder
from sentence_transformers.base.modules import Router
from sentence_transformers.sparse_encoder.modules import SparseStaticEmbedding

from benchmarks.sparse_models import build_splade
from emb_model_provider.core.errors import ContextLengthExceeded
from emb_model_provider.encoders.base import EncoderInput, LoadOptions
from emb_model_provider.encoders.sources import SourceError
from emb_model_provider.encoders.sparse import SparseModel, load_sparse_encoder
from emb_model_provider.encoders.tasks import detect_task
from tests.live import live_server, test_settings
from tests.tiny_text_models import text_models_file

CPU = LoadOptions(device="cpu", dtype="float32")
MAX_LENGTH = 24
TEXTS = [
    "how do foxes find food in winter",
    "Foxes hunt small rodents under the snow, listening for them before they pounce. " * 3,
    "x",
    "The stock market closed higher on Tuesday.",
    "",
]
#: The server refuses empty strings, as OpenAI does.
LIVE = TEXTS[:-1]
PROMPTS = {"query": "query: ", "document": "passage: "}
#: The library's method for each of our prompt names (None: ``encode``, no task).
Encode = Callable[..., Any]


def build_inference_free_splade(
    path: Path,
    *,
    routes: tuple[str, str] = ("query", "document"),
    default_route: str | None = "document",
    allow_empty_key: bool = True,
    route_mappings: Mapping[tuple[str | None, str | None], str] | None = None,
    prompts: Mapping[str, str] | None = None,
    max_active_dims: int | None = None,
    seed: int = 0,
) -> Path:
    """A random inference-free SPLADE saved with ``SparseEncoder.save``: a Router whose first
    route is a ``SparseStaticEmbedding`` (random weights, a fifth of the terms zero) and whose
    second is a tiny random BERT MLM + ``SpladePooling``, the static route sharing the
    transformer's tokenizer (as ``Router.for_query_document`` examples build it)."""
    with tempfile.TemporaryDirectory() as staging:
        splade = SparseEncoder(
            str(build_splade(Path(staging) / "doc", max_seq_length=MAX_LENGTH, seed=seed)),
            device="cpu",
        )
        transformer, pooling = splade[0], splade[1]
        generator = torch.Generator().manual_seed(seed)
        vocabulary = len(transformer.tokenizer.get_vocab())
        weight = torch.rand(vocabulary, generator=generator) * 3
        weight[torch.rand(vocabulary, generator=generator) < 0.2] = 0
        static = SparseStaticEmbedding(tokenizer=transformer.tokenizer, weight=weight, frozen=True)
        router = Router(
            {routes[0]: [static], routes[1]: [transformer, pooling]},
            default_route=default_route,
            allow_empty_key=allow_empty_key,
            route_mappings=dict(route_mappings) if route_mappings else None,
        )
        model = SparseEncoder(
            modules=[router],
            prompts=dict(prompts) if prompts else None,
            max_active_dims=max_active_dims,
            device="cpu",
        )
        model.save(str(path))
    return path


@pytest.fixture(scope="module")
def inference_free(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_inference_free_splade(tmp_path_factory.mktemp("if-splade") / "m")


@pytest.fixture(scope="module")
def with_prompts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Prompts on both routes and a saved top-k of 30."""
    return build_inference_free_splade(
        tmp_path_factory.mktemp("if-splade-prompts") / "m",
        prompts=PROMPTS,
        max_active_dims=30,
        seed=1,
    )


@pytest.fixture(scope="module")
def mapped(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Routes named otherwise, reached through route_mappings; the default is the static one."""
    return build_inference_free_splade(
        tmp_path_factory.mktemp("if-splade-mapped") / "m",
        routes=("static", "splade"),
        default_route="static",
        route_mappings={("query", None): "static", ("document", "text"): "splade"},
        seed=2,
    )


@pytest.fixture(scope="module")
def no_default(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """No default route: the library's ``encode`` without a task raises."""
    return build_inference_free_splade(
        tmp_path_factory.mktemp("if-splade-no-default") / "m",
        default_route=None,
        allow_empty_key=False,
        seed=3,
    )


def _dense(rows: Any) -> np.ndarray:
    dense: np.ndarray = rows.to_dense().numpy() if rows.is_sparse else rows.numpy()
    return dense


def _same(ours: np.ndarray, expected: np.ndarray) -> None:
    assert ((ours != 0) == (expected != 0)).all()  # the same non-zero terms
    assert_allclose(ours, expected, rtol=0, atol=1e-4)


def _library(reference: SparseEncoder, prompt_name: str | None) -> Encode:
    return {
        None: reference.encode,
        "query": reference.encode_query,
        "document": reference.encode_document,
    }[prompt_name]


def _ours(encoder: SparseModel, texts: list[str], prompt_name: str | None) -> np.ndarray:
    inputs: list[EncoderInput] = list(texts)
    prepared = encoder.prepare(
        inputs,
        truncate=True,
        prompt=encoder.prompt_text(prompt_name),
        route=encoder.route(prompt_name),
    )
    return encoder.encode(prepared)


def _load(path: Path) -> SparseModel:
    return load_sparse_encoder(str(path), revision=None, max_input_tokens=None, options=CPU)


# -- the encoder against sentence-transformers --------------------------------------------------


def test_task_is_read_from_the_files(inference_free: Path) -> None:
    assert detect_task(inference_free) == "sparse"


@pytest.mark.parametrize("prompt_name", [None, "query", "document"])
@pytest.mark.parametrize("model", ["inference_free", "with_prompts", "mapped"])
def test_routes_are_the_librarys(
    request: pytest.FixtureRequest, model: str, prompt_name: str | None
) -> None:
    path: Path = request.getfixturevalue(model)
    reference = SparseEncoder(str(path), device="cpu")
    expected = _dense(_library(reference, prompt_name)(TEXTS))
    encoder = _load(path)
    _same(_ours(encoder, TEXTS, prompt_name), expected)
    active = (expected[:-1] != 0).sum(axis=1)  # the empty text has no terms on either route
    assert (active > 0).all()
    if model == "with_prompts":  # the saved top-k cuts the document route's longer vectors
        assert (active <= 30).all()
        assert (active == 30).any() == (prompt_name != "query")


def test_the_routes_differ_and_usage_counts_each_routes_tokens(inference_free: Path) -> None:
    """The static route counts its tokens without special tokens, truncated at the tokenizer's
    model_max_length; the document route as any SPLADE."""
    reference = SparseEncoder(str(inference_free), device="cpu")
    encoder = _load(inference_free)
    assert encoder.max_input_tokens == MAX_LENGTH
    query, document = _ours(encoder, TEXTS, "query"), _ours(encoder, TEXTS, "document")
    assert not np.allclose(query, document)
    inputs: list[EncoderInput] = list(TEXTS)
    for task in ("query", "document"):
        features = reference.preprocess(TEXTS, task=task)
        expected = features["attention_mask"].sum(dim=1).tolist()  # type: ignore[index]
        prepared = encoder.prepare(inputs, truncate=True, route=task)
        assert [item.n_tokens for item in prepared] == expected


def test_a_batch_of_both_routes_is_each_routes(with_prompts: Path) -> None:
    """The batcher merges requests of different routes into one ``encode``: each row is still
    its own route's, in its place."""
    encoder = _load(with_prompts)
    inputs: list[EncoderInput] = list(TEXTS)
    queries = encoder.prepare(inputs, truncate=True, prompt=PROMPTS["query"], route="query")
    documents = encoder.prepare(inputs, truncate=True, prompt=PROMPTS["document"], route="document")
    mixed = [item for pair in zip(queries, documents, strict=True) for item in pair]
    rows = encoder.encode(mixed)
    assert_allclose(rows[0::2], encoder.encode(queries), rtol=0, atol=0)
    assert_allclose(rows[1::2], encoder.encode(documents), rtol=0, atol=1e-6)


def test_each_route_truncates_at_its_own_limit(inference_free: Path, tmp_path: Path) -> None:
    """A static route whose tokenizer says 12 tokens truncates there, as the library does, while
    the document route keeps 24; with truncation off, a query over 12 tokens is refused."""
    copy = Path(shutil.copytree(inference_free, tmp_path / "short-query"))
    config_file = copy / "query_0_SparseStaticEmbedding" / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["model_max_length"] = 12
    config_file.write_text(json.dumps(config), encoding="utf-8")
    reference = SparseEncoder(str(copy), device="cpu")
    encoder = _load(copy)
    assert encoder.max_input_tokens == MAX_LENGTH
    for prompt_name in ("query", "document"):
        _same(_ours(encoder, TEXTS, prompt_name), _dense(_library(reference, prompt_name)(TEXTS)))
    long_text: list[EncoderInput] = [TEXTS[1]]
    assert encoder.prepare(long_text, truncate=True, route="query")[0].n_tokens == 12
    with pytest.raises(ContextLengthExceeded, match="maximum context length is 12 tokens"):
        encoder.prepare(long_text, truncate=False, route="query")
    assert encoder.prepare(long_text, truncate=False, route="document")[0].n_tokens > MAX_LENGTH


def test_without_a_default_route_a_task_is_needed(no_default: Path) -> None:
    reference = SparseEncoder(str(no_default), device="cpu")
    with pytest.raises(ValueError, match="route"):
        reference.encode(TEXTS)
    encoder = _load(no_default)
    with pytest.raises(ValueError, match="no default route"):
        encoder.route(None)
    with pytest.raises(ValueError, match="no default route"):
        encoder.route("classification")  # a prompt name that is not a task is encode's
    _same(_ours(encoder, TEXTS, "query"), _dense(reference.encode_query(TEXTS)))


def test_unsupported_routes_are_refused(inference_free: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(inference_free, tmp_path / "copy"))
    config_file = copy / "router_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["structure"]["query"] = ["query_0_SparseStaticEmbedding", "document_1_SpladePooling"]
    config_file.write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(SourceError, match="route 'query' has modules"):
        _load(copy)


# -- the live server ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server_url(
    inference_free: Path,
    with_prompts: Path,
    no_default: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("models-file")
    models = text_models_file(
        folder / "models.yaml",
        [
            {"name": "if-splade", "source": str(inference_free)},
            {"name": "if-prompts", "source": str(with_prompts)},
            {"name": "if-no-default", "source": str(no_default)},
        ],
    )
    # The result cache on: the same text on two routes must not share an entry.
    with live_server(test_settings(models_file=models, cache="memory")) as url:
        yield url


@pytest.fixture(scope="module")
def client(server_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def http(server_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server_url, timeout=60) as session:
        yield session


def _rows(response: Any) -> np.ndarray:
    rows = []
    for item in response.data:
        embedding: Any = item.embedding  # the SDK keeps the {indices, values} object as it came
        assert embedding["indices"] == sorted(embedding["indices"])
        row = np.zeros(30522, dtype=np.float32)
        row[embedding["indices"]] = embedding["values"]
        rows.append(row)
    return np.stack(rows)


@pytest.mark.parametrize("model", ["if-splade", "if-prompts"])
def test_openai_sdk_prompt_name_picks_the_route(
    client: openai.OpenAI, inference_free: Path, with_prompts: Path, model: str
) -> None:
    reference = SparseEncoder(str(inference_free if model == "if-splade" else with_prompts))
    # Each name twice, in turn: the second answers come from the result cache, which keeps the
    # routes apart even where their prompts are the same (empty) text.
    for _ in range(2):
        for prompt_name in ("query", "document", None):
            extra = {"prompt_name": prompt_name} if prompt_name else None
            response = client.embeddings.create(
                model=model, input=LIVE, encoding_format="float", extra_body=extra
            )
            _same(_rows(response), _dense(_library(reference, prompt_name)(LIVE)))
            features = reference.preprocess(
                LIVE,
                prompt=reference.prompts.get(prompt_name or "", None),
                task=prompt_name,
            )
            tokens = int(features["attention_mask"].sum())  # type: ignore[index]
            assert response.usage.prompt_tokens == tokens


def test_dimensions_is_the_top_k_on_either_route(
    client: openai.OpenAI, inference_free: Path
) -> None:
    reference = SparseEncoder(str(inference_free), device="cpu")
    for prompt_name in ("query", "document"):
        response = client.embeddings.create(
            model="if-splade",
            input=LIVE,
            encoding_format="float",
            dimensions=3,
            extra_body={"prompt_name": prompt_name},
        )
        expected = _dense(_library(reference, prompt_name)(LIVE, max_active_dims=3))
        _same(_rows(response), expected)


def test_tei_embed_sparse_prompt_name(http: httpx.Client, with_prompts: Path) -> None:
    reference = SparseEncoder(str(with_prompts), device="cpu")
    for prompt_name in ("query", "document"):
        response = http.post(
            "/embed_sparse",
            json={"inputs": LIVE, "prompt_name": prompt_name, "model": "if-prompts"},
        )
        assert response.status_code == 200, response.text
        rows = np.zeros((len(LIVE), 30522), dtype=np.float32)
        for row, terms in enumerate(response.json()):
            rows[row, [term["index"] for term in terms]] = [term["value"] for term in terms]
        _same(rows, _dense(_library(reference, prompt_name)(LIVE)))


def test_concurrent_requests_of_both_routes(client: openai.OpenAI, with_prompts: Path) -> None:
    """Requests of the two routes at once (the batcher may merge them): each gets its route's."""
    reference = SparseEncoder(str(with_prompts), device="cpu")
    expected = {name: _dense(_library(reference, name)(LIVE)) for name in ("query", "document")}
    jobs = [(name, index) for index in range(len(LIVE)) for name in ("query", "document")] * 2

    def one(job: tuple[str, int]) -> np.ndarray:
        name, index = job
        response = client.embeddings.create(
            model="if-prompts",
            input=[LIVE[index]],
            encoding_format="float",
            extra_body={"prompt_name": name},
        )
        return _rows(response)[0]

    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(one, jobs))
    for (name, index), row in zip(jobs, answers, strict=True):
        _same(row[None, :], expected[name][index][None, :])


def test_without_a_default_route_no_task_is_a_400(http: httpx.Client, no_default: Path) -> None:
    body: dict[str, Any] = {"model": "if-no-default", "input": LIVE, "encoding_format": "float"}
    refused = http.post("/v1/embeddings", json=body)
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert error["param"] == "prompt_name"
    assert "no default route" in error["message"] and "'query'" in error["message"]
    tei = http.post("/embed_sparse", json={"inputs": "a fox", "model": "if-no-default"})
    assert tei.status_code == 400 and set(tei.json()) == {"error", "error_type"}
    # A task gets its route; the server is still up.
    reference = SparseEncoder(str(no_default), device="cpu")
    answered = http.post("/v1/embeddings", json={**body, "prompt_name": "document"})
    assert answered.status_code == 200, answered.text
    rows = np.zeros((len(LIVE), 30522), dtype=np.float32)
    for row, item in enumerate(answered.json()["data"]):
        rows[row, item["embedding"]["indices"]] = item["embedding"]["values"]
    _same(rows, _dense(reference.encode_document(LIVE)))


def test_models_lists_the_routes(http: httpx.Client, client: openai.OpenAI) -> None:
    client.embeddings.create(model="if-splade", input="load it", encoding_format="float")
    card = http.get("/v1/models/if-splade").json()
    assert card["task"] == "sparse"
    assert card["dimensions"] == card["max_dimensions"] == 30522
    assert card["architecture"] == (
        "Router(query: SparseStaticEmbedding, document: BertForMaskedLM; default document)"
    )
    assert set(card["prompts"]) == {"query", "document"}
    assert card["max_input_tokens"] == MAX_LENGTH
