"""Sparse (SPLADE) encoders: a masked-language-model head's logits, one weight per vocabulary
term, as sentence-transformers' ``SparseEncoder`` computes them.

Matches ``SparseEncoder(path).encode(texts)`` on the same weights (a fill-mask ``Transformer``,
or the older ``MLMTransformer``, then ``SpladePooling``):

- each token's MLM logits go through ``log1p(relu(.))`` (``log1p_relu``: ``log1p`` once more),
  padding masked out, then ``max`` (or ``sum``) over the tokens;
- prompts are prepended to the text as ``encode(prompt_name=...)`` does; the model's saved
  ``max_active_dims`` keeps the top-k weights of each vector, as the library's ``encode`` does.

``encode`` returns dense rows over the whole vocabulary. Why not a compact top-k row: a SPLADE
vector has as many non-zero terms as its text and the weights make it (a random or barely trained
model lights up most of the vocabulary), so a fixed-width compact row would either drop terms the
library keeps or be as wide as the vocabulary. Dense rows are exact for every model; the batcher
and the result cache take them as they take dense vectors (the cache is bounded in bytes, so a
sparse model's ~120 KB entries make it hold fewer, never more memory). The service turns each row
into its (indices, values) pairs after the cache.

An inference-free SPLADE (a ``Router`` with a ``SparseStaticEmbedding`` for queries) and the
CSR models (``SparseAutoEncoder``) are refused at load by name.
"""

from __future__ import annotations

import inspect
import json
import logging
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch
from tokenizers import Tokenizer
from transformers import AutoConfig, AutoModelForMaskedLM, AutoTokenizer, PreTrainedModel

from emb_model_provider.core.kinds import TruncationSide
from emb_model_provider.encoders.base import EncoderInput, LoadOptions, PreparedInput, Vectors
from emb_model_provider.encoders.runtime import (
    oom_releases_cache,
    release,
    torch_runtime,
    weight_bytes,
)
from emb_model_provider.encoders.sources import SourceError, resolve_source
from emb_model_provider.encoders.text import (
    DEFAULT_PROMPTS,
    length_groups,
    lowercase,
    refuse_custom_code,
    text_of,
)
from emb_model_provider.encoders.truncation import TruncationModes

logger = logging.getLogger(__name__)

SpladeStrategy = Literal["max", "sum"]
SpladeActivation = Literal["relu", "log1p_relu"]

#: Pad share of a length group on CPU (see ``encoders/text.py``).
_CPU_PAD_SHARE = 0.10
#: sentence-transformers' sparse module lists this encoder reproduces (sentence-transformers 6
#: saves a ``Transformer`` with ``transformer_task: fill-mask``; earlier ones an
#: ``MLMTransformer``), and the module types it refuses.
_SERVED = (("MLMTransformer", "SpladePooling"), ("Transformer", "SpladePooling"))
_REFUSED = {
    "Router": "an inference-free SPLADE (a Router with a SparseStaticEmbedding for queries)",
    "SparseStaticEmbedding": "an inference-free SPLADE (SparseStaticEmbedding)",
    "SparseAutoEncoder": "a CSR model (SparseAutoEncoder over a dense embedder)",
}


class SparseModel:
    modality: Literal["text"] = "text"
    task: Literal["sparse"] = "sparse"

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: Tokenizer,
        *,
        max_input_tokens: int,
        pad_token_id: int,
        device: torch.device,
        dtype: torch.dtype,
        strategy: SpladeStrategy,
        activation: SpladeActivation,
        do_lower_case: bool = False,
        truncation_side: TruncationSide = "right",
        prompts: Mapping[str, str] | None = None,
        default_prompt_name: str | None = None,
        max_active_dims: int | None = None,
    ) -> None:
        self._model = model
        self._device = device
        self._pad_token_id = pad_token_id
        self.max_input_tokens = max_input_tokens
        self.strategy: SpladeStrategy = strategy
        self.activation: SpladeActivation = activation
        #: The vocabulary: one weight per term.
        self.dimensions = int(model.config.vocab_size)
        #: The model's saved top-k (``max_active_dims``); None keeps every non-zero weight.
        self.max_active_dims = max_active_dims
        self.prompts: dict[str, str] = dict(prompts or {})
        self.default_prompt_name = default_prompt_name
        self.architecture = type(model).__name__
        self.placement = f"{device} ({str(dtype).removeprefix('torch.')})"
        self.memory_bytes = weight_bytes(model)
        base = Tokenizer.from_str(tokenizer.to_str())
        if do_lower_case:
            lowercase(base)
        # Read-only tokenizers per truncation mode, as in the text encoder.
        self._tokenizers = TruncationModes(base, max_input_tokens, side=truncation_side)
        #: The side over-long inputs are cut from when a request names none.
        self.truncation_side: TruncationSide = truncation_side
        self._forward_lock = threading.Lock()
        self._token_types = "token_type_ids" in inspect.signature(model.forward).parameters
        self.pad_share: float | None = _CPU_PAD_SHARE if device.type == "cpu" else None

    def prompt_text(self, name: str | None) -> str | None:
        """The prompt of ``name`` (or the model's default); ``KeyError`` for an unknown name."""
        name = name if name is not None else self.default_prompt_name
        return None if name is None else self.prompts[name]

    def prepare(
        self,
        inputs: Sequence[EncoderInput],
        *,
        truncate: bool,
        prompt: str | None = None,
        truncation_side: TruncationSide | None = None,
    ) -> list[PreparedInput]:
        texts = [text_of(index, value) for index, value in enumerate(inputs)]
        if prompt:
            texts = [prompt + text for text in texts]
        tokenizer = self._tokenizers.get(truncate, truncation_side)
        encodings = tokenizer.encode_batch(texts, add_special_tokens=True)
        # SpladePooling pools every token, the prompt's too: usage counts them all.
        return [
            PreparedInput(payload=np.asarray(enc.ids, dtype=np.int64), n_tokens=len(enc.ids))
            for enc in encodings
        ]

    def encode(self, batch: Sequence[PreparedInput]) -> Vectors:
        ids = [_ids(item.payload) for item in batch]
        with self._forward_lock, oom_releases_cache(self._device), torch.inference_mode():
            order = sorted(range(len(ids)), key=lambda index: ids[index].shape[0])
            lengths = [int(ids[index].shape[0]) for index in order]
            parts = [
                self._forward_padded([ids[index] for index in order[start:end]])
                for start, end in length_groups(lengths, self.pad_share)
            ]
            pooled = torch.cat(parts) if len(parts) > 1 else parts[0]
            pooled = pooled[torch.argsort(torch.tensor(order, device=pooled.device))]
            if self.max_active_dims is not None:
                pooled = top_k(pooled, self.max_active_dims)
            return pooled.float().cpu().numpy().astype(np.float32, copy=False)

    def _forward_padded(self, batch: Sequence[npt.NDArray[np.int64]]) -> torch.Tensor:
        """MLM logits of right-padded rows, pooled as ``SpladePooling.forward`` pools them."""
        longest = max(row.shape[0] for row in batch)
        input_ids = np.full((len(batch), longest), self._pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((len(batch), longest), dtype=np.int64)
        for row, ids in enumerate(batch):
            input_ids[row, : ids.shape[0]] = ids
            attention_mask[row, : ids.shape[0]] = 1
        ids_t = torch.from_numpy(input_ids).to(self._device)
        mask_t = torch.from_numpy(attention_mask).to(self._device)
        kwargs: dict[str, torch.Tensor] = {"input_ids": ids_t, "attention_mask": mask_t}
        if self._token_types:
            kwargs["token_type_ids"] = torch.zeros_like(ids_t)
        logits: torch.Tensor = self._model(**kwargs).logits
        # In place, as the library does at inference: the logits are not needed again.
        weights = (logits * mask_t.unsqueeze(-1).to(logits.dtype)).relu_().log1p_()
        if self.activation == "log1p_relu":
            weights = weights.log1p_()
        if self.strategy == "max":
            return weights.amax(dim=1)
        return weights.sum(dim=1)

    def warmup(self) -> None:
        for texts in (["warm up"], ["warm up the sparse encoder with a longer sentence"] * 4):
            self.encode(self.prepare(texts, truncate=True))

    def close(self) -> None:
        with self._forward_lock:
            release(self._model, self._device)


def top_k(vectors: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` largest weights of each row, the others zero: sentence-transformers'
    ``select_max_active_dims`` (by absolute value; SPLADE weights are never negative)."""
    if k >= vectors.shape[-1]:
        return vectors
    values, indices = torch.topk(vectors.abs(), k=k, dim=-1)
    del values
    kept = torch.zeros_like(vectors)
    return kept.scatter_(-1, indices, vectors.gather(-1, indices))


def _ids(payload: object) -> npt.NDArray[np.int64]:
    assert isinstance(payload, np.ndarray)  # what ``prepare`` made
    return payload


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _modules(model_dir: Path) -> tuple[Path, Path]:
    """The MLMTransformer's folder and the SpladePooling's; refuses any other module list."""
    listed = _read_json(model_dir / "modules.json")
    if not isinstance(listed, list):
        raise SourceError(f"{model_dir}: a SparseEncoder needs its modules.json")
    kinds = [str(module.get("type", "")).rsplit(".", 1)[-1] for module in listed]
    for kind in kinds:
        if kind in _REFUSED:
            raise SourceError(
                f"{model_dir}: {_REFUSED[kind]} is not supported; sparse models served are "
                "MLMTransformer + SpladePooling (SPLADE)"
            )
    if tuple(kinds) not in _SERVED:
        raise SourceError(
            f"{model_dir}: sparse modules {kinds} are not supported (an MLM Transformer + "
            "SpladePooling only)"
        )
    transformer_dir = model_dir / str(listed[0].get("path", ""))
    task = _read_json(transformer_dir / "sentence_bert_config.json").get("transformer_task")
    if kinds[0] == "Transformer" and task != "fill-mask":
        raise SourceError(
            f"{model_dir}: SpladePooling needs a fill-mask Transformer, not "
            f"{task or 'feature-extraction'}"
        )
    return transformer_dir, model_dir / str(listed[1].get("path", ""))


def load_sparse_encoder(
    source: str,
    *,
    revision: str | None,
    max_input_tokens: int | None,
    options: LoadOptions,
) -> SparseModel:
    """Load a sentence-transformers ``SparseEncoder`` directory (MLMTransformer +
    SpladePooling). ``max_input_tokens`` (a models-file entry's) overrides the saved length."""
    model_dir = resolve_source(
        source, revision=revision, token=options.hf_token, cache_dir=options.cache_dir
    )
    transformer_dir, pooling_dir = _modules(model_dir)
    trust = options.trust_remote_code
    if not trust:
        refuse_custom_code(transformer_dir)
    pooling = _read_json(pooling_dir / "config.json")
    strategy = pooling.get("pooling_strategy", "max")
    activation = pooling.get("activation_function", "relu")
    if strategy not in ("max", "sum") or activation not in ("relu", "log1p_relu"):
        raise SourceError(
            f"{pooling_dir}: SpladePooling {strategy}/{activation} is not supported "
            "(max or sum of relu or log1p_relu)"
        )
    st_config = _read_json(transformer_dir / "sentence_bert_config.json")
    settings = _read_json(model_dir / "config_sentence_transformers.json")
    device, dtype = torch_runtime(options)
    try:
        config = AutoConfig.from_pretrained(str(transformer_dir), trust_remote_code=trust)
        hf_tokenizer = AutoTokenizer.from_pretrained(str(transformer_dir), trust_remote_code=trust)
        model = AutoModelForMaskedLM.from_pretrained(
            str(transformer_dir), config=config, dtype=dtype, trust_remote_code=trust
        )
    except (OSError, ValueError, KeyError) as exc:
        message = " ".join(f"cannot load a sparse encoder from {model_dir}: {exc}".split())
        raise SourceError(message) from exc
    backend = getattr(hf_tokenizer, "backend_tokenizer", None)
    if not isinstance(backend, Tokenizer):
        raise SourceError(f"{model_dir} has no fast (tokenizers) tokenizer")
    positions = int(getattr(config, "max_position_embeddings", 512))
    saved = st_config.get("max_seq_length")
    limit = (
        max_input_tokens
        or (int(saved) if isinstance(saved, int) else None)
        or min(int(hf_tokenizer.model_max_length), positions)
    )
    if limit > positions:
        raise SourceError(f"max_input_tokens {limit} exceeds the model's {positions} positions")
    # As for dense models, sentence-transformers 6 gives every model ``query`` and ``document``.
    prompts = {**DEFAULT_PROMPTS, **(settings.get("prompts") or {})}
    default_prompt = settings.get("default_prompt_name")
    if default_prompt is not None and default_prompt not in prompts:
        raise SourceError(
            f"default prompt {default_prompt!r} is not one of the prompts {sorted(prompts)}"
        )
    max_active = settings.get("max_active_dims")
    pad_id = hf_tokenizer.pad_token_id
    encoder = SparseModel(
        model.to(device).eval(),
        backend,
        max_input_tokens=int(limit),
        pad_token_id=int(pad_id) if pad_id is not None else 0,
        device=device,
        dtype=dtype,
        strategy=strategy,
        activation=activation,
        do_lower_case=bool(st_config.get("do_lower_case", False)),
        truncation_side="left" if hf_tokenizer.truncation_side == "left" else "right",
        prompts=prompts,
        default_prompt_name=default_prompt,
        max_active_dims=int(max_active) if isinstance(max_active, int) else None,
    )
    logger.info(
        "loaded sparse encoder %s from %s on %s: %d terms, %d max tokens, SPLADE %s of %s",
        encoder.architecture,
        model_dir,
        encoder.placement,
        encoder.dimensions,
        encoder.max_input_tokens,
        encoder.strategy,
        encoder.activation,
    )
    return encoder
