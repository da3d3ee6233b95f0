"""Sentence encoders (MiniLM and other BERT-style models): tokenizer, encoder, pooling.

Matches sentence-transformers on the same weights: ``max_seq_length`` from the model's
``sentence_bert_config.json`` (256 for all-MiniLM-L6-v2, not the tokenizer's 512) and the pooling
mode from ``1_Pooling/config.json`` (masked mean, as ``Pooling.py``). The vectors are returned
unnormalised; the service applies L2 normalisation (per registry entry) after ``dimensions``.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import numpy.typing as npt
import torch
from tokenizers import Tokenizer
from transformers import AutoModel, AutoTokenizer, PreTrainedModel

from emb_model_provider.core.errors import BadInput
from emb_model_provider.encoders import bert_unpadded
from emb_model_provider.encoders.base import LoadOptions, PreparedInput, Vectors
from emb_model_provider.encoders.runtime import (
    oom_releases_cache,
    release,
    torch_runtime,
    weight_bytes,
)
from emb_model_provider.encoders.sources import SourceError, resolve_source

logger = logging.getLogger(__name__)

PoolingMode = Literal["mean", "cls", "max"]

_SUPPORTED_MODULES = ("Transformer", "Pooling", "Normalize")


@dataclass(frozen=True)
class SentenceConfig:
    """What sentence-transformers' saved modules say about how to embed with this model."""

    transformer_dir: Path
    max_seq_length: int | None
    do_lower_case: bool
    pooling: PoolingMode | None


def read_sentence_config(model_dir: Path) -> SentenceConfig:
    modules_file = model_dir / "modules.json"
    if not modules_file.is_file():  # a plain transformers checkpoint
        return SentenceConfig(model_dir, None, False, None)
    modules: list[dict[str, Any]] = json.loads(modules_file.read_text(encoding="utf-8"))
    transformer_dir, pooling = model_dir, None
    max_seq_length, do_lower_case = None, False
    for module in modules:
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        path = model_dir / str(module.get("path", ""))
        if kind not in _SUPPORTED_MODULES:
            raise SourceError(f"sentence-transformers module {module.get('type')} is not supported")
        if kind == "Transformer":
            transformer_dir = path
            config_file = path / "sentence_bert_config.json"
            if config_file.is_file():
                config = json.loads(config_file.read_text(encoding="utf-8"))
                max_seq_length = config.get("max_seq_length")
                do_lower_case = bool(config.get("do_lower_case", False))
        elif kind == "Pooling":
            pooling = _pooling_mode(json.loads((path / "config.json").read_text(encoding="utf-8")))
    return SentenceConfig(transformer_dir, max_seq_length, do_lower_case, pooling)


def _pooling_mode(config: dict[str, Any]) -> PoolingMode:
    mode = config.get("pooling_mode")  # sentence-transformers >= 6 writes one string
    if mode == "mean" or config.get("pooling_mode_mean_tokens"):
        return "mean"
    if mode == "cls" or config.get("pooling_mode_cls_token"):
        return "cls"
    if mode == "max" or config.get("pooling_mode_max_tokens"):
        return "max"
    raise SourceError(f"pooling config {config} is not supported (mean, cls or max)")


class TextEncoder:
    modality: Literal["text"] = "text"

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: Tokenizer,
        *,
        max_input_tokens: int,
        pad_token_id: int,
        pooling: PoolingMode,
        do_lower_case: bool,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self._model = model
        self._device = device
        self._pad_token_id = pad_token_id
        self.pooling = pooling
        self._do_lower_case = do_lower_case
        self.max_input_tokens = max_input_tokens
        self.dimensions = int(model.config.hidden_size)
        self.placement = f"{device} ({str(dtype).removeprefix('torch.')})"
        self.memory_bytes = weight_bytes(model)
        # Two read-only Rust tokenizers: encode_batch takes &self, so many request threads can
        # share them, while changing truncation per call on one tokenizer would race.
        self._truncating = Tokenizer.from_str(tokenizer.to_str())
        self._truncating.no_padding()
        self._truncating.enable_truncation(max_input_tokens)
        self._full = Tokenizer.from_str(tokenizer.to_str())
        self._full.no_padding()
        self._full.no_truncation()
        self._forward_lock = threading.Lock()
        #: BERT models run without padding in their dense layers (``bert_unpadded``); other
        #: architectures take the padded transformers forward.
        self._unpadded = (
            bert_unpadded.UnpaddedBert(model) if bert_unpadded.supports(model) else None
        )
        self.backend = "bert-unpadded" if self._unpadded is not None else "transformers"

    def prepare(self, inputs: Sequence[str | bytes], *, truncate: bool) -> list[PreparedInput]:
        texts = [_text(index, value) for index, value in enumerate(inputs)]
        if self._do_lower_case:
            texts = [text.lower() for text in texts]
        tokenizer = self._truncating if truncate else self._full
        encodings = tokenizer.encode_batch(texts, add_special_tokens=True)
        return [
            PreparedInput(payload=np.asarray(enc.ids, dtype=np.int64), n_tokens=len(enc.ids))
            for enc in encodings
        ]

    def encode(self, batch: Sequence[PreparedInput]) -> Vectors:
        ids = [cast(npt.NDArray[np.int64], item.payload) for item in batch]
        if self._unpadded is not None:
            with (
                self._forward_lock,
                oom_releases_cache(self._device),
                torch.inference_mode(),
            ):
                pooled = self._unpadded.pooled(ids, self._device, self.pooling)
                return pooled.cpu().numpy().astype(np.float32, copy=False)
        return self._encode_padded(ids)

    def _encode_padded(self, batch: Sequence[npt.NDArray[np.int64]]) -> Vectors:
        longest = max(ids.shape[0] for ids in batch)
        input_ids = np.full((len(batch), longest), self._pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((len(batch), longest), dtype=np.int64)
        for row, ids in enumerate(batch):
            input_ids[row, : ids.shape[0]] = ids
            attention_mask[row, : ids.shape[0]] = 1
        with (
            self._forward_lock,
            oom_releases_cache(self._device),
            torch.inference_mode(),
        ):
            ids_t = torch.from_numpy(input_ids).to(self._device, non_blocking=True)
            mask_t = torch.from_numpy(attention_mask).to(self._device, non_blocking=True)
            hidden = self._model(
                input_ids=ids_t,
                attention_mask=mask_t,
                token_type_ids=torch.zeros_like(ids_t),
            ).last_hidden_state.float()
            pooled = self._pool(hidden, mask_t)
            return pooled.cpu().numpy().astype(np.float32, copy=False)

    def _pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "cls":
            return hidden[:, 0]
        expanded = mask.unsqueeze(-1).to(hidden.dtype)
        if self.pooling == "max":
            return hidden.masked_fill(expanded == 0, -1e9).max(dim=1).values
        # Masked mean, as sentence-transformers' Pooling: sum over real tokens / their count.
        summed = (hidden * expanded).sum(dim=1)
        return summed / expanded.sum(dim=1).clamp(min=1e-9)

    def warmup(self) -> None:
        for texts in (["warm up"], ["warm up the encoder with a longer sentence"] * 4):
            self.encode(self.prepare(texts, truncate=True))

    def close(self) -> None:
        with self._forward_lock:
            release(self._model, self._device)


def _text(index: int, value: str | bytes) -> str:
    if not isinstance(value, str):
        raise BadInput(index, "not text")
    return value


def load_text_encoder(
    source: str,
    *,
    revision: str | None,
    max_input_tokens: int | None,
    pooling: PoolingMode | None,
    options: LoadOptions,
) -> TextEncoder:
    model_dir = resolve_source(
        source, revision=revision, token=options.hf_token, cache_dir=options.cache_dir
    )
    config = read_sentence_config(model_dir)
    device, dtype = torch_runtime(options)
    try:
        hf_tokenizer = AutoTokenizer.from_pretrained(str(config.transformer_dir))
        model = AutoModel.from_pretrained(str(config.transformer_dir), dtype=dtype)
    except (OSError, ValueError) as exc:
        raise SourceError(f"cannot load a model from {model_dir}: {exc}") from exc
    backend = getattr(hf_tokenizer, "backend_tokenizer", None)
    if not isinstance(backend, Tokenizer):
        raise SourceError(f"{model_dir} has no fast (tokenizers) tokenizer")
    positions = int(getattr(model.config, "max_position_embeddings", 512))
    limit = (
        max_input_tokens or config.max_seq_length or min(hf_tokenizer.model_max_length, positions)
    )
    if limit > positions:
        raise SourceError(f"max_input_tokens {limit} exceeds the model's {positions} positions")
    pad_id = hf_tokenizer.pad_token_id
    model = model.to(device).eval()
    encoder = TextEncoder(
        model,
        backend,
        max_input_tokens=int(limit),
        pad_token_id=int(pad_id) if pad_id is not None else 0,
        pooling=pooling or config.pooling or "mean",
        do_lower_case=config.do_lower_case,
        device=device,
        dtype=dtype,
    )
    logger.info(
        "loaded text model from %s on %s: %d dimensions, %d max tokens, %s pooling, %s forward",
        model_dir,
        encoder.placement,
        encoder.dimensions,
        encoder.max_input_tokens,
        encoder.pooling,
        encoder.backend,
    )
    return encoder
