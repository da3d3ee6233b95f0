"""The text encoder's two forwards agree: BERT without padding in its dense layers, and the
length-grouped transformers forward that other architectures take."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer

from emb_model_provider.core.kinds import Pooling
from emb_model_provider.encoders.base import LoadOptions
from emb_model_provider.encoders.st_modules import PoolingConfig
from emb_model_provider.encoders.text import TextEncoder, TokenIds, load_text_encoder
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


@pytest.mark.parametrize(
    "pooling", ["mean", "cls", "max", "lasttoken", "weightedmean", "mean_sqrt_len_tokens"]
)
@pytest.mark.parametrize("skip", [0, 3])
def test_unpadded_equals_padded(
    encoder: TextEncoder, attention: str, pooling: Pooling, skip: int
) -> None:
    """The hand-written forward against the library's, on both attention layouts, every
    pooling mode, with and without leading tokens left out of pooling, in length groups and
    in one padded forward."""
    prepared = encoder.prepare(TEXTS, truncate=True)
    ids = [item.payload.ids for item in prepared if isinstance(item.payload, TokenIds)]
    skips = [min(skip, len(row) - 1) for row in ids]
    encoder.pooling = PoolingConfig((pooling,), include_prompt=skip == 0)
    encoder.pad_share = 0.25 if skip else None  # length groups, and one padded forward
    try:
        with torch.inference_mode():
            unpadded = encoder._unpadded.pooled(ids, encoder._device, encoder._pool, skips)  # type: ignore[union-attr]
            padded = encoder._encode_grouped(ids, skips)
    finally:
        encoder.pooling = PoolingConfig(("mean",))
        encoder.pad_share = 0.25
    np.testing.assert_allclose(unpadded.numpy(), padded.numpy(), atol=2e-5, rtol=1e-4)


def test_unpadded_mean_matches_sentence_transformers(
    encoder: TextEncoder, attention: str, reference: SentenceTransformer
) -> None:
    got = encoder.encode(encoder.prepare(TEXTS, truncate=True))
    got /= np.linalg.norm(got, axis=1, keepdims=True)
    ref = reference.encode(TEXTS, normalize_embeddings=True, convert_to_numpy=True)
    assert np.sum(got * ref, axis=1).min() >= 0.99999
