"""Left truncation (Cohere ``truncate: START``, TEI ``truncation_direction: left``): over-long texts
keep their end, as sentence-transformers does with ``tokenizer.truncation_side = "left"`` (a
prompt, at the start of the text, is cut first), for dense models through the ``cohere`` SDK and
huggingface_hub's ``InferenceClient``, SPLADE models through /embed_sparse (``SparseEncoder``)
and rerankers through TEI's /rerank body (``CrossEncoder``); a decoder reranker's template body
and CLIP's text tower are cut as their reference tokenizer cuts them. Left and right results
never share a cache entry. Texts that are not valid Unicode (lone surrogates) get a 400 on every
text route.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cohere
import httpx
import numpy as np
import pytest
from huggingface_hub import InferenceClient
from sentence_transformers import CrossEncoder, SentenceTransformer, SparseEncoder
from transformers import AutoProcessor

from benchmarks.families import build
from benchmarks.rerankers import build_cross_encoder
from benchmarks.sparse_models import build_splade
from emb_model_provider.encoders.base import EncoderInput, LoadOptions
from emb_model_provider.encoders.decoder_reranker import load_decoder_reranker
from emb_model_provider.encoders.multimodal import TextPayload, load_multimodal_encoder
from emb_model_provider.registry import ModelSpec
from emb_model_provider.services.cache import ResultCache
from tests.live import live_server, test_settings
from tests.test_cache import cache_status
from tests.test_rerank import _transformers_yes_probability, tiny_qwen3_reranker
from tests.tiny_multimodal import tiny_clip
from tests.tiny_text_models import text_models_file

CPU = LoadOptions(device="cpu", dtype="float32")
MAX_LENGTH = 24
PROMPTS = {"query": "query: find me this please ", "document": "passage: "}
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while"]
WORDS += ["seven", "wizards", "quietly", "judge", "boxing"]
#: Over every tiny model's limit, with different words at its start and its end.
LONG = " ".join(WORDS * 6)
TEXTS = [LONG, "short text", " ".join(reversed(WORDS * 5))]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("truncation-side")
    return {
        "dense": build("bert", root / "dense", "tiny", max_seq_length=MAX_LENGTH, seed=7),
        # The prompt is pooled, and left truncation cuts it first.
        "prompted": build(
            "bert", root / "prompted", "tiny", prompts=PROMPTS, max_seq_length=MAX_LENGTH, seed=8
        ),
        # The prompt is left out of pooling: its length of leading tokens is, even when left
        # truncation has put text there.
        "excluded": build(
            "bert",
            root / "excluded",
            "tiny",
            prompts=PROMPTS,
            include_prompt=False,
            max_seq_length=MAX_LENGTH,
            seed=9,
        ),
        "splade": build_splade(root / "splade", prompts=PROMPTS, max_seq_length=MAX_LENGTH, seed=3),
        "ce": build_cross_encoder("bert", root / "ce", max_length=MAX_LENGTH + 16),
    }


@pytest.fixture(scope="module")
def server(dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    models = text_models_file(
        tmp_path_factory.mktemp("truncation-side-models") / "models.yaml",
        [{"name": name, "source": str(path)} for name, path in dirs.items()],
    )
    with live_server(
        test_settings(models_file=models, cache="memory", default_model="dense")
    ) as url:
        yield url


@pytest.fixture(scope="module")
def http(server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, timeout=60) as session:
        yield session


def _left(model: Any) -> Any:
    model.tokenizer.truncation_side = "left"
    return model


def _dense(path: Path, texts: list[str], *, left: bool, **options: Any) -> np.ndarray:
    model = SentenceTransformer(str(path), device="cpu")
    if left:
        _left(model)
    return np.asarray(model.encode(texts, normalize_embeddings=True, **options))


@pytest.mark.parametrize(
    ("name", "input_type", "prompt_name"),
    [
        ("dense", "search_query", None),
        ("prompted", "search_query", "query"),
        ("excluded", "search_query", "query"),
        ("excluded", "search_document", "document"),
    ],
)
def test_cohere_start_keeps_the_end(
    server: str, dirs: dict[str, Path], name: str, input_type: str, prompt_name: str | None
) -> None:
    client = cohere.ClientV2(api_key="unused", base_url=server)
    start = client.embed(
        model=name, texts=TEXTS, input_type=input_type, embedding_types=["float"], truncate="START"
    )
    expected = _dense(dirs[name], TEXTS, left=True, prompt_name=prompt_name)
    np.testing.assert_allclose(np.array(start.embeddings.float_), expected, atol=1e-5)
    end = client.embed(
        model=name, texts=TEXTS, input_type=input_type, embedding_types=["float"], truncate="END"
    )
    right = _dense(dirs[name], TEXTS, left=False, prompt_name=prompt_name)
    np.testing.assert_allclose(np.array(end.embeddings.float_), right, atol=1e-5)
    # The over-long texts differ by side; the short one does not.
    assert not np.allclose(expected[0], right[0], atol=1e-3)
    np.testing.assert_allclose(expected[1], right[1], atol=1e-5)
    # Usage is the same on both sides: each keeps the model's limit of tokens.
    assert start.meta is not None and end.meta is not None
    assert start.meta.billed_units is not None and end.meta.billed_units is not None
    assert start.meta.billed_units.input_tokens == end.meta.billed_units.input_tokens


def test_tei_truncation_direction_left(
    server: str, http: httpx.Client, dirs: dict[str, Path]
) -> None:
    expected = _dense(dirs["dense"], TEXTS, left=True)
    client = InferenceClient(base_url=f"{server}/embed")
    # It posts no model: the server's default, "dense".
    vectors = client.feature_extraction(TEXTS, truncation_direction="left")
    np.testing.assert_allclose(vectors, expected, atol=1e-5)
    # POST / (the InferenceClient's base URL) and TEI's capitalised alias; a prompt by name.
    root = http.post(
        "/",
        json={
            "inputs": TEXTS,
            "model": "prompted",
            "truncation_direction": "Left",
            "prompt_name": "query",
        },
    )
    assert root.status_code == 200, root.text
    prompted = _dense(dirs["prompted"], TEXTS, left=True, prompt_name="query")
    np.testing.assert_allclose(root.json(), prompted, atol=1e-5)
    right = http.post(
        "/embed", json={"inputs": TEXTS, "model": "dense", "truncation_direction": "right"}
    )
    np.testing.assert_allclose(right.json(), _dense(dirs["dense"], TEXTS, left=False), atol=1e-5)
    # Truncation off refuses an over-long text whatever the side.
    refused = http.post(
        "/embed",
        json={"inputs": LONG, "model": "dense", "truncate": False, "truncation_direction": "left"},
    )
    assert refused.status_code == 400 and "maximum context length" in refused.json()["error"]


def test_left_and_right_are_cached_apart(server: str, http: httpx.Client) -> None:
    text = f"{LONG} cached apart"

    def embed(direction: str | None) -> list[float]:
        body: dict[str, Any] = {"inputs": text, "model": "dense"}
        if direction is not None:
            body["truncation_direction"] = direction
        response = http.post("/embed", json=body)
        assert response.status_code == 200, response.text
        vector: list[float] = response.json()[0]
        return vector

    before = cache_status(server)
    left = embed("left")
    right = embed("right")
    assert not np.allclose(left, right, atol=1e-3)
    after_both = cache_status(server)
    assert after_both["misses"] == before["misses"] + 2  # type: ignore[operator]
    # Each side hits its own entry; no side named is the model's own (right) side.
    assert embed("left") == left
    assert embed("right") == right
    assert embed(None) == right
    after = cache_status(server)
    assert after["hits"] == after_both["hits"] + 3  # type: ignore[operator]
    assert after["misses"] == after_both["misses"]


def test_cache_keys_name_the_left_side_only() -> None:
    spec = ModelSpec(name="m", source="s", modality="text")
    common: dict[str, Any] = {
        "fingerprint": "f",
        "modality": "text",
        "dimensions": 8,
        "max_input_tokens": 16,
        "truncate": True,
        "placement": "cpu (float32)",
    }
    plain = ResultCache.scope(spec, **common)
    right = ResultCache.scope(spec, **common, truncation_side="right")
    left = ResultCache.scope(spec, **common, truncation_side="left")
    # Keys from before sides were chosen stay valid for the right side.
    assert plain.keys(["x"]) == right.keys(["x"])
    assert left.keys(["x"]) != right.keys(["x"])


def test_embed_sparse_left_is_sparse_encoders(http: httpx.Client, dirs: dict[str, Path]) -> None:
    reference = _left(SparseEncoder(str(dirs["splade"]), device="cpu"))
    for prompt_name in (None, "query"):
        body: dict[str, Any] = {"inputs": TEXTS, "model": "splade", "truncation_direction": "left"}
        if prompt_name is not None:
            body["prompt_name"] = prompt_name
        response = http.post("/embed_sparse", json=body)
        assert response.status_code == 200, response.text
        rows = reference.encode(TEXTS, prompt_name=prompt_name, convert_to_sparse_tensor=False)
        expected = np.asarray(rows.numpy() if hasattr(rows, "numpy") else rows)
        for got, want in zip(response.json(), expected, strict=True):
            indices = [term["index"] for term in got]
            assert indices == np.flatnonzero(want).tolist()
            np.testing.assert_allclose([term["value"] for term in got], want[indices], atol=1e-4)
    right = http.post("/embed_sparse", json={"inputs": [LONG], "model": "splade"}).json()
    left = http.post(
        "/embed_sparse", json={"inputs": [LONG], "model": "splade", "truncation_direction": "left"}
    ).json()
    assert right != left


def test_tei_rerank_left_is_cross_encoders(http: httpx.Client, dirs: dict[str, Path]) -> None:
    query = " ".join(WORDS * 2)
    documents = [LONG, "a lazy dog", " ".join(reversed(WORDS * 4))]
    reference = _left(CrossEncoder(str(dirs["ce"]), device="cpu"))
    expected = reference.predict([(query, document) for document in documents])
    for direction in ("left", "Left"):
        response = http.post(
            "/rerank",
            json={
                "model": "ce",
                "query": query,
                "texts": documents,
                "truncation_direction": direction,
            },
        )
        assert response.status_code == 200, response.text
        scores = {item["index"]: item["score"] for item in response.json()}
        np.testing.assert_allclose(
            [scores[index] for index in range(len(documents))], expected, atol=1e-5
        )
    right = http.post("/rerank", json={"model": "ce", "query": query, "texts": documents}).json()
    right_scores = {item["index"]: item["score"] for item in right}
    assert not np.allclose([right_scores[0]], [expected[0]], atol=1e-4)


def test_decoder_reranker_cuts_the_template_body_from_the_left(tmp_path: Path) -> None:
    """A decoder reranker's pair is one text (the template's body): ``left`` cuts it from its
    start, as the model card's tokenizer call with ``truncation_side="left"`` does."""
    path = tiny_qwen3_reranker(tmp_path / "qwen3")
    encoder = load_decoder_reranker(str(path), revision=None, max_input_tokens=160, options=CPU)
    try:
        pairs = [("where do foxes live", LONG), ("a", "b")]
        inputs: list[EncoderInput] = list(pairs)
        scores = {}
        for side in ("left", "right"):
            _, expected = _transformers_yes_probability(path, pairs, 160, truncation_side=side)
            prepared = encoder.prepare(inputs, truncate=True, truncation_side=side)
            assert prepared[0].n_tokens == 160 > prepared[1].n_tokens
            scores[side] = encoder.encode(prepared)[:, 0]
            np.testing.assert_allclose(scores[side], expected, atol=1e-4)
        assert not np.isclose(scores["left"][0], scores["right"][0], atol=1e-5)
        np.testing.assert_allclose(scores["left"][1], scores["right"][1], atol=1e-6)
    finally:
        encoder.close()


def test_clip_text_tower_cuts_either_side(tmp_path: Path) -> None:
    """CLIP's texts go through its processor, whose tokenizer cuts from the side asked for."""
    path = tiny_clip(tmp_path / "clip")
    encoder = load_multimodal_encoder(
        str(path),
        revision=None,
        max_input_tokens=None,
        pooling=None,
        options=LoadOptions(device="cpu", dtype="float32"),
    )
    try:
        processor = AutoProcessor.from_pretrained(str(path))
        text = " ".join(["ab", "cd", "ef", "gh"] * 40)
        for side in ("left", "right"):
            processor.tokenizer.truncation_side = side
            expected = processor(text=[text], truncation=True, max_length=encoder.max_text_tokens)
            (item,) = encoder.prepare([text], truncate=True, truncation_side=side)
            assert isinstance(item.payload, TextPayload)
            got = item.payload.arrays["input_ids"].tolist()
            assert got == expected["input_ids"][0], side
        left = encoder.prepare([text], truncate=True, truncation_side="left")[0]
        right = encoder.prepare([text], truncate=True)[0]
        assert isinstance(left.payload, TextPayload) and isinstance(right.payload, TextPayload)
        assert (
            left.payload.arrays["input_ids"].tolist() != right.payload.arrays["input_ids"].tolist()
        )
    finally:
        encoder.close()


# -- lone surrogates ------------------------------------------------------------------------------

#: JSON with a lone surrogate escape (what ``json.dumps("a\ud800b")`` writes): valid JSON, but not
#: a text any tokenizer takes.
SURROGATE = "a\ud800b"


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/embeddings", {"model": "dense", "input": SURROGATE}),
        ("/v1/embeddings", {"model": "dense", "input": ["fine", SURROGATE]}),
        ("/v2/embed", {"model": "dense", "texts": [SURROGATE], "input_type": "search_query"}),
        ("/embed", {"inputs": SURROGATE, "model": "dense"}),
        ("/embed_sparse", {"inputs": [SURROGATE], "model": "splade"}),
        ("/v1/rerank", {"model": "ce", "query": SURROGATE, "documents": ["x"]}),
        ("/v1/rerank", {"model": "ce", "query": "x", "documents": ["y", SURROGATE]}),
        ("/v1/rerank", {"model": "ce", "query": "x", "documents": [{"text": SURROGATE}]}),
        ("/rerank", {"model": "ce", "query": "x", "texts": [SURROGATE]}),
    ],
)
def test_lone_surrogates_are_a_400(http: httpx.Client, path: str, body: dict[str, Any]) -> None:
    raw = json.dumps(body)
    assert "\\ud800" in raw
    response = http.post(path, content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert "surrogate" in response.text.lower()
    # The server is still up and answers the next request.
    assert http.post(path, json=json.loads(raw.replace("\\ud800", "x"))).status_code == 200


def test_a_lone_surrogate_in_a_model_name_is_a_404(http: httpx.Client) -> None:
    raw = json.dumps({"model": f"dense{SURROGATE}", "input": "x"})
    response = http.post(
        "/v1/embeddings", content=raw, headers={"content-type": "application/json"}
    )
    assert response.status_code == 404, response.text
    assert response.json()["error"]["code"] == "model_not_found"
    assert http.post("/v1/embeddings", json={"model": "dense", "input": "x"}).status_code == 200
