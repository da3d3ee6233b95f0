"""Tokenizers other than WordPiece, against ``SentenceTransformer`` on the same files: XLM-R with a
Unigram (SentencePiece-style) tokenizer on the unpadded forward, Qwen3 with a byte-level BPE whose
end-of-text token is also its pad token, on the length-grouped forward. Both trained here with
``tokenizers`` (tests/tiny_text_models.py): the ids, the vectors (batched and one by one, with
and without a prompt) and the usage counts."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import pytest
from sentence_transformers import SentenceTransformer

from emb_model_provider.encoders.base import LoadOptions
from emb_model_provider.encoders.text import TextEncoder, TokenIds, load_text_encoder
from tests.tiny_text_models import tiny_text_model_with_tokenizer

Kind = Literal["xlm-roberta-unigram", "qwen3-byte-bpe"]
KINDS: tuple[Kind, ...] = ("xlm-roberta-unigram", "qwen3-byte-bpe")
BACKEND = {"xlm-roberta-unigram": "bert-unpadded", "qwen3-byte-bpe": "length-grouped"}

TEXTS = [
    "a",
    "The quick brown fox jumps over the lazy dog.",
    "ünïcödé 日本語 🙂 — ça va? Быстрая лиса",
    "  spaces   inside  and\ttabs\nand newlines  ",
    "words the tokenizer never saw: zyxwvut qqqq ĳ ﬁ ①②③",  # unknown pieces, NFKC forms
    "word " * 200,  # over max_seq_length (128): truncated
    "In 2026, 1,234 servers answered 56,789 requests!",
    "",
]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[Kind, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    return {
        kind: tiny_text_model_with_tokenizer(kind, root / kind, seed=index)
        for index, kind in enumerate(KINDS)
    }


def _load(path: Path) -> TextEncoder:
    return load_text_encoder(
        str(path),
        revision=None,
        max_input_tokens=None,
        pooling=None,
        options=LoadOptions(device="cpu", dtype="float32"),
    )


def _unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@pytest.mark.parametrize("kind", KINDS)
def test_ids_vectors_and_usage_match_sentence_transformers(
    models: dict[Kind, Path], kind: Kind
) -> None:
    reference = SentenceTransformer(str(models[kind]), device="cpu")
    encoder = _load(models[kind])
    assert encoder.backend == BACKEND[kind]
    for prompt_name in (None, "query"):
        prompt = reference.prompts[prompt_name] if prompt_name else None
        prepared = encoder.prepare(TEXTS, truncate=True, prompt=prompt)
        features = reference.preprocess(TEXTS, prompt=prompt)
        mask = features["attention_mask"].bool()
        expected_ids = [
            row[keep].tolist() for row, keep in zip(features["input_ids"], mask, strict=True)
        ]
        got_ids = [
            item.payload.ids.tolist() for item in prepared if isinstance(item.payload, TokenIds)
        ]
        assert got_ids == expected_ids, prompt_name
        assert [item.n_tokens for item in prepared] == mask.sum(dim=1).tolist()
        ref = reference.encode(TEXTS, prompt_name=prompt_name, normalize_embeddings=True)
        batched = _unit(encoder.encode(prepared))
        single = _unit(
            np.concatenate(
                [encoder.encode(encoder.prepare([t], truncate=True, prompt=prompt)) for t in TEXTS]
            )
        )
        for got in (batched, single):
            np.testing.assert_allclose(got, ref, atol=2e-5, rtol=1e-4)


def test_the_tokenizers_are_what_they_claim(models: dict[Kind, Path]) -> None:
    """The trained tokenizers are a Unigram and a byte-level BPE, and the texts reach their
    unknown and byte-fallback paths (so the comparison covers them)."""
    xlmr = SentenceTransformer(str(models["xlm-roberta-unigram"]), device="cpu").tokenizer
    qwen = SentenceTransformer(str(models["qwen3-byte-bpe"]), device="cpu").tokenizer
    assert type(xlmr.backend_tokenizer.model).__name__ == "Unigram"
    assert type(qwen.backend_tokenizer.model).__name__ == "BPE"
    assert xlmr.pad_token_id == 1
    assert qwen.pad_token_id == qwen.eos_token_id
    assert xlmr.unk_token_id in xlmr(TEXTS[2])["input_ids"]  # the emoji was never seen
    # Byte-level: nothing is unknown, a character unseen in training is spelt in bytes.
    assert len(qwen("🙂", add_special_tokens=False)["input_ids"]) == len("🙂".encode())
