"""sentence-transformers models through a live server and the OpenAI SDK: prompts by
``extra_body`` and by a prompt-pinned name (one loaded model for both), usage equal to
sentence-transformers' token counts, the prompt in the cache key, /v1/models, and models with
code of their own, refused unless trust_remote_code allows them."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from fastapi import FastAPI
from sentence_transformers import SentenceTransformer

from benchmarks.families import build
from emb_model_provider.cli import main
from emb_model_provider.services.models import ModelManager
from tests.conftest import BUNDLED_DIR
from tests.live import live_app, live_server, test_settings
from tests.tiny_text_models import text_models_file, tiny_custom_code_model

PROMPTS = {"query": "query: ", "passage": "passage: "}
TEXTS = ["What is the capital of France?", "ünïcödé 日本語 🙂", "word " * 200, "a"]


@dataclass(frozen=True)
class Server:
    url: str
    app: FastAPI
    e5: Path
    custom: Path
    sentinel: Path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("text-e2e")
    e5 = build("mpnet", root / "e5", "tiny", prompts=PROMPTS, default_prompt_name="passage")
    custom, sentinel = tiny_custom_code_model(root / "custom")
    models_file = text_models_file(
        root / "models.yaml",
        [
            {"name": "e5", "source": str(e5)},
            {"name": "e5-query", "base": "e5", "prompt_name": "query"},
            {"name": "custom", "source": str(custom)},
            {"name": "custom-trusted", "source": str(custom), "trust_remote_code": True},
        ],
    )
    # The result cache on: its key must include the prompt.
    with live_app(test_settings(models_file=models_file, cache="memory")) as (url, app):
        yield Server(url, app, e5, custom, sentinel)


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def reference(server: Server) -> SentenceTransformer:
    return SentenceTransformer(str(server.e5), device="cpu")


def _vectors(response: object) -> np.ndarray:
    return np.array([item.embedding for item in response.data], dtype=np.float32)  # type: ignore[attr-defined]


def _tokens(reference: SentenceTransformer, prompt: str) -> int:
    return int(reference.preprocess(TEXTS, prompt=prompt)["attention_mask"].sum())


def _assert_same(got: np.ndarray, ref: np.ndarray) -> None:
    assert np.sum(got * ref, axis=1).min() >= 0.99999


def test_prompt_name_through_extra_body(
    client: openai.OpenAI, reference: SentenceTransformer
) -> None:
    response = client.embeddings.create(
        model="e5", input=TEXTS, extra_body={"prompt_name": "query"}
    )
    _assert_same(
        _vectors(response),
        reference.encode(TEXTS, prompt_name="query", normalize_embeddings=True),
    )
    assert response.usage.prompt_tokens == _tokens(reference, PROMPTS["query"])


def test_default_prompt_applies_without_a_name(
    client: openai.OpenAI, reference: SentenceTransformer
) -> None:
    response = client.embeddings.create(model="e5", input=TEXTS)
    _assert_same(_vectors(response), reference.encode(TEXTS, normalize_embeddings=True))
    assert response.usage.prompt_tokens == _tokens(reference, PROMPTS["passage"])


def test_pinned_name_shares_one_loaded_model(
    server: Server, client: openai.OpenAI, reference: SentenceTransformer
) -> None:
    by_name = client.embeddings.create(model="e5-query", input=TEXTS)
    assert by_name.model == "e5-query"
    _assert_same(
        _vectors(by_name),
        reference.encode(TEXTS, prompt_name="query", normalize_embeddings=True),
    )
    assert by_name.usage.prompt_tokens == _tokens(reference, PROMPTS["query"])
    # A request may still name another prompt on the pinned name.
    other = client.embeddings.create(
        model="e5-query", input=TEXTS, extra_body={"prompt_name": "passage"}
    )
    _assert_same(_vectors(other), reference.encode(TEXTS, normalize_embeddings=True))
    client.embeddings.create(model="e5", input="load it under its own name too")
    manager: ModelManager = server.app.state.models
    sources = [model.spec.source for model in manager.loaded_models()]
    assert sources.count(str(server.e5)) == 1


def test_unknown_prompt_name_is_a_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model="e5", input="x", extra_body={"prompt_name": "nope"})
    error = caught.value.body
    assert isinstance(error, dict)
    assert error["param"] == "prompt_name"
    assert "document, passage, query" in error["message"]
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(
            model="all-MiniLM-L6-v2", input="x", extra_body={"prompt_name": "passage"}
        )
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["param"] == "prompt_name"
    assert "document, query" in caught.value.body["message"]


def test_query_and_document_prompts_work_on_every_text_model(client: openai.OpenAI) -> None:
    """sentence-transformers 6 gives every model the prompts ``query`` and ``document`` (empty
    unless the model defines them): on a model that saved none (all-MiniLM-L6-v2, as
    all-mpnet-base-v2) both names are served as ``encode_query`` and ``encode_document``."""
    reference = SentenceTransformer(str(BUNDLED_DIR), device="cpu")
    expected = {
        "query": reference.encode_query(TEXTS, normalize_embeddings=True),
        "document": reference.encode_document(TEXTS, normalize_embeddings=True),
    }
    for name, ref in expected.items():
        response = client.embeddings.create(
            model="all-MiniLM-L6-v2", input=TEXTS, extra_body={"prompt_name": name}
        )
        _assert_same(_vectors(response), ref)
        assert response.usage.prompt_tokens == _tokens(reference, "")


def test_cache_key_includes_the_prompt(
    client: openai.OpenAI, reference: SentenceTransformer
) -> None:
    text = "the same text, three prompts"
    for _ in range(2):  # the second round is answered from the cache
        for prompt_name in ("query", "passage", "query"):
            response = client.embeddings.create(
                model="e5", input=[text], extra_body={"prompt_name": prompt_name}
            )
            _assert_same(
                _vectors(response),
                reference.encode([text], prompt_name=prompt_name, normalize_embeddings=True),
            )


def test_models_list_describes_text_models(server: Server, client: openai.OpenAI) -> None:
    client.embeddings.create(model="e5", input="load")
    with httpx.Client(base_url=server.url) as http:
        card = http.get("/v1/models/e5").json()
        pinned = http.get("/v1/models/e5-query").json()
        listed = {item["id"]: item for item in http.get("/v1/models").json()["data"]}
    assert card["architecture"] == "MPNetModel"
    assert card["pooling"] == "mean"
    assert card["prompts"] == {"query": "query: ", "passage": "passage: ", "document": ""}
    assert card["default_prompt_name"] == "passage"
    assert card["max_input_tokens"] == 128
    assert card["dimensions"] == 32
    assert pinned["base"] == "e5"
    assert pinned["default_prompt_name"] == "query"
    assert pinned["loaded"] is True
    assert listed["e5-query"]["architecture"] == "MPNetModel"


def test_custom_code_is_refused_unless_allowed(server: Server, client: openai.OpenAI) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        client.embeddings.create(model="custom", input="x")
    assert caught.value.status_code == 503
    message = str(caught.value)
    assert "trust_remote_code: true" in message
    assert "EMB_PROVIDER_TRUST_REMOTE_CODE" in message
    assert not server.sentinel.exists()  # nothing from the model directory ran
    served = client.embeddings.create(model="custom-trusted", input=TEXTS)
    assert server.sentinel.exists()
    reference = SentenceTransformer(str(server.custom), device="cpu", trust_remote_code=True)
    _assert_same(_vectors(served), reference.encode(TEXTS, normalize_embeddings=True))
    # The server still serves the others.
    assert client.embeddings.create(model="e5", input="still here").data


def test_trust_remote_code_setting_is_the_default(tmp_path: Path) -> None:
    custom, _ = tiny_custom_code_model(tmp_path / "custom")
    models_file = text_models_file(
        tmp_path / "models.yaml", [{"name": "custom", "source": str(custom)}]
    )
    settings = test_settings(models_file=models_file, trust_remote_code=True)
    with live_server(settings) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        assert len(client.embeddings.create(model="custom", input="x").data[0].embedding) == 16


def test_bulk_embed_gives_a_pinned_name_its_prompt(server: Server, tmp_path: Path) -> None:
    """``emb-model-provider embed`` on the pinned name: the server's vectors for that name."""
    texts = ["What is the capital of France?", "ünïcödé 日本語 🙂"]
    source = tmp_path / "corpus.txt"
    source.write_text("\n".join(texts) + "\n", encoding="utf-8")
    models_file = text_models_file(
        tmp_path / "models.yaml",
        [
            {"name": "e5", "source": str(server.e5)},
            {"name": "e5-query", "base": "e5", "prompt_name": "query"},
        ],
    )
    output = tmp_path / "vectors.npy"
    argv = ["embed", str(source), "-o", str(output), "--model", "e5-query"]
    assert main([*argv, "--models-file", str(models_file), "--device", "cpu"]) == 0
    reference = SentenceTransformer(str(server.e5), device="cpu")
    _assert_same(
        np.load(output), reference.encode(texts, prompt_name="query", normalize_embeddings=True)
    )
