"""Loading as sentence-transformers 6 does, against ``SentenceTransformer`` on tiny random models:
a checkpoint without ``modules.json`` (last-token pooling for a causal LM, mean for an
encoder), Dense and Normalize on the feature they name and in their saved order (token-level
before Pooling), Dense's residual, and every saved key that would change vectors and is not
served refused by name."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling
from transformers import Qwen3ForCausalLM

from benchmarks.families import Family, build
from emb_model_provider.encoders.base import LoadOptions
from emb_model_provider.encoders.sources import SourceError
from emb_model_provider.encoders.text import TextEncoder, load_text_encoder

TEXTS = [
    "a",
    "Hello World, how ARE you today?",
    "ünïcödé 日本語 🙂 — ça va?",
    "word " * 200,
    "Another one, of another length, to make the padding uneven across the batch.",
]
CPU = LoadOptions(device="cpu", dtype="float32")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _load(path: Path) -> TextEncoder:
    return load_text_encoder(
        str(path), revision=None, max_input_tokens=None, pooling=None, options=CPU
    )


def _ours(encoder: TextEncoder, texts: list[str]) -> np.ndarray:
    return encoder.encode(encoder.prepare(texts, truncate=True))


def _assert_matches(path: Path, *, normalize: bool = True) -> TextEncoder:
    """Our vectors (batched and one by one) equal the library's on the same directory."""
    encoder = _load(path)
    reference = SentenceTransformer(str(path), device="cpu")
    ref = reference.encode(TEXTS, normalize_embeddings=normalize)
    for raw in (_ours(encoder, TEXTS), np.concatenate([_ours(encoder, [t]) for t in TEXTS])):
        got = raw / np.linalg.norm(raw, axis=1, keepdims=True) if normalize else raw
        np.testing.assert_allclose(got, ref, atol=2e-5, rtol=1e-4)
    assert encoder.dimensions == reference.get_embedding_dimension()
    return encoder


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("st-loading")


def _plain_checkpoint(built: Path, out: Path) -> Path:
    """The transformers files of a built model, without sentence-transformers' modules."""
    out.mkdir()
    for item in built.iterdir():
        if item.is_file() and item.name not in (
            "modules.json",
            "sentence_bert_config.json",
            "config_sentence_transformers.json",
        ):
            shutil.copy(item, out / item.name)
    return out


# -- no modules.json ---------------------------------------------------------------------------


def test_a_causal_lm_checkpoint_gets_last_token_pooling_with_a_warning(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    built = build("qwen3", root / "qwen3", "tiny", seed=3)
    model = SentenceTransformer(str(built), device="cpu")[0].model
    out = root / "qwen3-causal"
    torch.manual_seed(4)
    Qwen3ForCausalLM(model.config).save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (built / name).is_file():
            shutil.copy(built / name, out / name)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Qwen3ForCausalLM"]
    with caplog.at_level(logging.WARNING, logger="emb_model_provider.encoders.text"):
        encoder = _assert_matches(out)
    assert encoder.pooling.modes == ("lasttoken",)
    assert SentenceTransformer(str(out), device="cpu")[1].pooling_mode == "lasttoken"
    assert "No modules.json found" in caplog.text
    assert "lasttoken pooling (a Qwen3ForCausalLM)" in caplog.text

    # A causal LM whose config says it attends both ways is mean-pooled, as the library does.
    bidirectional = Path(shutil.copytree(out, root / "qwen3-bidirectional"))
    config = json.loads((bidirectional / "config.json").read_text())
    (bidirectional / "config.json").write_text(json.dumps({**config, "is_causal": False}))
    assert SentenceTransformer(str(bidirectional), device="cpu")[1].pooling_mode == "mean"
    assert _load(bidirectional).pooling.modes == ("mean",)


@pytest.mark.parametrize("family", ["bert", "modernbert"])
def test_an_encoder_checkpoint_gets_mean_pooling(root: Path, family: Family) -> None:
    built = build(family, root / f"{family}-built", "tiny", seed=5)
    plain = _plain_checkpoint(built, root / f"{family}-plain")
    encoder = _assert_matches(plain)
    assert encoder.pooling.modes == ("mean",)


# -- module order and the features modules read -----------------------------------------------


def _save(built: Path, out: Path, modules: list[torch.nn.Module]) -> Path:
    transformer = SentenceTransformer(str(built), device="cpu")[0]
    SentenceTransformer(modules=[transformer, *modules], device="cpu").save(str(out))
    return out


@pytest.mark.parametrize("family", ["bert", "qwen3"])
def test_token_level_dense_and_normalize_run_before_pooling(root: Path, family: Family) -> None:
    """Dense and Normalize on ``token_embeddings`` before Pooling change every token, then the
    sentence is pooled from them (the unpadded and the length-grouped forwards)."""
    built = build(family, root / f"{family}-tokens", "tiny", seed=6)
    torch.manual_seed(7)
    mode = "lasttoken" if family == "qwen3" else "mean"
    modules: list[torch.nn.Module] = [
        Dense(32, 24, module_input_name="token_embeddings"),
        Normalize(module_input_name="token_embeddings"),
        Dense(24, 24, activation_function=torch.nn.GELU(), module_input_name="token_embeddings"),
        Pooling(24, mode),
        Dense(24, 16, activation_function=torch.nn.Identity()),
    ]
    path = _save(built, root / f"{family}-token-dense", modules)
    encoder = _assert_matches(path, normalize=False)
    assert encoder.dimensions == 16


def test_a_dense_residual_is_added(root: Path) -> None:
    built = build("bert", root / "bert-residual", "tiny", seed=8)
    torch.manual_seed(9)
    modules: list[torch.nn.Module] = [
        Pooling(32, "mean"),
        Dense(32, 32, use_residual=True),
        Dense(32, 12, use_residual=True),
        Normalize(),
    ]
    _assert_matches(_save(built, root / "bert-residual-st", modules))


def _edit(path: Path, change: dict[str, object]) -> None:
    data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    path.write_text(json.dumps({**data, **change}), encoding="utf-8")


def _modules(path: Path) -> list[dict[str, object]]:
    modules: list[dict[str, object]] = json.loads((path / "modules.json").read_text())
    return modules


def _set_modules(path: Path, modules: list[dict[str, object]]) -> None:
    (path / "modules.json").write_text(json.dumps(modules), encoding="utf-8")


@pytest.fixture(scope="module")
def with_dense(root: Path) -> Path:
    """Transformer, Pooling, Dense, Normalize."""
    return build("bert", root / "bert-dense", "tiny", dense=8, seed=10)


def _copy(source: Path, root: Path, name: str) -> Path:
    return Path(shutil.copytree(source, root / name))


def test_an_order_that_cannot_be_honoured_is_refused(with_dense: Path, root: Path) -> None:
    # A sentence-level Dense moved before Pooling: no sentence embedding exists yet.
    before = _copy(with_dense, root, "dense-before-pooling")
    transformer, pooling, dense, normalize = _modules(before)
    _set_modules(before, [transformer, dense, pooling, normalize])
    with pytest.raises(SourceError, match="reads sentence_embedding before Pooling"):
        _load(before)

    # A token-level Dense after Pooling would change nothing the sentence embedding uses.
    after = _copy(with_dense, root, "token-dense-after-pooling")
    _edit(
        after / "2_Dense" / "config.json",
        {"module_input_name": "token_embeddings", "module_output_name": "token_embeddings"},
    )
    with pytest.raises(SourceError, match="reads token_embeddings after Pooling"):
        _load(after)

    # Output to another feature, which nothing reads.
    elsewhere = _copy(with_dense, root, "dense-elsewhere")
    _edit(elsewhere / "2_Dense" / "config.json", {"module_output_name": "projected"})
    with pytest.raises(SourceError, match=r"module_output_name .*projected"):
        _load(elsewhere)

    # No Pooling: no sentence embedding at all.
    unpooled = _copy(with_dense, root, "no-pooling")
    _set_modules(unpooled, _modules(unpooled)[:1])
    with pytest.raises(SourceError, match="no Pooling module"):
        _load(unpooled)


@pytest.mark.parametrize(
    ("file", "change", "message"),
    [
        (
            "config_sentence_transformers.json",
            {"model_type": "CrossEncoder"},
            'model_type "CrossEncoder" is not a SentenceTransformer',
        ),
        (
            "config_sentence_transformers.json",
            {"model_type": "SparseEncoder"},
            'model_type "SparseEncoder" is not a SentenceTransformer',
        ),
        ("sentence_bert_config.json", {"query_length": 16}, "query_length = 16"),
        ("sentence_bert_config.json", {"document_length": 64}, "document_length = 64"),
        (
            "sentence_bert_config.json",
            {"query_expansion": {"strategy": "fixed", "length": 32}},
            "query_expansion",
        ),
        (
            "sentence_bert_config.json",
            {"processing_kwargs": {"text": {"max_length": 16}}},
            "processing_kwargs.text",
        ),
        (
            "sentence_bert_config.json",
            {"processing_kwargs": {"common": {"truncation": False}}},
            "processing_kwargs.common",
        ),
        (
            "sentence_bert_config.json",
            {"transformer_task": "fill-mask"},
            'transformer_task = "fill-mask"',
        ),
        (
            "sentence_bert_config.json",
            {"module_output_name": "sentence_embedding"},
            "module_output_name",
        ),
    ],
)
def test_a_key_that_would_change_vectors_is_refused_by_name(
    with_dense: Path, root: Path, file: str, change: dict[str, object], message: str
) -> None:
    path = _copy(with_dense, root, f"key-{file}-{next(iter(change))}-{next(iter(change.values()))}")
    _edit(path / file, change)
    with pytest.raises(SourceError, match=message):
        _load(path)


def test_the_served_defaults_of_those_keys_load(with_dense: Path, root: Path) -> None:
    """Keys written at the values that are served change nothing."""
    path = _copy(with_dense, root, "explicit-defaults")
    _edit(path / "config_sentence_transformers.json", {"model_type": "SentenceTransformer"})
    _edit(
        path / "sentence_bert_config.json",
        {
            "transformer_task": "feature-extraction",
            "module_output_name": "token_embeddings",
            "query_length": None,
            "processing_kwargs": {"chat_template": {"add_generation_prompt": False}, "text": {}},
        },
    )
    _edit(path / "2_Dense" / "config.json", {"module_input_name": "sentence_embedding"})
    _assert_matches(path)


# -- the prompts every model has ---------------------------------------------------------------


def test_every_model_has_the_query_and_document_prompts(root: Path) -> None:
    """sentence-transformers 6 gives every model ``query`` and ``document``, empty unless the
    model defines them: a model without prompts still takes both names."""
    built = build("mpnet", root / "mpnet-no-prompts", "tiny", seed=11)
    encoder = _load(built)
    reference = SentenceTransformer(str(built), device="cpu")
    assert encoder.prompts == reference.prompts == {"query": "", "document": ""}
    assert encoder.prompt_text("query") == encoder.prompt_text("document") == ""
    prompted = build("mpnet", root / "mpnet-prompted", "tiny", prompts={"query": "q: "}, seed=12)
    assert _load(prompted).prompts == SentenceTransformer(str(prompted), device="cpu").prompts
