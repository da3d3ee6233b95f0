"""Sparse (SPLADE) models: vectors equal to sentence-transformers' ``SparseEncoder`` on the same
weights (prompts, truncation, ``max_active_dims``), the task read from the model's files, and the
routes that serve them (/v1/embeddings through the openai SDK, TEI's /embed_sparse) on a live
server."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from numpy.testing import assert_allclose
from qdrant_client import QdrantClient, models
from sentence_transformers import SentenceTransformer, SparseEncoder

from benchmarks.sparse_models import build_splade
from emb_model_provider.encoders.base import EncoderInput, LoadOptions
from emb_model_provider.encoders.sparse import SparseModel, load_sparse_encoder
from emb_model_provider.encoders.tasks import detect_task
from tests.conftest import DEFAULT_MODEL
from tests.live import live_server, test_settings
from tests.test_batch_api import _line, _lines_of, _upload, _wait
from tests.tiny_text_models import text_models_file

CPU = LoadOptions(device="cpu", dtype="float32")
MAX_LENGTH = 24
TEXTS = [
    "how do foxes find food in winter",
    "Foxes hunt small rodents under the snow, listening for them before they pounce. " * 3,
    "x",
    "The stock market closed higher on Tuesday.",
]
PROMPTS = {"query": "query: ", "document": "passage: "}


@pytest.fixture(scope="module")
def splade(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_splade(tmp_path_factory.mktemp("splade") / "m", max_seq_length=MAX_LENGTH)


@pytest.fixture(scope="module")
def splade_prompts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """With query and document prompts, sum pooling and log1p_relu, saved top-k of 40."""
    return build_splade(
        tmp_path_factory.mktemp("splade-prompts") / "m",
        prompts=PROMPTS,
        pooling="sum",
        activation="log1p_relu",
        max_active_dims=40,
        max_seq_length=MAX_LENGTH,
        seed=1,
    )


def _dense(rows: Any) -> np.ndarray:
    dense: np.ndarray = rows.to_dense().numpy() if rows.is_sparse else rows.numpy()
    return dense


def _tokens(reference: SparseEncoder, texts: list[str]) -> list[int]:
    return [
        len(reference.preprocess([text])["input_ids"][0])  # type: ignore[index]
        for text in texts
    ]


def _ours(encoder: SparseModel, texts: list[str], prompt_name: str | None) -> np.ndarray:
    inputs: list[EncoderInput] = list(texts)
    prepared = encoder.prepare(inputs, truncate=True, prompt=encoder.prompt_text(prompt_name))
    return encoder.encode(prepared)


def _same(ours: np.ndarray, expected: np.ndarray) -> None:
    assert ((ours != 0) == (expected != 0)).all()  # the same non-zero terms
    assert_allclose(ours, expected, rtol=0, atol=1e-4)


# -- the encoder against sentence-transformers --------------------------------------------------


def test_task_is_read_from_the_files(splade: Path, tmp_path: Path) -> None:
    assert detect_task(splade) == "sparse"
    # modules.json alone says it too (an older save without the model type)
    copy = Path(shutil.copytree(splade, tmp_path / "copy"))
    (copy / "config_sentence_transformers.json").unlink()
    assert detect_task(copy) == "sparse"


def test_vectors_are_sparse_encoder_encode(splade: Path) -> None:
    reference = SparseEncoder(str(splade), device="cpu")
    encoder = load_sparse_encoder(str(splade), revision=None, max_input_tokens=None, options=CPU)
    assert encoder.max_input_tokens == MAX_LENGTH
    expected = _dense(reference.encode(TEXTS, batch_size=2))
    ours = _ours(encoder, TEXTS, None)
    _same(ours, expected)
    active = (expected != 0).sum(axis=1)
    assert (active > 10).all() and (active < 3000).all()  # sparse, but not trivially
    # Usage counts the tokens the model processed, the truncated text's.
    tokens = _tokens(reference, TEXTS)
    inputs: list[EncoderInput] = list(TEXTS)
    assert [item.n_tokens for item in encoder.prepare(inputs, truncate=True)] == tokens


@pytest.mark.parametrize("prompt_name", [None, "query", "document"])
def test_prompts_and_max_active_dims_as_the_library(
    splade_prompts: Path, prompt_name: str | None
) -> None:
    reference = SparseEncoder(str(splade_prompts), device="cpu")
    assert reference.max_active_dims == 40
    encode = {
        None: reference.encode,
        "query": reference.encode_query,
        "document": reference.encode_document,
    }[prompt_name]
    expected = _dense(encode(TEXTS))
    encoder = load_sparse_encoder(
        str(splade_prompts), revision=None, max_input_tokens=None, options=CPU
    )
    ours = _ours(encoder, TEXTS, prompt_name)
    _same(ours, expected)
    assert ((expected != 0).sum(axis=1) == 40).all()
    if prompt_name == "query":  # the prompt changes the vectors
        assert not np.allclose(ours, _ours(encoder, TEXTS, None))


# -- the live server ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server_url(
    splade: Path, splade_prompts: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("models-file")
    models = text_models_file(
        folder / "models.yaml",
        [
            {"name": "splade", "source": str(splade)},
            {"name": "splade-prompts", "source": str(splade_prompts)},
            # A models-file dimensions is the default top-k.
            {"name": "splade-top5", "source": str(splade), "dimensions": 5},
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


def _from_pairs(indices: list[int], values: list[float]) -> np.ndarray:
    row = np.zeros(30522, dtype=np.float32)
    row[indices] = values
    return row


@pytest.mark.parametrize(("model", "prompt_name"), [("splade", None), ("splade-prompts", "query")])
def test_openai_sdk_gets_indices_and_values(
    client: openai.OpenAI, splade: Path, splade_prompts: Path, model: str, prompt_name: str | None
) -> None:
    reference = SparseEncoder(str(splade if model == "splade" else splade_prompts), device="cpu")
    expected = _dense(
        reference.encode_query(TEXTS) if prompt_name == "query" else reference.encode(TEXTS)
    )
    extra = {"prompt_name": prompt_name} if prompt_name else None
    # Twice: the second answer comes from the result cache.
    for _ in range(2):
        response = client.embeddings.create(
            model=model, input=TEXTS, encoding_format="float", extra_body=extra
        )
        rows = []
        for item in response.data:
            # The SDK keeps the object as it came (its type says list[float]).
            embedding: Any = item.embedding
            assert isinstance(embedding, dict) and set(embedding) == {"indices", "values"}
            assert embedding["indices"] == sorted(embedding["indices"])
            rows.append(_from_pairs(embedding["indices"], embedding["values"]))
        _same(np.stack(rows), expected)
    tokens = sum(_tokens(reference, TEXTS))
    if prompt_name is None:
        assert response.usage.prompt_tokens == tokens


def test_dimensions_keeps_the_top_k(client: openai.OpenAI, splade: Path) -> None:
    reference = SparseEncoder(str(splade), device="cpu")
    expected = _dense(reference.encode(TEXTS, max_active_dims=7))
    response = client.embeddings.create(
        model="splade", input=TEXTS, encoding_format="float", dimensions=7
    )
    rows = [
        _from_pairs(item.embedding["indices"], item.embedding["values"])  # type: ignore[call-overload]
        for item in response.data
    ]
    _same(np.stack(rows), expected)


def test_models_file_dimensions_is_the_default_top_k(client: openai.OpenAI, splade: Path) -> None:
    reference = SparseEncoder(str(splade), device="cpu")
    response = client.embeddings.create(model="splade-top5", input=TEXTS, encoding_format="float")
    rows = [
        _from_pairs(item.embedding["indices"], item.embedding["values"])  # type: ignore[call-overload]
        for item in response.data
    ]
    _same(np.stack(rows), _dense(reference.encode(TEXTS, max_active_dims=5)))
    # A request's dimensions still wins.
    wider = client.embeddings.create(
        model="splade-top5", input=TEXTS[0], encoding_format="float", dimensions=9
    )
    assert len(wider.data[0].embedding["indices"]) == 9  # type: ignore[call-overload]


@pytest.mark.parametrize("encoding_format", [None, "base64", "int8", "ubinary"])
def test_other_encodings_are_refused(http: httpx.Client, encoding_format: str | None) -> None:
    body: dict[str, Any] = {"model": "splade", "input": ["a fox"]}
    if encoding_format is not None:
        body["encoding_format"] = encoding_format
    else:  # what the openai SDK sends unless told: base64
        body["encoding_format"] = "base64"
    response = http.post("/v1/embeddings", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "encoding_format"
    assert "encoding_format float" in error["message"]


def test_tei_embed_sparse(http: httpx.Client, splade_prompts: Path) -> None:
    reference = SparseEncoder(str(splade_prompts), device="cpu")
    expected = _dense(reference.encode_document(TEXTS))
    response = http.post(
        "/embed_sparse",
        json={"inputs": TEXTS, "prompt_name": "document", "model": "splade-prompts"},
    )
    assert response.status_code == 200, response.text
    answer = response.json()
    assert len(answer) == len(TEXTS)
    rows = [
        _from_pairs([term["index"] for term in terms], [term["value"] for term in terms])
        for terms in answer
    ]
    _same(np.stack(rows), expected)
    # One text, not a list; and truncate false refuses an over-long text in TEI's error shape.
    single = http.post("/embed_sparse", json={"inputs": TEXTS[0], "model": "splade"})
    assert single.status_code == 200 and len(single.json()) == 1
    refused = http.post(
        "/embed_sparse", json={"inputs": TEXTS[1], "model": "splade", "truncate": False}
    )
    assert refused.status_code in (400, 413, 422), refused.text
    assert set(refused.json()) == {"error", "error_type"}


def test_a_sparse_model_is_refused_where_vectors_are_dense(http: httpx.Client) -> None:
    response = http.post("/embed", json={"inputs": "a fox", "model": "splade"})
    assert response.status_code == 400
    assert "/embed_sparse" in response.json()["error"]
    wrong = http.post("/v1/rerank", json={"model": "splade", "query": "a", "documents": ["b"]})
    assert wrong.status_code == 400
    assert wrong.json()["error"]["code"] == "wrong_model_task"


# -- bulk: the Batch API carries sparse bodies (the embed command: tests/test_offline_sparse.py) --


def test_batch_api_lines_get_sparse_bodies(server_url: str, splade: Path) -> None:
    client = openai.OpenAI(base_url=f"{server_url}/v1", api_key="unused", max_retries=0)
    lines = [
        _line("ok", {"model": "splade", "input": TEXTS, "encoding_format": "float"}),
        _line("base64", {"model": "splade", "input": TEXTS[0], "encoding_format": "base64"}),
    ]
    batch = client.batches.create(
        input_file_id=_upload(client, lines), endpoint="/v1/embeddings", completion_window="24h"
    )
    done = _wait(client, batch.id)
    assert done.status == "completed", done.errors
    out = {line["custom_id"]: line["response"] for line in _lines_of(client, done.output_file_id)}
    errors = {line["custom_id"]: line["response"] for line in _lines_of(client, done.error_file_id)}
    rows = [
        _from_pairs(item["embedding"]["indices"], item["embedding"]["values"])
        for item in out["ok"]["body"]["data"]
    ]
    _same(np.stack(rows), _dense(SparseEncoder(str(splade), device="cpu").encode(TEXTS)))
    assert errors["base64"]["status_code"] == 400


# -- hybrid search in Qdrant (local mode): the docs/integrations.md example -----------------------

CORPUS = [
    "Foxes hunt small rodents under the snow in winter.",
    "The stock market closed higher on Tuesday.",
    "Bake the bread for forty minutes at a high heat.",
    "A red fox eats mice and voles when the ground is frozen.",
    "Bond yields climbed again as inflation stayed high.",
]


def test_qdrant_hybrid_dense_and_sparse(
    client: openai.OpenAI, splade: Path, reference: SentenceTransformer
) -> None:
    dense = client.embeddings.create(model=DEFAULT_MODEL, input=CORPUS).data
    sparse = client.embeddings.create(model="splade", input=CORPUS, encoding_format="float").data
    store = QdrantClient(":memory:")
    store.create_collection(
        "hybrid",
        vectors_config={"dense": models.VectorParams(size=384, distance=models.Distance.COSINE)},
        sparse_vectors_config={"sparse": models.SparseVectorParams()},
    )
    store.upsert(
        "hybrid",
        points=[
            models.PointStruct(
                id=index,
                vector={
                    "dense": dense[index].embedding,
                    "sparse": models.SparseVector(**sparse[index].embedding),  # type: ignore[arg-type]
                },
            )
            for index in range(len(CORPUS))
        ],
    )
    query = CORPUS[3]
    query_dense = client.embeddings.create(model=DEFAULT_MODEL, input=query).data[0].embedding
    query_sparse: Any = (
        client.embeddings.create(model="splade", input=query, encoding_format="float")
        .data[0]
        .embedding
    )
    # The sparse side alone ranks as the library's vectors do (dot product).
    library = _dense(SparseEncoder(str(splade), device="cpu").encode([*CORPUS, query]))
    scores = library[:-1] @ library[-1]
    hits = store.query_points(
        "hybrid", query=models.SparseVector(**query_sparse), using="sparse", limit=5
    ).points
    assert [hit.id for hit in hits] == [int(i) for i in np.argsort(-scores, kind="stable")]
    assert_allclose([hit.score for hit in hits], np.sort(scores)[::-1], rtol=1e-4)
    # The dense side alone, as sentence-transformers ranks it.
    vectors = reference.encode([*CORPUS, query], normalize_embeddings=True)
    dense_order = [int(i) for i in np.argsort(-(vectors[:-1] @ vectors[-1]))]
    dense_hits = store.query_points("hybrid", query=query_dense, using="dense", limit=5).points
    assert [hit.id for hit in dense_hits] == dense_order
    # Both, fused by reciprocal rank: the text itself is first on both sides, so first here.
    fused = store.query_points(
        "hybrid",
        prefetch=[
            models.Prefetch(query=query_dense, using="dense", limit=5),
            models.Prefetch(query=models.SparseVector(**query_sparse), using="sparse", limit=5),
        ],
        query=models.FusionQuery(fusion=models.Fusion.RRF),
        limit=3,
    ).points
    assert fused[0].id == 3 == dense_order[0] == int(np.argmax(scores))
    store.close()
