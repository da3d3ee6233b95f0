"""Cross-encoders (rerankers): a query and a document through the model together, one score.

Matches ``CrossEncoder(path).predict(pairs)`` of sentence-transformers on the same weights:

- the pair is tokenised as the tokenizer encodes a pair (``[CLS] q [SEP] d [SEP]`` with token
  types 0 and 1 for BERT; ``<s> q </s></s> d </s>`` for XLM-R), truncated to ``max_length`` with
  the ``longest_first`` strategy (the longer of the two loses a token at a time), which is what
  sentence-transformers' Transformer asks of the tokenizer;
- ``max_length`` is ``max_seq_length`` from ``sentence_bert_config.json`` if it is there, else the
  tokenizer's ``model_max_length`` capped at the model's positions (as the library reads it);
- the head is the ``*ForSequenceClassification`` head the checkpoint saved; ``encode`` returns its
  logits (TEI's ``raw_scores``) and ``activate`` applies the activation the model saved
  (``activation_fn`` in ``config_sentence_transformers.json``, or the older keys in
  ``config.json``), else sigmoid for one label and identity for more, as ``CrossEncoder`` does.

BERT, RoBERTa and XLM-RoBERTa run the padding-free forward of ``bert_unpadded`` (token types
included) and their own head on the first token; other families (ModernBERT, ...) run the
library forward in length-sorted groups of bounded padding, as the text encoder does.
"""

from __future__ import annotations

import inspect
import json
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import numpy.typing as npt
import torch
from tokenizers import Tokenizer
from transformers import AutoModelForSequenceClassification, PreTrainedModel

from emb_model_provider.core.errors import BadInput
from emb_model_provider.core.kinds import TruncationSide
from emb_model_provider.encoders import bert_unpadded
from emb_model_provider.encoders.base import EncoderInput, LoadOptions, PreparedInput, Vectors
from emb_model_provider.encoders.runtime import (
    load_pretrained,
    oom_releases_cache,
    release,
    weight_bytes,
)
from emb_model_provider.encoders.sources import SourceError, resolve_source
from emb_model_provider.encoders.st_modules import ACTIVATIONS
from emb_model_provider.encoders.text import length_groups, lowercase
from emb_model_provider.encoders.truncation import TruncationModes

logger = logging.getLogger(__name__)

Backend = Literal["bert-unpadded", "length-grouped"]

#: Pad share of a length group on CPU (see ``encoders/text.py``).
_CPU_PAD_SHARE = 0.10


@dataclass(frozen=True, slots=True)
class PairIds:
    """A tokenised (query, document) pair: its ids and each token's segment."""

    ids: npt.NDArray[np.int64]
    type_ids: npt.NDArray[np.int64]


def _pair(index: int, value: EncoderInput) -> tuple[str, str]:
    if not (
        isinstance(value, tuple)
        and len(value) == 2
        and isinstance(value[0], str)
        and isinstance(value[1], str)
    ):
        raise BadInput(index, "not a (query, document) pair of texts")
    return value[0], value[1]


class CrossEncoderModel:
    modality: Literal["text"] = "text"
    task: Literal["rerank"] = "rerank"
    #: ``prepare`` takes a request's ``max_tokens`` (``TokenCapping``).
    token_caps: Literal[True] = True

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: Tokenizer,
        *,
        max_input_tokens: int,
        pad_token_id: int,
        device: torch.device,
        dtype: torch.dtype,
        activation: str,
        do_lower_case: bool = False,
        truncation_side: TruncationSide = "right",
        token_types: bool = True,
    ) -> None:
        self._model = model
        self._device = device
        self._pad_token_id = pad_token_id
        self.max_input_tokens = max_input_tokens
        config: Any = model.config
        self.num_labels = int(config.num_labels)
        self.dimensions = self.num_labels
        id2label: dict[Any, Any] = dict(config.id2label or {})
        self.labels = [str(id2label.get(index, index)) for index in range(self.num_labels)]
        self.activation = activation
        self._activation = ACTIVATIONS[activation]()
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
        #: Tokens added to every pair (``TokenCapping``): a request's cap must leave room.
        self.special_tokens = self._tokenizers.pair_special_tokens
        self._forward_lock = threading.Lock()
        # Token types go in when the tokenizer returns them (its ``model_input_names``) and the
        # forward takes them, as in sentence-transformers; otherwise every token is segment 0.
        self._token_types = (
            token_types and "token_type_ids" in inspect.signature(model.forward).parameters
        )
        self._head = _first_token_head(model)
        base_model = cast(PreTrainedModel, model.base_model)
        self._unpadded = (
            bert_unpadded.UnpaddedBert(base_model)
            if self._head is not None and bert_unpadded.supports(base_model)
            else None
        )
        self.backend: Backend = "bert-unpadded" if self._unpadded else "length-grouped"
        self.pad_share: float | None = _CPU_PAD_SHARE if device.type == "cpu" else None

    def prepare(
        self,
        inputs: Sequence[EncoderInput],
        *,
        truncate: bool,
        truncation_side: TruncationSide | None = None,
        max_tokens: int | None = None,
    ) -> list[PreparedInput]:
        # Pairs are cut longest first, each member from ``truncation_side``, as TEI's rerank
        # and a Hugging Face tokenizer with that ``truncation_side`` cut them; ``max_tokens``
        # (a request's cap, special tokens included) as the model's ``max_length`` would.
        pairs = [_pair(index, value) for index, value in enumerate(inputs)]
        tokenizer = self._tokenizers.get(truncate, truncation_side, max_tokens)
        encodings = tokenizer.encode_batch(pairs, add_special_tokens=True)
        return [
            PreparedInput(
                payload=PairIds(
                    np.asarray(enc.ids, dtype=np.int64), np.asarray(enc.type_ids, dtype=np.int64)
                ),
                n_tokens=len(enc.ids),
            )
            for enc in encodings
        ]

    def encode(self, batch: Sequence[PreparedInput]) -> Vectors:
        pairs = [_pair_ids(item.payload) for item in batch]
        with self._forward_lock, oom_releases_cache(self._device), torch.inference_mode():
            if self._unpadded is not None and self._head is not None:
                first = self._unpadded.pooled(
                    [pair.ids for pair in pairs],
                    self._device,
                    _first_tokens,
                    [0] * len(pairs),
                    [pair.type_ids for pair in pairs] if self._token_types else None,
                )
                logits = self._head(first)
            else:
                logits = self._encode_grouped(pairs)
            return logits.float().cpu().numpy().astype(np.float32, copy=False)

    def activate(self, logits: Vectors) -> Vectors:
        with torch.inference_mode():
            scores = self._activation(torch.from_numpy(np.ascontiguousarray(logits)))
        out: Vectors = scores.numpy().astype(np.float32, copy=False)
        return out

    def _encode_grouped(self, pairs: Sequence[PairIds]) -> torch.Tensor:
        """Logits in input order: length-sorted groups, one padded library forward each."""
        order = sorted(range(len(pairs)), key=lambda index: pairs[index].ids.shape[0])
        lengths = [int(pairs[index].ids.shape[0]) for index in order]
        parts = [
            self._forward_padded([pairs[index] for index in order[start:end]])
            for start, end in length_groups(lengths, self.pad_share)
        ]
        logits = torch.cat(parts) if len(parts) > 1 else parts[0]
        return logits[torch.argsort(torch.tensor(order, device=logits.device))]

    def _forward_padded(self, batch: Sequence[PairIds]) -> torch.Tensor:
        longest = max(pair.ids.shape[0] for pair in batch)
        input_ids = np.full((len(batch), longest), self._pad_token_id, dtype=np.int64)
        type_ids = np.zeros((len(batch), longest), dtype=np.int64)
        attention_mask = np.zeros((len(batch), longest), dtype=np.int64)
        for row, pair in enumerate(batch):
            input_ids[row, : pair.ids.shape[0]] = pair.ids
            type_ids[row, : pair.ids.shape[0]] = pair.type_ids
            attention_mask[row, : pair.ids.shape[0]] = 1
        kwargs: dict[str, torch.Tensor] = {
            "input_ids": torch.from_numpy(input_ids).to(self._device),
            "attention_mask": torch.from_numpy(attention_mask).to(self._device),
        }
        if self._token_types:
            kwargs["token_type_ids"] = torch.from_numpy(type_ids).to(self._device)
        logits: torch.Tensor = self._model(**kwargs).logits
        return logits

    def warmup(self) -> None:
        pairs: list[EncoderInput] = [("warm up", "the reranker")] * 2
        self.encode(self.prepare(pairs, truncate=True))

    def close(self) -> None:
        with self._forward_lock:
            release(self._model, self._device)


def _pair_ids(payload: object) -> PairIds:
    assert isinstance(payload, PairIds)  # what ``prepare`` made
    return payload


def _first_tokens(hidden: torch.Tensor, lengths: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """Each pair's first token ([CLS] / <s>) from the flat layout: what the heads read."""
    del skip
    starts = torch.cumsum(lengths, 0) - lengths
    return hidden[starts]


def _first_token_head(model: PreTrainedModel) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The classification head on the first token's hidden state, for the families whose
    encoder runs unpadded; None for the others (they run the library forward whole)."""
    classifier: Any = getattr(model, "classifier", None)
    if classifier is None:
        return None
    bert: Any = getattr(model, "bert", None)
    if bert is not None and getattr(bert, "pooler", None) is not None:
        # BertForSequenceClassification: pooler (dense + tanh on [CLS]), dropout, classifier.
        return lambda first: classifier(bert.pooler(first[:, None, :]))
    if getattr(model, "roberta", None) is not None:
        # RobertaClassificationHead reads features[:, 0]: dense, tanh, out_proj.
        return lambda first: classifier(first[:, None, :])
    return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _activation(model_dir: Path, num_labels: int) -> str:
    """The activation ``CrossEncoder`` applies: the saved ``activation_fn`` (sentence-transformers
    >= 4 in config_sentence_transformers.json, older ones in config.json), else sigmoid for one
    label and identity for more. As the library does without ``trust_remote_code``, a path
    outside ``torch`` is not imported and the default is used."""
    config = _read_json(model_dir / "config.json")
    saved = (
        _read_json(model_dir / "config_sentence_transformers.json").get("activation_fn")
        or (config.get("sentence_transformers") or {}).get("activation_fn")
        or config.get("sbert_ce_default_activation_function")
    )
    default = "Sigmoid" if num_labels == 1 else "Identity"
    if not isinstance(saved, str) or not saved.startswith("torch."):
        if saved:
            logger.warning("%s: activation %s is not torch's; using %s", model_dir, saved, default)
        return default
    name = saved.rsplit(".", 1)[-1]
    if name not in ACTIVATIONS:
        raise SourceError(
            f"{model_dir}: activation {saved} is not supported (torch.nn {', '.join(ACTIVATIONS)})"
        )
    return name


def _transformer_settings(model_dir: Path) -> tuple[int | None, bool]:
    """``max_seq_length`` and ``do_lower_case`` from sentence_bert_config.json; refuses a
    sentence-transformers module list with more than the Transformer (a Dense score head)."""
    modules = model_dir / "modules.json"
    if modules.is_file():
        try:
            listed = json.loads(modules.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise SourceError(f"cannot read {modules}: {exc}") from exc
        kinds = [str(module.get("type", "")).rsplit(".", 1)[-1] for module in listed]
        if kinds != ["Transformer"] or str(listed[0].get("path", "")) not in ("", "."):
            raise SourceError(
                f"{model_dir}: cross-encoder modules {kinds} are not supported (a Transformer "
                "with its sequence-classification head only)"
            )
    config = _read_json(model_dir / "sentence_bert_config.json")
    max_seq = config.get("max_seq_length")
    return (int(max_seq) if isinstance(max_seq, int) else None), bool(
        config.get("do_lower_case", False)
    )


def load_cross_encoder(
    source: str,
    *,
    revision: str | None,
    max_input_tokens: int | None,
    options: LoadOptions,
) -> CrossEncoderModel:
    """Load a sentence-transformers ``CrossEncoder`` directory (or a plain transformers
    ``*ForSequenceClassification`` checkpoint). ``max_input_tokens`` (a models-file entry's)
    overrides the saved ``max_length``."""
    model_dir = resolve_source(
        source, revision=revision, token=options.hf_token, cache_dir=options.cache_dir
    )
    max_seq_length, do_lower_case = _transformer_settings(model_dir)
    loaded = load_pretrained(
        model_dir, AutoModelForSequenceClassification, options=options, what="a cross-encoder"
    )
    config, hf_tokenizer, device = loaded.config, loaded.hf_tokenizer, loaded.device
    positions = int(getattr(config, "max_position_embeddings", 512))
    limit = max_input_tokens or max_seq_length or min(int(hf_tokenizer.model_max_length), positions)
    if limit > positions:
        raise SourceError(f"max_input_tokens {limit} exceeds the model's {positions} positions")
    pad_id = hf_tokenizer.pad_token_id
    encoder = CrossEncoderModel(
        loaded.model.to(device).eval(),
        loaded.tokenizer,
        max_input_tokens=int(limit),
        pad_token_id=int(pad_id) if pad_id is not None else 0,
        device=device,
        dtype=loaded.dtype,
        activation=_activation(model_dir, int(config.num_labels)),
        do_lower_case=do_lower_case,
        truncation_side="left" if hf_tokenizer.truncation_side == "left" else "right",
        token_types="token_type_ids" in getattr(hf_tokenizer, "model_input_names", ()),
    )
    logger.info(
        "loaded cross-encoder %s from %s on %s: %d label(s), %s, %d max tokens, %s forward",
        encoder.architecture,
        model_dir,
        encoder.placement,
        encoder.num_labels,
        encoder.activation,
        encoder.max_input_tokens,
        encoder.backend,
    )
    return encoder
