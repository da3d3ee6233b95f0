"""Tiny text models for tests beyond ``benchmarks/families.py``: a model that ships its own
code (``auto_map``), models whose tokenizers are trained here (a Unigram for XLM-R, a byte-level
BPE for Qwen3), and a models file for text entries."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Literal, cast

import torch
from safetensors.torch import save_file
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3Model,
    XLMRobertaConfig,
    XLMRobertaModel,
)

from tests.conftest import BUNDLED_DIR

_MODELING = '''"""A tiny model with its own code, for tests of trust_remote_code."""

from pathlib import Path

import torch
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput

# Proof, for the tests, that this file ran.
Path({sentinel!r}).touch()


class TinyCustomConfig(PretrainedConfig):
    model_type = "tiny-custom"

    def __init__(self, vocab_size=30522, hidden_size=16, max_position_embeddings=512, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.max_position_embeddings = max_position_embeddings
        super().__init__(**kwargs)


class TinyCustomModel(PreTrainedModel):
    config_class = TinyCustomConfig
    base_model_prefix = "tiny"

    def __init__(self, config):
        super().__init__(config)
        self.embed = torch.nn.Embedding(config.vocab_size, config.hidden_size)
        self.mix = torch.nn.Linear(config.hidden_size, config.hidden_size)
        self.post_init()

    def _init_weights(self, module):
        pass

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return BaseModelOutput(last_hidden_state=torch.tanh(self.mix(self.embed(input_ids))))
'''


def tiny_custom_code_model(path: Path) -> tuple[Path, Path]:
    """A plain transformers directory whose model class is in its own ``modeling_tiny.py``;
    returns the directory and the file that code creates when it runs."""
    path.mkdir(parents=True, exist_ok=True)
    sentinel = path.parent / f"{path.name}-code-ran"
    (path / "modeling_tiny.py").write_text(
        _MODELING.replace("{sentinel!r}", repr(str(sentinel))), encoding="utf-8"
    )
    config = {
        "model_type": "tiny-custom",
        "architectures": ["TinyCustomModel"],
        "auto_map": {
            "AutoConfig": "modeling_tiny.TinyCustomConfig",
            "AutoModel": "modeling_tiny.TinyCustomModel",
        },
        "vocab_size": 30522,
        "hidden_size": 16,
        "max_position_embeddings": 512,
    }
    (path / "config.json").write_text(json.dumps(config), encoding="utf-8")
    generator = torch.Generator().manual_seed(0)
    save_file(
        {
            "embed.weight": torch.randn(30522, 16, generator=generator),
            "mix.weight": torch.randn(16, 16, generator=generator) / 4,
            "mix.bias": torch.randn(16, generator=generator) / 4,
        },
        str(path / "model.safetensors"),
    )
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (BUNDLED_DIR / name).is_file():
            shutil.copy(BUNDLED_DIR / name, path / name)
    return path, sentinel


def text_models_file(path: Path, entries: list[dict[str, object]]) -> Path:
    """A models file with these entries (text models unless they say otherwise)."""
    path.write_text(json.dumps({"models": entries}), encoding="utf-8")  # JSON is YAML
    return path


#: What the tokenizers below are trained on: a few languages and scripts, digits, punctuation.
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Embeddings map sentences to vectors; similar sentences get similar vectors.",
    "A vector database stores embeddings and finds the nearest ones to a query.",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "Le renard brun rapide saute par-dessus le chien paresseux, ça va ?",
    "El rápido zorro marrón salta sobre el perro perezoso.",
    "Быстрая коричневая лиса прыгает через ленивую собаку.",
    "敏捷的棕色狐狸跳过了懒狗。向量数据库存储嵌入。",
    "素早い茶色の狐がのろまな犬を飛び越える。",
    "빠른 갈색 여우가 게으른 개를 뛰어넘는다.",
    "In 2026, 1,234 servers answered 56,789 requests in 0.5 seconds each!",
    "What is the capital of France? Paris is the capital of France.",
    "Retrieval-augmented generation (RAG) retrieves documents, then generates an answer.",
    "Tokenizers split text into pieces: words, subwords, bytes and special tokens.",
]


def _unigram_xlmr_tokenizer() -> PreTrainedTokenizerFast:
    """XLM-R's layout with a SentencePiece-style Unigram model: ``<s>`` 0, ``<pad>`` 1,
    ``</s>`` 2, ``<unk>`` 3, Metaspace pieces, ``<s> A </s>``."""
    backend = Tokenizer(models.Unigram())
    backend.normalizer = normalizers.Sequence(
        [normalizers.Nmt(), normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")]
    )
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    trainer = trainers.UnigramTrainer(
        vocab_size=400, special_tokens=specials, unk_token="<unk>", show_progress=False
    )
    backend.train_from_iterator(_CORPUS * 4, trainer)
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", 0), ("</s>", 2)],
    )
    fast = cast(Callable[..., PreTrainedTokenizerFast], PreTrainedTokenizerFast)
    return fast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        cls_token="<s>",
        sep_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
        model_max_length=512,
    )


#: Qwen2/Qwen3's pre-tokenizer split (their tokenizer.json).
_QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _byte_bpe_qwen_tokenizer() -> PreTrainedTokenizerFast:
    """Qwen3-Embedding's layout with a byte-level BPE: NFC, Qwen's split, bytes as symbols,
    ``<|endoftext|>`` appended to every text and also the pad token, padding on the left."""
    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    eos = "<|endoftext|>"
    trainer = trainers.BpeTrainer(
        vocab_size=700,
        special_tokens=[eos, "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_CORPUS * 4, trainer)
    backend.post_processor = processors.TemplateProcessing(
        single=f"$A {eos}", pair=f"$A {eos} $B {eos}", special_tokens=[(eos, 0)]
    )
    fast = cast(Callable[..., PreTrainedTokenizerFast], PreTrainedTokenizerFast)
    return fast(
        tokenizer_object=backend,
        eos_token=eos,
        pad_token=eos,
        padding_side="left",
        model_max_length=512,
    )


def tiny_text_model_with_tokenizer(
    family: Literal["xlm-roberta-unigram", "qwen3-byte-bpe"], path: Path, *, seed: int = 0
) -> Path:
    """A tiny random sentence-transformers model whose tokenizer is trained here: XLM-R with a
    Unigram (SentencePiece-style) one, mean pooling; Qwen3 with a byte-level BPE, last-token
    pooling. Both normalise at the end and save the prompt ``query``."""
    torch.manual_seed(seed)
    shape = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4}
    if family == "xlm-roberta-unigram":
        tokenizer = _unigram_xlmr_tokenizer()
        model: PreTrainedModel = XLMRobertaModel(
            XLMRobertaConfig(
                vocab_size=len(tokenizer),
                intermediate_size=64,
                max_position_embeddings=514,
                type_vocab_size=1,
                pad_token_id=1,
                bos_token_id=0,
                eos_token_id=2,
                **shape,
            )
        )
        pooling = "mean"
    else:
        tokenizer = _byte_bpe_qwen_tokenizer()
        model = Qwen3Model(
            Qwen3Config(
                vocab_size=len(tokenizer),
                intermediate_size=64,
                num_key_value_heads=2,
                head_dim=8,
                max_position_embeddings=512,
                # As Qwen3's own config: no padding_idx, so the end-of-text token, which also
                # pads, has an embedding of its own (a zero row would make "" a zero vector).
                pad_token_id=None,
                eos_token_id=0,
                **shape,
            )
        )
        pooling = "lasttoken"
    with tempfile.TemporaryDirectory() as staging:
        model.eval().save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        transformer = Transformer(staging, max_seq_length=128)
        SentenceTransformer(
            modules=[transformer, Pooling(32, pooling_mode=pooling), Normalize()],
            prompts={"query": "Instruct: find the answer\nQuery: "},
        ).save(str(path))
    return path
