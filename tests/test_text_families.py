"""Every text family and Pooling mode against ``SentenceTransformer.encode`` on the same
weights: tiny random models (``benchmarks/families.py``) with their sentence-transformers
module files, texts of mixed lengths, unicode and over-long ones, batched and one by one."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer

from benchmarks.families import FAMILIES, Family, build
from emb_model_provider.encoders.base import LoadOptions
from emb_model_provider.encoders.sources import SourceError
from emb_model_provider.encoders.st_modules import POOLING_MODES, PoolingConfig
from emb_model_provider.encoders.text import (
    TextEncoder,
    TokenIds,
    length_groups,
    load_text_encoder,
)

TEXTS = [
    "a",
    "Hello World, how ARE you today?",
    "ünïcödé 日本語 🙂 — ça va?",
    "word " * 200,  # longer than max_seq_length (128): truncated
    "A medium sentence about embeddings and vector search.",
    "b",
    "Another one, of another length, to make the padding uneven across the batch.",
]
PROMPTS = {"query": "query: ", "passage": "Represent this passage for retrieval: "}

#: The forward each family must take on CPU; a family that drops to a slower one fails here.
EXPECTED_BACKEND: dict[Family, str] = {
    "bert": "bert-unpadded",
    "mpnet": "length-grouped",
    "distilbert": "length-grouped",
    "roberta": "bert-unpadded",
    "xlm-roberta": "bert-unpadded",
    "modernbert": "length-grouped",
    "qwen2": "length-grouped",
    "qwen3": "length-grouped",
}

CPU = LoadOptions(device="cpu", dtype="float32")


def _load(path: Path, options: LoadOptions = CPU) -> TextEncoder:
    return load_text_encoder(
        str(path), revision=None, max_input_tokens=None, pooling=None, options=options
    )


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[Family, Path]:
    root = tmp_path_factory.mktemp("families")
    return {
        family: build(family, root / family, "tiny", prompts=PROMPTS, seed=index)
        for index, family in enumerate(FAMILIES)
    }


def _unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _ours(encoder: TextEncoder, texts: list[str], prompt: str | None) -> np.ndarray:
    return encoder.encode(encoder.prepare(texts, truncate=True, prompt=prompt))


@pytest.mark.parametrize("family", FAMILIES)
def test_every_pooling_mode_matches_sentence_transformers(
    models: dict[Family, Path], family: Family
) -> None:
    reference = SentenceTransformer(str(models[family]), device="cpu")
    encoder = _load(models[family])
    assert encoder.backend == EXPECTED_BACKEND[family]
    for mode in POOLING_MODES:
        for include_prompt in (True, False):
            reference[1].pooling_mode = mode
            reference[1].include_prompt = include_prompt
            encoder.pooling = PoolingConfig((mode,), include_prompt)
            for prompt_name in (None, "query"):
                prompt = PROMPTS[prompt_name] if prompt_name else None
                ref = reference.encode(TEXTS, prompt_name=prompt_name, normalize_embeddings=True)
                batched = _unit(_ours(encoder, TEXTS, prompt))
                single = _unit(np.concatenate([_ours(encoder, [text], prompt) for text in TEXTS]))
                for got in (batched, single):
                    cosine = np.sum(got * ref, axis=1)
                    assert cosine.min() >= 0.99999, (mode, include_prompt, prompt_name, cosine)


@pytest.mark.parametrize("family", FAMILIES)
def test_token_counts_are_sentence_transformers(models: dict[Family, Path], family: Family) -> None:
    """usage: the tokens sentence-transformers feeds the model, prompt included, unless the
    Pooling leaves the prompt out."""
    reference = SentenceTransformer(str(models[family]), device="cpu")
    encoder = _load(models[family])
    for include_prompt in (True, False):
        encoder.pooling = PoolingConfig(("mean",), include_prompt)
        reference[1].include_prompt = include_prompt
        prompt = PROMPTS["passage"]
        got = [item.n_tokens for item in encoder.prepare(TEXTS, truncate=True, prompt=prompt)]
        features = reference.preprocess(TEXTS, prompt=prompt)
        counts = features["attention_mask"].sum(dim=1).tolist()
        if not include_prompt:
            counts = [count - int(features["prompt_length"]) for count in counts]
        assert got == counts


@pytest.mark.parametrize("family", ["distilbert", "qwen3"])
def test_dense_without_normalize_and_do_lower_case(tmp_path: Path, family: Family) -> None:
    """Dense (Identity and Tanh) after pooling, no Normalize: the raw vectors themselves; a
    cased tokenizer with ``do_lower_case``."""
    for activation in ("torch.nn.modules.linear.Identity", "torch.nn.modules.activation.Tanh"):
        path = build(
            family,
            tmp_path / activation,
            "tiny",
            dense=24,
            dense_activation=activation,
            normalize=False,
            do_lower_case=True,
            lowercase_tokenizer=False,
        )
        encoder = _load(path)
        assert encoder.dimensions == 24
        reference = SentenceTransformer(str(path), device="cpu")
        ref = reference.encode(TEXTS, normalize_embeddings=False)
        np.testing.assert_allclose(_ours(encoder, TEXTS, None), ref, atol=1e-5, rtol=1e-4)
        assert [item.payload.ids.tolist() for item in encoder.prepare(["ABC"], truncate=True)] == [
            reference.preprocess(["ABC"])["input_ids"][0].tolist()
        ]


@pytest.mark.parametrize("family", FAMILIES)
def test_length_groups_equal_one_padded_forward(models: dict[Family, Path], family: Family) -> None:
    encoder = _load(models[family])
    if encoder.backend != "length-grouped":
        pytest.skip("test_unpadded_forward_equals_the_library_forward covers it")
    prepared = encoder.prepare([*TEXTS, *(text[:40] for text in TEXTS)], truncate=True)
    ids = [item.payload.ids for item in prepared if isinstance(item.payload, TokenIds)]
    skips = [0] * len(ids)
    with torch.inference_mode():
        encoder.pad_share = None
        whole = encoder._encode_grouped(ids, skips)
        encoder.pad_share = 0.0  # as many groups as lengths
        grouped = encoder._encode_grouped(ids, skips)
    np.testing.assert_allclose(grouped.numpy(), whole.numpy(), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["bert", "roberta", "xlm-roberta"])
@pytest.mark.parametrize("attention", ["grouped", "padded"])
def test_unpadded_forward_equals_the_library_forward(
    models: dict[Family, Path], family: Family, attention: str
) -> None:
    """The hand-written forward against one padded transformers forward, on both attention
    layouts, with a text that holds the pad id (RoBERTa does not count it as a position)."""
    encoder = _load(models[family])
    assert encoder._unpadded is not None
    encoder._unpadded.attention = attention  # type: ignore[assignment]
    prepared = encoder.prepare(TEXTS, truncate=True)
    ids = [item.payload.ids for item in prepared if isinstance(item.payload, TokenIds)]
    ids.append(np.array([101, 2023, 0, 2003, 102], dtype=np.int64))  # 0: the pad id
    encoder.pad_share = None
    for mode in POOLING_MODES:
        encoder.pooling = PoolingConfig((mode,), include_prompt=False)
        skips = [1] * len(ids)
        with torch.inference_mode():
            unpadded = encoder._unpadded.pooled(ids, encoder._device, encoder._pool, skips)
            library = encoder._encode_grouped(ids, skips)
        np.testing.assert_allclose(unpadded.numpy(), library.numpy(), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16(models: dict[Family, Path], family: Family) -> None:
    encoder = _load(models[family], LoadOptions(device="cpu", dtype="bfloat16"))
    assert encoder.placement == "cpu (bfloat16)"
    assert encoder.backend == EXPECTED_BACKEND[family]
    reference = SentenceTransformer(str(models[family]), device="cpu")
    ref = reference.encode(TEXTS, normalize_embeddings=True)
    got = _unit(_ours(encoder, TEXTS, None))
    assert np.sum(got * ref, axis=1).min() >= 0.99


def test_length_groups_bound_padding() -> None:
    lengths = [3, 3, 4, 10, 11, 12, 50, 51, 120, 128, 128]
    groups = length_groups(lengths, 0.0)
    assert groups[0][0] == 0 and groups[-1][1] == len(lengths)
    assert all(end == start for (_, end), (start, _) in itertools.pairwise(groups))
    for start, end in groups:
        part = lengths[start:end]
        waste = len(part) * max(part) - sum(part)
        assert waste <= 64
    assert length_groups(lengths, None) == [(0, len(lengths))]
    assert len(length_groups([200 + index for index in range(64)], 0.25)) == 1


def _edit_json(path: Path, change: dict[str, object]) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, list):
        data.append(change)
    else:
        data.update(change)
    path.write_text(json.dumps(data), encoding="utf-8")


def test_unsupported_module_fails_with_its_name(models: dict[Family, Path], tmp_path: Path) -> None:
    path = Path(shutil.copytree(models["mpnet"], tmp_path / "lstm"))
    _edit_json(
        path / "modules.json",
        {"idx": 3, "name": "3", "path": "3_LSTM", "type": "sentence_transformers.models.LSTM"},
    )
    with pytest.raises(SourceError, match=r"sentence_transformers\.models\.LSTM is not supported"):
        _load(path)


def test_unknown_activation_is_never_imported(tmp_path: Path) -> None:
    path = build("bert", tmp_path / "dense", "tiny", dense=8)
    _edit_json(path / "2_Dense" / "config.json", {"activation_function": "os.system"})
    with pytest.raises(SourceError, match=r"Dense activation os\.system .* is not supported"):
        _load(path)


def test_unsupported_pooling_mode(models: dict[Family, Path], tmp_path: Path) -> None:
    path = Path(shutil.copytree(models["bert"], tmp_path / "pool"))
    _edit_json(path / "1_Pooling" / "config.json", {"pooling_mode": "median"})
    with pytest.raises(SourceError, match="pooling mode median is not supported"):
        _load(path)
