"""Per-request token caps: Cohere's ``max_tokens`` (cut as ``truncate`` says; NONE refuses a
longer text) and vLLM's ``truncate_prompt_tokens`` on /v1/embeddings (cut from the model's
truncation side; -1 is the model's limit; above it a 400), compared with sentence-transformers
at ``max_seq_length = N`` on the same tiny models, through the ``cohere`` and ``openai`` SDKs.
vLLM's field on /v1/rerank caps each (query, document) pair as ``CrossEncoder`` at
``max_seq_length = N`` does. Usage counts the tokens embedded; capped and uncapped results never
share a cache entry.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cohere
import httpx
import numpy as np
import openai
import pytest
from sentence_transformers import CrossEncoder, SentenceTransformer, SparseEncoder
from tokenizers import Tokenizer

from benchmarks.families import build
from benchmarks.rerankers import build_cross_encoder
from benchmarks.sparse_models import build_csr, build_splade
from emb_model_provider.encoders import truncation
from emb_model_provider.encoders.truncation import TruncationModes
from emb_model_provider.registry import ModelSpec
from emb_model_provider.services.cache import ResultCache
from tests.live import live_server, test_settings
from tests.test_cache import cache_status
from tests.tiny_text_models import text_models_file

MAX_LENGTH = 24
CAP = 10
PROMPTS = {"query": "query: find me this please ", "document": "passage: "}
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while"]
WORDS += ["seven", "wizards", "quietly", "judge", "boxing"]
#: Over the cap and the model's limit, with different words at its start and its end.
LONG = " ".join(WORDS * 6)
#: Between the cap and the model's limit.
MEDIUM = " ".join(WORDS[:12])
TEXTS = [LONG, "short text", MEDIUM]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("token-caps")
    dense = build("bert", root / "dense", "tiny", max_seq_length=MAX_LENGTH, seed=11)
    # The same weights with a tokenizer saved to cut from the left (vLLM cuts from the
    # tokenizer's side).
    left = root / "left"
    shutil.copytree(dense, left)
    config_path = left / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["truncation_side"] = "left"
    config_path.write_text(json.dumps(config), encoding="utf-8")
    return {
        "dense": dense,
        "left": left,
        "prompted": build(
            "bert", root / "prompted", "tiny", prompts=PROMPTS, max_seq_length=MAX_LENGTH, seed=12
        ),
        "excluded": build(
            "bert",
            root / "excluded",
            "tiny",
            prompts=PROMPTS,
            include_prompt=False,
            max_seq_length=MAX_LENGTH,
            seed=13,
        ),
        "splade": build_splade(root / "splade", max_seq_length=MAX_LENGTH, seed=4),
        "csr": build_csr(root / "csr", max_seq_length=MAX_LENGTH, seed=5),
        "ce": build_cross_encoder("bert", root / "ce", max_length=MAX_LENGTH + 16),
    }


@pytest.fixture(scope="module")
def server(dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    models = text_models_file(
        tmp_path_factory.mktemp("token-caps-models") / "models.yaml",
        [{"name": name, "source": str(path)} for name, path in dirs.items()],
    )
    # Truncation off by default: vLLM's truncate_prompt_tokens truncates all the same.
    settings = test_settings(
        models_file=models, cache="memory", default_model="dense", truncate=False
    )
    with live_server(settings) as url:
        yield url


@pytest.fixture(scope="module")
def co(server: str) -> cohere.ClientV2:
    return cohere.ClientV2(api_key="unused", base_url=server)


@pytest.fixture(scope="module")
def oai(server: str) -> openai.OpenAI:
    return openai.OpenAI(api_key="unused", base_url=f"{server}/v1", max_retries=0)


def _reference(
    path: Path, texts: list[str], *, max_length: int, left: bool = False, **options: Any
) -> np.ndarray:
    model = SentenceTransformer(str(path), device="cpu")
    model.max_seq_length = max_length
    if left:
        model.tokenizer.truncation_side = "left"
    return np.asarray(model.encode(texts, normalize_embeddings=True, **options))


def _tokens(path: Path, texts: list[str], *, max_length: int) -> int:
    """Tokens sentence-transformers embeds of ``texts`` (no prompt), special tokens included."""
    model = SentenceTransformer(str(path), device="cpu")
    model.max_seq_length = max_length
    features = model.tokenize(texts)
    return int(features["attention_mask"].sum())


def _billed(response: Any) -> int:
    assert response.meta is not None and response.meta.billed_units is not None
    tokens: int = response.meta.billed_units.input_tokens
    return tokens


@pytest.mark.parametrize(
    "case",
    [
        ("dense", "search_query", None),
        ("prompted", "search_query", "query"),
        ("excluded", "search_document", "document"),
    ],
    ids=["dense", "prompted", "excluded"],
)
@pytest.mark.parametrize("truncate", ["END", "START"])
def test_cohere_max_tokens_cuts_as_truncate_says(
    co: cohere.ClientV2, dirs: dict[str, Path], case: tuple[str, str, str | None], truncate: str
) -> None:
    name, input_type, prompt_name = case
    response = co.embed(
        model=name,
        texts=TEXTS,
        input_type=input_type,
        embedding_types=["float"],
        truncate=truncate,
        max_tokens=CAP,
    )
    expected = _reference(
        dirs[name], TEXTS, max_length=CAP, left=truncate == "START", prompt_name=prompt_name
    )
    np.testing.assert_allclose(np.array(response.embeddings.float_), expected, atol=1e-5)
    uncapped = _reference(dirs[name], TEXTS, max_length=MAX_LENGTH, prompt_name=prompt_name)
    assert not np.allclose(expected[2], uncapped[2], atol=1e-3)  # the cap cut MEDIUM
    if name == "dense":  # usage: the tokens embedded, special tokens included
        assert _billed(response) == _tokens(dirs[name], TEXTS, max_length=CAP)


def test_cohere_max_tokens_above_the_limit_is_the_limit(
    co: cohere.ClientV2, dirs: dict[str, Path]
) -> None:
    response = co.embed(
        model="dense",
        texts=TEXTS,
        input_type="search_document",
        embedding_types=["float"],
        truncate="END",
        max_tokens=10_000,
    )
    expected = _reference(dirs["dense"], TEXTS, max_length=MAX_LENGTH)
    np.testing.assert_allclose(np.array(response.embeddings.float_), expected, atol=1e-5)
    assert _billed(response) == _tokens(dirs["dense"], TEXTS, max_length=MAX_LENGTH)


def test_cohere_max_tokens_with_truncate_none_refuses_longer_texts(
    co: cohere.ClientV2, dirs: dict[str, Path]
) -> None:
    with pytest.raises(cohere.errors.BadRequestError) as refused:
        co.embed(
            model="dense",
            texts=[MEDIUM],
            input_type="search_document",
            embedding_types=["float"],
            truncate="NONE",
            max_tokens=CAP,
        )
    body = refused.value.body
    assert isinstance(body, dict) and set(body) == {"id", "message"}  # Cohere's error shape
    assert "max_tokens of 10 tokens" in body["message"]
    # A text within the cap is embedded whole.
    fits = co.embed(
        model="dense",
        texts=["short text"],
        input_type="search_document",
        embedding_types=["float"],
        truncate="NONE",
        max_tokens=CAP,
    )
    expected = _reference(dirs["dense"], ["short text"], max_length=MAX_LENGTH)
    np.testing.assert_allclose(np.array(fits.embeddings.float_), expected, atol=1e-5)


@pytest.mark.parametrize("value", [0, -1, 2, 2.5, "8"])
def test_cohere_bad_max_tokens(server: str, value: object) -> None:
    response = httpx.post(
        f"{server}/v2/embed",
        json={"model": "dense", "texts": ["a"], "embedding_types": ["float"], "max_tokens": value},
        timeout=30,
    )
    assert response.status_code == 400, response.text
    body = response.json()
    assert set(body) == {"id", "message"}  # Cohere's error shape
    assert "max_tokens" in body["message"]


@pytest.mark.parametrize(("name", "left"), [("dense", False), ("left", True)])
def test_truncate_prompt_tokens_cuts_from_the_models_side(
    oai: openai.OpenAI, dirs: dict[str, Path], name: str, left: bool
) -> None:
    response = oai.embeddings.create(
        model=name, input=TEXTS, extra_body={"truncate_prompt_tokens": CAP}
    )
    vectors = np.array([item.embedding for item in response.data])
    expected = _reference(dirs[name], TEXTS, max_length=CAP, left=left)
    np.testing.assert_allclose(vectors, expected, atol=1e-5)
    assert response.usage.prompt_tokens == _tokens(dirs[name], TEXTS, max_length=CAP)
    if left:  # the left model keeps LONG's end: not what the right side keeps
        right = _reference(dirs["dense"], TEXTS, max_length=CAP)
        assert not np.allclose(vectors[0], right[0], atol=1e-3)


def test_truncate_prompt_tokens_minus_one_is_the_models_limit(
    oai: openai.OpenAI, dirs: dict[str, Path]
) -> None:
    # The server refuses over-long texts, but -1 truncates them at the model's limit.
    with pytest.raises(openai.BadRequestError):
        oai.embeddings.create(model="dense", input=[LONG])
    response = oai.embeddings.create(
        model="dense", input=TEXTS, extra_body={"truncate_prompt_tokens": -1}
    )
    vectors = np.array([item.embedding for item in response.data])
    expected = _reference(dirs["dense"], TEXTS, max_length=MAX_LENGTH)
    np.testing.assert_allclose(vectors, expected, atol=1e-5)
    assert response.usage.prompt_tokens == _tokens(dirs["dense"], TEXTS, max_length=MAX_LENGTH)


@pytest.mark.parametrize("value", [0, -2, 2, 2.5, "8", MAX_LENGTH + 1])
def test_bad_truncate_prompt_tokens(oai: openai.OpenAI, value: object) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        oai.embeddings.create(
            model="dense", input=["a"], extra_body={"truncate_prompt_tokens": value}
        )
    body = refused.value.body
    assert isinstance(body, dict)
    assert body["param"] and "truncate_prompt_tokens" in body["param"]


@pytest.mark.parametrize("name", ["splade", "csr"])
def test_truncate_prompt_tokens_on_a_sparse_model_is_sparse_encoders(
    oai: openai.OpenAI, dirs: dict[str, Path], name: str
) -> None:
    reference = SparseEncoder(str(dirs[name]), device="cpu")
    reference.max_seq_length = CAP
    rows = reference.encode(TEXTS, convert_to_sparse_tensor=False)
    expected = np.asarray(rows.numpy() if hasattr(rows, "numpy") else rows)
    response = oai.embeddings.create(
        model=name,
        input=TEXTS,
        encoding_format="float",
        extra_body={"truncate_prompt_tokens": CAP},
    )
    for item, want in zip(response.data, expected, strict=True):
        embedding: Any = item.embedding  # {"indices", "values"}: the SDK keeps it as it came
        assert embedding["indices"] == np.flatnonzero(want).tolist()
        np.testing.assert_allclose(embedding["values"], want[embedding["indices"]], atol=1e-4)
    features = reference.tokenize(TEXTS)
    assert response.usage.prompt_tokens == int(features["attention_mask"].sum())
    uncapped = oai.embeddings.create(model=name, input=[MEDIUM], encoding_format="float")
    assert uncapped.data[0].embedding != response.data[2].embedding


def test_capped_and_uncapped_are_cached_apart(oai: openai.OpenAI, server: str) -> None:
    text = f"{MEDIUM} cached apart"

    def embed(cap: int | None) -> list[float]:
        extra = {} if cap is None else {"truncate_prompt_tokens": cap}
        response = oai.embeddings.create(
            model="dense", input=[text], encoding_format="float", extra_body=extra
        )
        return response.data[0].embedding

    before = cache_status(server)
    capped = embed(CAP)
    whole = embed(None)
    assert not np.allclose(capped, whole, atol=1e-3)
    after_both = cache_status(server)
    assert after_both["misses"] == before["misses"] + 2  # type: ignore[operator]
    assert embed(CAP) == capped
    assert embed(None) == whole
    # -1 truncates (this server does not by default): a key of its own, but no cap in it, so
    # a cap at the model's limit shares it.
    limit = embed(-1)
    assert embed(MAX_LENGTH) == limit
    after = cache_status(server)
    assert after["hits"] == after_both["hits"] + 3  # type: ignore[operator]
    assert after["misses"] == after_both["misses"] + 1  # type: ignore[operator]


def test_cache_keys_name_a_cap_only_when_set() -> None:
    spec = ModelSpec(name="m", source="s", modality="text")
    common: dict[str, Any] = {
        "fingerprint": "f",
        "modality": "text",
        "dimensions": 4,
        "max_input_tokens": 8,
        "truncate": True,
        "placement": "cpu (float32)",
    }
    plain = ResultCache.scope(spec, **common)
    assert ResultCache.scope(spec, max_tokens=None, **common) == plain
    assert ResultCache.scope(spec, max_tokens=4, **common) != plain
    assert ResultCache.scope(spec, max_tokens=4, **common) != ResultCache.scope(
        spec, max_tokens=5, **common
    )


def test_capped_tokenizers_are_bounded(dirs: dict[str, Path]) -> None:
    base = Tokenizer.from_file(str(dirs["dense"] / "tokenizer.json"))
    modes = TruncationModes(base, MAX_LENGTH)
    text = LONG
    assert modes.special_tokens == 2  # [CLS] and [SEP]
    for cap in range(3, MAX_LENGTH):
        assert len(modes.get(True, "right", cap).encode(text).ids) == cap
    assert len(modes._capped) == truncation.CAPPED_TOKENIZERS
    # At or above the model's limit, the model's own tokenizer.
    assert modes.get(True, "right", MAX_LENGTH) is modes.get(True, "right")
    assert modes.get(True, "right", 10 * MAX_LENGTH) is modes.get(True, "right")
    # Left keeps the end, special tokens kept.
    left = modes.get(True, "left", 5).encode(text).ids
    assert left[1:-1] == modes.full.encode(text).ids[-4:-1]


def test_truncate_prompt_tokens_on_rerank_is_cross_encoders(
    server: str, dirs: dict[str, Path]
) -> None:
    query = " ".join(WORDS)
    documents = [LONG, "a lazy dog", MEDIUM]
    reference = CrossEncoder(str(dirs["ce"]), device="cpu")
    reference.max_seq_length = CAP + 6
    expected = reference.predict([(query, document) for document in documents])
    whole = CrossEncoder(str(dirs["ce"]), device="cpu").predict([(query, MEDIUM)])
    assert not np.allclose(whole[0], expected[2], atol=1e-4)  # the cap cut the MEDIUM pair
    response = httpx.post(
        f"{server}/v1/rerank",
        json={
            "model": "ce",
            "query": query,
            "documents": documents,
            "truncate_prompt_tokens": CAP + 6,
        },
        timeout=60,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    scores = {item["index"]: item["relevance_score"] for item in body["results"]}
    np.testing.assert_allclose([scores[i] for i in range(len(documents))], expected, atol=1e-5)
    features = reference.tokenizer(
        [query] * len(documents), documents, truncation=True, max_length=CAP + 6
    )
    assert body["usage"]["total_tokens"] == sum(len(ids) for ids in features["input_ids"])
    # Three special tokens per pair ([CLS] q [SEP] d [SEP]): a cap of 3 leaves no room.
    refused = httpx.post(
        f"{server}/v1/rerank",
        json={"model": "ce", "query": query, "documents": documents, "truncate_prompt_tokens": 3},
        timeout=60,
    )
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"]["param"] == "truncate_prompt_tokens"
