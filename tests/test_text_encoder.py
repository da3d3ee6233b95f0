"""The text encoder's two forwards agree: BERT without padding in its dense layers, and the
padded transformers forward that other architectures take."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from sentence_transformers import SentenceTransformer

from emb_model_provider.encoders.base import LoadOptions
from emb_model_provider.encoders.text import TextEncoder, load_text_encoder
from tests.conftest import BUNDLED_DIR

TEXTS = [
    "a",
    "b",  # the same length as "a": one attention call for both
    "A medium sentence about embeddings and vector search.",
    "word " * 300,  # truncated to 256 tokens
    "ünïcödé 日本語 🙂",
    "Another one, of another length, to make the padding uneven across the batch.",
    "c",  # equal to the first two in length, but not next to them: the encoder sorts
]


@pytest.fixture(params=["grouped", "padded"])
def attention(request: pytest.FixtureRequest, encoder: TextEncoder) -> Iterator[str]:
    """Both attention layouts of the unpadded forward: grouped (CPU's default) and padded
    (other devices' default), on CPU."""
    unpadded = encoder._unpadded  # type: ignore[attr-defined]
    assert unpadded is not None
    unpadded.attention = request.param
    try:
        yield request.param
    finally:
        unpadded.attention = "auto"


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return load_text_encoder(
        f"{BUNDLED_DIR}",
        revision=None,
        max_input_tokens=None,
        pooling=None,
        options=LoadOptions(device="cpu", dtype="float32"),
    )


def test_bert_runs_unpadded(encoder: TextEncoder) -> None:
    assert encoder.backend == "bert-unpadded"


@pytest.mark.parametrize("pooling", ["mean", "cls", "max"])
def test_unpadded_equals_padded(encoder: TextEncoder, attention: str, pooling: str) -> None:
    prepared = encoder.prepare(TEXTS, truncate=True)
    encoder.pooling = pooling  # type: ignore[assignment]
    try:
        unpadded = encoder.encode(prepared)
        padded = encoder._encode_padded([item.payload for item in prepared])  # type: ignore[misc]
    finally:
        encoder.pooling = "mean"
    np.testing.assert_allclose(unpadded, padded, atol=2e-5, rtol=1e-4)


def test_unpadded_mean_matches_sentence_transformers(
    encoder: TextEncoder, attention: str, reference: SentenceTransformer
) -> None:
    got = encoder.encode(encoder.prepare(TEXTS, truncate=True))
    got /= np.linalg.norm(got, axis=1, keepdims=True)
    ref = reference.encode(TEXTS, normalize_embeddings=True, convert_to_numpy=True)
    assert np.sum(got * ref, axis=1).min() >= 0.99999
