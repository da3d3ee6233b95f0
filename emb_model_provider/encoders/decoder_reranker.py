"""Decoder rerankers (Qwen3-Reranker style): a causal language model asked, under its prompt
template, whether the document answers the query; the score is how much more it says "yes" than
"no" at the last position.

The computation is the model card's: each pair is written into the template
(``<Instruct>: ...\\n<Query>: ...\\n<Document>: ...``), tokenised without special tokens,
truncated (longest first) to leave room for the template's prefix and suffix, which are added
around it; the model runs and the last token's logits of "no" and "yes" give
``softmax([no, yes])[yes]``, which is ``sigmoid(yes - no)``: ``encode`` returns ``yes - no`` (the
raw score) and ``activate`` the sigmoid. As vLLM does, only the two rows of ``lm_head`` that
score "yes" and "no" are kept: the forward stops at the last hidden state, and a (2 x hidden)
product replaces the (vocabulary x hidden) one.

Served when the models file says ``task: rerank`` for a ``*ForCausalLM`` checkpoint. Rows are
padded on the right in length-sorted groups (causal attention: pad tokens after a row's last
token change nothing before it; rotary positions count from each row's start).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, PreTrainedModel

from emb_model_provider.core.errors import BadInput
from emb_model_provider.core.kinds import TruncationSide
from emb_model_provider.encoders.base import EncoderInput, LoadOptions, PreparedInput, Vectors
from emb_model_provider.encoders.runtime import (
    load_pretrained,
    oom_releases_cache,
    release,
    weight_bytes,
)
from emb_model_provider.encoders.sources import SourceError, resolve_source
from emb_model_provider.encoders.text import length_groups
from emb_model_provider.encoders.truncation import TruncationModes

logger = logging.getLogger(__name__)

#: Qwen3-Reranker's template (its model card, and vLLM's example for it).
PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query "
    'and the Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n'
    "<|im_start|>user\n"
)
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
#: The model card's max_length for a pair with its template.
_DEFAULT_MAX_TOKENS = 8192
_CPU_PAD_SHARE = 0.10


def pair_text(query: str, document: str, instruction: str = INSTRUCTION) -> str:
    """The body of the template for one pair (between ``PREFIX`` and ``SUFFIX``)."""
    return f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}"


@dataclass(frozen=True, slots=True)
class _Ids:
    ids: npt.NDArray[np.int64]


def _pair(index: int, value: EncoderInput) -> tuple[str, str]:
    if not (isinstance(value, tuple) and all(isinstance(part, str) for part in value)):
        raise BadInput(index, "not a (query, document) pair of texts")
    return value[0], value[1]


class DecoderReranker:
    modality: Literal["text"] = "text"
    task: Literal["rerank"] = "rerank"
    num_labels = 1
    dimensions = 1
    activation = "Sigmoid"

    def __init__(
        self,
        model: PreTrainedModel,
        yes_no: torch.Tensor,
        tokenizer: Tokenizer,
        *,
        max_input_tokens: int,
        pad_token_id: int,
        device: torch.device,
        dtype: torch.dtype,
        architecture: str,
    ) -> None:
        self._model = model
        #: (2, hidden): the lm_head rows of "yes" and "no", in that order.
        self._yes_no = yes_no
        self._device = device
        self._pad_token_id = pad_token_id
        self.max_input_tokens = max_input_tokens
        self.architecture = architecture
        self.placement = f"{device} ({str(dtype).removeprefix('torch.')})"
        self.memory_bytes = weight_bytes(model) + yes_no.numel() * yes_no.element_size()
        self._prefix = tokenizer.encode(PREFIX, add_special_tokens=False).ids
        self._suffix = tokenizer.encode(SUFFIX, add_special_tokens=False).ids
        room = max_input_tokens - len(self._prefix) - len(self._suffix)
        if room < 1:
            raise SourceError(f"max_input_tokens {max_input_tokens} leaves no room for a pair")
        self._tokenizers = TruncationModes(tokenizer, room)
        #: The side over-long pairs are cut from when a request names none.
        self.truncation_side: TruncationSide = "right"
        self._forward_lock = threading.Lock()
        self.pad_share: float | None = _CPU_PAD_SHARE if device.type == "cpu" else None

    def prepare(
        self,
        inputs: Sequence[EncoderInput],
        *,
        truncate: bool,
        truncation_side: TruncationSide | None = None,
    ) -> list[PreparedInput]:
        # The template's body is one text: ``left`` cuts it from its start (the instruction
        # first), as the model card's tokenizer call with ``truncation_side="left"`` would.
        texts = [pair_text(*_pair(index, value)) for index, value in enumerate(inputs)]
        tokenizer = self._tokenizers.get(truncate, truncation_side)
        encodings = tokenizer.encode_batch(texts, add_special_tokens=False)
        out = []
        for enc in encodings:
            ids = np.asarray([*self._prefix, *enc.ids, *self._suffix], dtype=np.int64)
            out.append(PreparedInput(payload=_Ids(ids), n_tokens=int(ids.shape[0])))
        return out

    def encode(self, batch: Sequence[PreparedInput]) -> Vectors:
        rows = [_ids(item.payload).ids for item in batch]
        with self._forward_lock, oom_releases_cache(self._device), torch.inference_mode():
            order = sorted(range(len(rows)), key=lambda index: rows[index].shape[0])
            lengths = [int(rows[index].shape[0]) for index in order]
            parts = [
                self._last_hidden([rows[index] for index in order[start:end]])
                for start, end in length_groups(lengths, self.pad_share)
            ]
            last = torch.cat(parts) if len(parts) > 1 else parts[0]
            last = last[torch.argsort(torch.tensor(order, device=last.device))]
            logits = last.to(self._yes_no.dtype) @ self._yes_no.T  # (rows, [yes, no])
            score = (logits[:, 0] - logits[:, 1]).float()
            return score[:, None].cpu().numpy().astype(np.float32, copy=False)

    def _last_hidden(self, batch: Sequence[npt.NDArray[np.int64]]) -> torch.Tensor:
        """Each row's last real token's hidden state (right padding)."""
        longest = max(ids.shape[0] for ids in batch)
        input_ids = np.full((len(batch), longest), self._pad_token_id, dtype=np.int64)
        mask = np.zeros((len(batch), longest), dtype=np.int64)
        for row, ids in enumerate(batch):
            input_ids[row, : ids.shape[0]] = ids
            mask[row, : ids.shape[0]] = 1
        output = self._model(
            input_ids=torch.from_numpy(input_ids).to(self._device),
            attention_mask=torch.from_numpy(mask).to(self._device),
        )
        hidden: torch.Tensor = output.last_hidden_state
        last = torch.tensor([ids.shape[0] - 1 for ids in batch], device=hidden.device)
        return hidden[torch.arange(len(batch), device=hidden.device), last]

    def activate(self, logits: Vectors) -> Vectors:
        with torch.inference_mode():
            scores = torch.sigmoid(torch.from_numpy(np.ascontiguousarray(logits)))
        out: Vectors = scores.numpy().astype(np.float32, copy=False)
        return out

    def warmup(self) -> None:
        pairs: list[EncoderInput] = [("warm up", "the reranker")] * 2
        self.encode(self.prepare(pairs, truncate=True))

    def close(self) -> None:
        with self._forward_lock:
            release(self._model, self._device)


def _ids(payload: object) -> _Ids:
    assert isinstance(payload, _Ids)  # what ``prepare`` made
    return payload


def load_decoder_reranker(
    source: str,
    *,
    revision: str | None,
    max_input_tokens: int | None,
    options: LoadOptions,
) -> DecoderReranker:
    """Load a causal LM as a yes/no reranker; keeps the base model and two lm_head rows."""
    model_dir = resolve_source(
        source, revision=revision, token=options.hf_token, cache_dir=options.cache_dir
    )
    loaded = load_pretrained(
        model_dir, AutoModelForCausalLM, options=options, what="a decoder reranker"
    )
    config, hf_tokenizer, backend = loaded.config, loaded.hf_tokenizer, loaded.tokenizer
    device, dtype = loaded.device, loaded.dtype
    yes, no = (backend.token_to_id(token) for token in ("yes", "no"))
    if yes is None or no is None:
        raise SourceError(f"{model_dir}: the tokenizer has no 'yes' and 'no' tokens to score")
    causal: Any = loaded.model  # transformers' accessors are untyped
    head: Any = causal.get_output_embeddings()
    yes_no = head.weight[[yes, no]].detach().clone().to(device)
    base: Any = causal.get_decoder().to(device).eval()
    architecture = type(causal).__name__
    del causal, loaded, head  # the full lm_head goes (unless tied to the input embeddings)
    positions = int(getattr(config, "max_position_embeddings", _DEFAULT_MAX_TOKENS))
    limit = max_input_tokens or min(positions, _DEFAULT_MAX_TOKENS)
    if limit > positions:
        raise SourceError(f"max_input_tokens {limit} exceeds the model's {positions} positions")
    pad_id = hf_tokenizer.pad_token_id
    encoder = DecoderReranker(
        base,
        yes_no,
        backend,
        max_input_tokens=int(limit),
        pad_token_id=int(pad_id) if pad_id is not None else 0,
        device=device,
        dtype=dtype,
        architecture=architecture,
    )
    logger.info(
        "loaded decoder reranker %s from %s on %s: yes/no of the last token, %d max tokens",
        architecture,
        model_dir,
        encoder.placement,
        encoder.max_input_tokens,
    )
    return encoder
