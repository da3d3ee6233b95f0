"""Sentence-transformers text models (BERT, MPNet, DistilBERT, RoBERTa/XLM-R, ModernBERT, Qwen2/3
decoders and others ``AutoModel`` loads): tokenizer, forward, pooling, Dense, Normalize.

Matches ``SentenceTransformer(path).encode`` on the same weights, from the saved modules
(``st_modules``): ``max_seq_length`` from ``sentence_bert_config.json`` (256 for
all-MiniLM-L6-v2, not the tokenizer's 512), ``do_lower_case`` as a Lowercase normaliser in
front of the tokenizer's own (as sentence-transformers does), the special tokens the tokenizer's
post-processor adds (a decoder's EOS included), every Pooling mode, Dense and Normalize.
A prompt is prepended to the text and truncated with it, as ``encode(prompt_name=...)`` does.

Two forwards, chosen per model at load and named by ``backend``:

- ``bert-unpadded`` (BERT, RoBERTa, XLM-RoBERTa): no padding in the dense layers
  (``bert_unpadded``).
- ``length-grouped`` (every other family): the batch sorted by length and cut into groups
  whose padding is bounded (a tenth of the real tokens, or 64), one padded transformers forward
  per group. A batch merged from many requests mixes lengths; one padded forward would spend
  most of its work on pad tokens, where sentence-transformers' own ``encode`` sorts its corpus
  first. Each group's forward is the library's, so the result is the padded forward's, exactly.

Padding is always on the right inside the server; for decoders that pad on the left (Qwen) the
result is the same, since rotary positions depend only on distances between tokens.
The vectors are returned unnormalised (before a final Normalize module); the service applies L2
normalisation (per registry entry, on by default) after ``dimensions``.
"""

from __future__ import annotations

import inspect
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch
from tokenizers import Tokenizer, normalizers
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedModel

from emb_model_provider.core.errors import BadInput
from emb_model_provider.core.kinds import Pooling, TruncationSide
from emb_model_provider.encoders import bert_unpadded, fast
from emb_model_provider.encoders.base import (
    EXACT_PATH,
    EncoderInput,
    LoadOptions,
    PrecisionReport,
    PreparedInput,
    Vectors,
)
from emb_model_provider.encoders.runtime import (
    fast_backend,
    oom_releases_cache,
    refuse_custom_code,
    release,
    torch_runtime,
    weight_bytes,
)
from emb_model_provider.encoders.sources import SourceError, resolve_source
from emb_model_provider.encoders.st_modules import (
    DenseHead,
    PoolingConfig,
    SentenceConfig,
    pool_flat,
    read_sentence_config,
    read_truncate_dim,
)
from emb_model_provider.encoders.truncation import TruncationModes

logger = logging.getLogger(__name__)

Backend = Literal["bert-unpadded", "length-grouped"]

#: A length group may hold this share of pad tokens over its real ones (CPU: a forward costs
#: about its padded tokens) ... Measured in-process on full-size MPNet and ModernBERT, batches of
#: 32 cut from 128 sorted inputs: 0.10 ran 5-10 % faster than 0.25 (smaller forwards cost less
#: than the padding they save), 0.05 no faster.
_CPU_PAD_SHARE = 0.10
#: ... or this many pad tokens, so that short sentences are not split into many small forwards.
_PAD_SLACK_TOKENS = 64

#: The prompts sentence-transformers 6 gives every model (``SentenceTransformer._default_prompts``),
#: empty unless the model defines them.
DEFAULT_PROMPTS: Mapping[str, str] = {"query": "", "document": ""}


@dataclass(frozen=True, slots=True)
class TokenIds:
    """A tokenised text: its ids and how many leading ones (prompt) pooling leaves out."""

    ids: npt.NDArray[np.int64]
    skip: int = 0


def length_groups(lengths: Sequence[int], pad_share: float | None) -> list[tuple[int, int]]:
    """(start, end) slices of ``lengths`` (sorted ascending) whose padding to their longest
    stays within ``pad_share`` of their real tokens or ``_PAD_SLACK_TOKENS``; None: one group."""
    if pad_share is None or not lengths:
        return [(0, len(lengths))]
    groups: list[tuple[int, int]] = []
    start, real = 0, 0
    for index, length in enumerate(lengths):
        count = index - start + 1
        waste = count * length - (real + length)
        if index > start and waste > max(pad_share * (real + length), _PAD_SLACK_TOKENS):
            groups.append((start, index))
            start, real = index, 0
        real += length
    groups.append((start, len(lengths)))
    return groups


class TextEncoder:
    modality: Literal["text"] = "text"
    task: Literal["embed"] = "embed"
    #: ``prepare`` takes a request's ``max_tokens`` (``TokenCapping``).
    token_caps: Literal[True] = True

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: Tokenizer,
        *,
        max_input_tokens: int,
        pad_token_id: int,
        pooling: PoolingConfig,
        device: torch.device,
        dtype: torch.dtype,
        do_lower_case: bool = False,
        truncation_side: TruncationSide = "right",
        special_ids: frozenset[int] = frozenset(),
        dense: DenseHead | None = None,
        token_head: DenseHead | None = None,
        prompts: Mapping[str, str] | None = None,
        default_prompt_name: str | None = None,
    ) -> None:
        self._model = model
        self._device = device
        self._pad_token_id = pad_token_id
        self.pooling = pooling
        self.max_input_tokens = max_input_tokens
        self._dense = dense
        self._token_head = token_head
        width = (token_head.out_features if token_head else None) or int(model.config.hidden_size)
        self.dimensions = (dense.out_features if dense else None) or width * len(pooling.modes)
        self.architecture = type(model).__name__
        self.prompts: dict[str, str] = dict(prompts or {})
        self.default_prompt_name = default_prompt_name
        #: The model's saved Matryoshka size (``truncate_dim``), if any.
        self.truncate_dim: int | None = None
        self.placement = f"{device} ({str(dtype).removeprefix('torch.')})"
        self._special_ids = special_ids
        base = Tokenizer.from_str(tokenizer.to_str())
        if do_lower_case:
            lowercase(base)
        self._tokenizers = TruncationModes(base, max_input_tokens, side=truncation_side)
        #: Tokens the tokenizer adds to every text (``TokenCapping``): a cap must leave room.
        self.special_tokens = self._tokenizers.special_tokens
        #: The side over-long texts are cut from when a request names none.
        self.truncation_side: TruncationSide = truncation_side
        self._prompt_lengths = {text: self._prompt_length(text) for text in self.prompts.values()}
        self._forward_lock = threading.Lock()
        # transformers' BERT-style models take token type ids, others refuse them.
        self._token_types = "token_type_ids" in inspect.signature(model.forward).parameters
        #: BERT models run without padding in their dense layers (``bert_unpadded``); other
        #: architectures take the length-grouped transformers forward.
        self._unpadded = (
            bert_unpadded.UnpaddedBert(model) if bert_unpadded.supports(model) else None
        )
        self.backend: Backend = "bert-unpadded" if self._unpadded else "length-grouped"
        #: What the model holds on its device: its weights, the unpadded forward's fused copies
        #: and the Dense heads (the manager evicts by it).
        self.memory_bytes = (
            weight_bytes(model)
            + (self._unpadded.fused_bytes if self._unpadded else 0)
            + sum(head.weight_bytes for head in (dense, token_head) if head is not None)
        )
        #: Pad share a length group may have; None: the whole batch in one padded forward
        #: (a GPU wants few large kernels more than it minds pad tokens).
        self.pad_share: float | None = _CPU_PAD_SHARE if device.type == "cpu" else None
        #: ``precision: fast``: the padded forward that replaces the float32 torch one (OpenVINO,
        #: torch bfloat16), set when it has passed the accuracy gate (``encoders/fast.py``).
        self._fast: fast.PaddedForward | None = None
        self.precision: PrecisionReport = PrecisionReport(requested="exact", path=EXACT_PATH)

    def _prompt_length(self, prompt: str) -> int:
        """Tokens of ``prompt`` alone, without a trailing special token (sentence-transformers'
        ``Transformer._get_prompt_length``): what pooling leaves out without ``include_prompt``."""
        ids = self._tokenizers.get(True).encode(prompt, add_special_tokens=True).ids
        if ids and ids[-1] in self._special_ids:
            return len(ids) - 1
        return len(ids)

    def prompt_text(self, name: str | None) -> str | None:
        """The prompt a request's ``prompt_name`` (or the model's default) stands for; raises
        ``KeyError`` for a name the model does not have."""
        name = name if name is not None else self.default_prompt_name
        return None if name is None else self.prompts[name]

    def prepare(
        self,
        inputs: Sequence[EncoderInput],
        *,
        truncate: bool,
        prompt: str | None = None,
        truncation_side: TruncationSide | None = None,
        max_tokens: int | None = None,
    ) -> list[PreparedInput]:
        """``Encoder.prepare``; ``max_tokens`` caps each text below the model's limit (a
        request's, special tokens and prompt included): cut at it, or, without ``truncate``,
        a text over it is counted whole so that the service refuses it."""
        texts = [text_of(index, value) for index, value in enumerate(inputs)]
        limit = (
            self.max_input_tokens if max_tokens is None else min(max_tokens, self.max_input_tokens)
        )
        skip = 0
        if prompt:
            texts = [prompt + text for text in texts]
            if not self.pooling.include_prompt:
                known = self._prompt_lengths.get(prompt)
                skip = known if known is not None else self._prompt_length(prompt)
        # The prompt is part of the text truncated: cutting from the left cuts it first, and
        # pooling still leaves out the first ``skip`` tokens, as sentence-transformers does.
        tokenizer = self._tokenizers.get(truncate, truncation_side, limit)
        encodings = tokenizer.encode_batch(texts, add_special_tokens=True)
        # Usage counts the tokens pooled: a prompt the Pooling leaves out is not counted, unless
        # the whole is over the model's limit (truncation off), which the service then refuses.
        return [
            PreparedInput(
                payload=TokenIds(np.asarray(enc.ids, dtype=np.int64), skip),
                n_tokens=(len(enc.ids) if len(enc.ids) > limit else max(len(enc.ids) - skip, 0)),
            )
            for enc in encodings
        ]

    def encode(self, batch: Sequence[PreparedInput]) -> Vectors:
        tokens = [_token_ids(item.payload) for item in batch]
        ids = [item.ids for item in tokens]
        skip = [item.skip for item in tokens]
        with (
            self._forward_lock,
            oom_releases_cache(self._device),
            torch.inference_mode(),
        ):
            if self._unpadded is not None and self._fast is None:
                pooled = self._unpadded.pooled(ids, self._device, self._pool, skip)
            else:
                pooled = self._encode_grouped(ids, skip)
            if self._dense is not None:
                pooled = self._dense(pooled)
            return pooled.cpu().numpy().astype(np.float32, copy=False)

    def _pool(
        self, hidden: torch.Tensor, lengths: torch.Tensor, skip: torch.Tensor
    ) -> torch.Tensor:
        if self._token_head is not None:
            hidden = self._token_head(hidden.float())
        return pool_flat(hidden, lengths, skip, self.pooling)

    def _encode_grouped(
        self, ids: Sequence[npt.NDArray[np.int64]], skip: Sequence[int]
    ) -> torch.Tensor:
        """Pooled vectors in input order: length-sorted groups, one padded forward each."""
        order = sorted(range(len(ids)), key=lambda index: ids[index].shape[0])
        lengths = [int(ids[index].shape[0]) for index in order]
        flat: list[torch.Tensor] = []
        for start, end in length_groups(lengths, self.pad_share):
            hidden, mask = self._forward_padded([ids[index] for index in order[start:end]])
            flat.append(hidden[mask])  # each row's real tokens, row after row
        pooled = self._pool(
            torch.cat(flat) if len(flat) > 1 else flat[0],
            torch.tensor(lengths, device=self._device),
            torch.tensor([skip[index] for index in order], device=self._device),
        )
        return pooled[torch.argsort(torch.tensor(order, device=self._device))]

    def _forward_padded(
        self, batch: Sequence[npt.NDArray[np.int64]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The library forward on right-padded rows: hidden states (rows, longest, hidden) and
        the mask of real tokens."""
        longest = max(ids.shape[0] for ids in batch)
        input_ids = np.full((len(batch), longest), self._pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((len(batch), longest), dtype=np.int64)
        for row, ids in enumerate(batch):
            input_ids[row, : ids.shape[0]] = ids
            attention_mask[row, : ids.shape[0]] = 1
        if self._fast is not None:
            return self._fast(input_ids, attention_mask), torch.from_numpy(attention_mask).bool()
        ids_t = torch.from_numpy(input_ids).to(self._device, non_blocking=True)
        mask_t = torch.from_numpy(attention_mask).to(self._device, non_blocking=True)
        kwargs: dict[str, torch.Tensor] = {"input_ids": ids_t, "attention_mask": mask_t}
        if self._token_types:
            kwargs["token_type_ids"] = torch.zeros_like(ids_t)
        output = self._model(**kwargs)
        hidden = getattr(output, "last_hidden_state", None)
        if hidden is None:  # custom code may return a tuple
            hidden = output[0]
        return hidden, mask_t.bool()

    def encode_texts_with(
        self, forward: fast.PaddedForward | None, texts: Sequence[str]
    ) -> npt.NDArray[np.float32]:
        """``texts`` through the whole pipeline with ``forward`` in place of the current one
        (None: float32 torch): the accuracy gate's two sides, before the model serves."""
        current, self._fast = self._fast, forward
        try:
            return self.encode(self.prepare(texts, truncate=True))
        finally:
            self._fast = current

    def serve_fast(self, forward: fast.PaddedForward, report: PrecisionReport) -> None:
        """Serve through ``forward`` from now on, and free the float32 torch weights it
        replaces (a Dense head, small, stays in torch)."""
        with self._forward_lock:
            self._fast = forward
            self.precision = report
            self._unpadded = None
            self.memory_bytes = weight_bytes(self._model)
            if report.path.endswith("bfloat16"):
                self.memory_bytes //= 2
            release(self._model, self._device)
            self.placement = f"{self._device} ({report.path})"

    def warmup(self) -> None:
        for texts in (["warm up"], ["warm up the encoder with a longer sentence"] * 4):
            self.encode(self.prepare(texts, truncate=True))

    def close(self) -> None:
        with self._forward_lock:
            # The copies first, so that the release's collection and cache flush count them.
            if self._unpadded is not None:
                self._unpadded.close()
            self._dense = self._token_head = None
            release(self._model, self._device)


def _token_ids(payload: object) -> TokenIds:
    assert isinstance(payload, TokenIds)  # what ``prepare`` made
    return payload


def lowercase(tokenizer: Tokenizer) -> None:
    """``do_lower_case`` as sentence-transformers applies it: a Lowercase normaliser in front of
    the tokenizer's own, unless it lowercases already."""
    current = tokenizer.normalizer
    if isinstance(current, normalizers.Lowercase):
        return
    if isinstance(current, normalizers.Sequence):
        inner = list(current)  # type: ignore[call-overload]
        if any(isinstance(item, normalizers.Lowercase) for item in inner):
            return
        tokenizer.normalizer = normalizers.Sequence([normalizers.Lowercase(), *inner])
    elif current is None:
        tokenizer.normalizer = normalizers.Sequence([normalizers.Lowercase()])
    else:
        tokenizer.normalizer = normalizers.Sequence([normalizers.Lowercase(), current])


def text_of(index: int, value: EncoderInput) -> str:
    if not isinstance(value, str):
        raise BadInput(index, "not text")
    return value


def load_text_encoder(
    source: str,
    *,
    revision: str | None,
    max_input_tokens: int | None,
    pooling: Pooling | None,
    options: LoadOptions,
    prompts: Mapping[str, str] | None = None,
    default_prompt_name: str | None = None,
    sparse_head: str | None = None,
) -> TextEncoder:
    """Load a sentence-transformers (or plain transformers) text model. ``pooling``,
    ``prompts`` and ``default_prompt_name`` (a models-file entry's) override the saved ones.
    ``sparse_head``: a ``SparseEncoder`` ending with a module of that kind, whose modules before
    it are loaded here (``read_sentence_config``; the caller runs the head)."""
    model_dir = resolve_source(
        source, revision=revision, token=options.hf_token, cache_dir=options.cache_dir
    )
    config = read_sentence_config(model_dir, sparse_head=sparse_head)
    trust = options.trust_remote_code
    if not trust:
        refuse_custom_code(config.transformer_dir)
    device, dtype = torch_runtime(options)
    if options.precision == "fast" and device.type == "cpu":
        # float32 is the gate's reference; the fast path's own dtype is ``fast_dtype``.
        dtype = torch.float32
    try:
        model_config = AutoConfig.from_pretrained(
            str(config.transformer_dir), trust_remote_code=trust
        )
    except (OSError, ValueError, KeyError) as exc:
        raise SourceError(_one_line(f"cannot read the model config in {model_dir}: {exc}")) from exc
    if getattr(model_config, "is_encoder_decoder", False):
        raise SourceError(
            f"architecture {model_config.model_type} is not supported: encoder-decoder models "
            "(T5 and the like) need a sentence-transformers module of their own"
        )
    try:
        hf_tokenizer = AutoTokenizer.from_pretrained(
            str(config.transformer_dir), trust_remote_code=trust
        )
        model = AutoModel.from_pretrained(
            str(config.transformer_dir), config=model_config, dtype=dtype, trust_remote_code=trust
        )
    except (OSError, ValueError, KeyError) as exc:
        raise SourceError(_one_line(f"cannot load a model from {model_dir}: {exc}")) from exc
    backend = fast_backend(hf_tokenizer, model_dir)
    positions = int(getattr(model.config, "max_position_embeddings", 512))
    limit = (
        max_input_tokens or config.max_seq_length or min(hf_tokenizer.model_max_length, positions)
    )
    if limit > positions:
        raise SourceError(f"max_input_tokens {limit} exceeds the model's {positions} positions")
    pooling_config = _pooling(config, pooling, model_config, model_dir)
    # sentence-transformers 6 gives every model the prompts ``query`` and ``document``, empty
    # unless the model (or the models file) defines them: ``encode_query`` works on any model.
    all_prompts = {**DEFAULT_PROMPTS, **config.prompts, **(prompts or {})}
    default_prompt = default_prompt_name or config.default_prompt_name
    if default_prompt is not None and default_prompt not in all_prompts:
        raise SourceError(
            f"default prompt {default_prompt!r} is not one of the prompts {sorted(all_prompts)}"
        )
    pad_id = hf_tokenizer.pad_token_id
    model = model.to(device).eval()
    dense = DenseHead(config.dense, device) if config.dense else None
    token_head = DenseHead(config.token_steps, device) if config.token_steps else None
    encoder = TextEncoder(
        model,
        backend,
        max_input_tokens=int(limit),
        pad_token_id=int(pad_id) if pad_id is not None else 0,
        pooling=pooling_config,
        device=device,
        dtype=dtype,
        do_lower_case=config.do_lower_case,
        truncation_side="left" if hf_tokenizer.truncation_side == "left" else "right",
        special_ids=frozenset(int(index) for index in hf_tokenizer.all_special_ids),
        dense=dense,
        token_head=token_head,
        prompts=all_prompts,
        default_prompt_name=default_prompt,
    )
    encoder.truncate_dim = read_truncate_dim(model_dir)
    if options.precision == "fast":
        _take_fast_path(encoder, model, model_dir, device, options)
    logger.info(
        "loaded text model %s from %s on %s: %d dimensions, %d max tokens, %s pooling, %s forward",
        encoder.architecture,
        model_dir,
        encoder.placement,
        encoder.dimensions,
        encoder.max_input_tokens,
        encoder.pooling.name,
        encoder.backend if encoder.precision.path == EXACT_PATH else encoder.precision.path,
    )
    return encoder


def _take_fast_path(
    encoder: TextEncoder,
    model: PreTrainedModel,
    model_dir: Path,
    device: torch.device,
    options: LoadOptions,
) -> None:
    """Measure the fast paths against float32 (``encoders/fast.py``) and serve the first that
    passes the gate; otherwise float32 serves, and ``encoder.precision`` says why."""
    export_dir = (
        Path(options.export_dir)
        if options.export_dir
        else fast.default_export_dir(options.cache_dir)
    )
    forward, report = fast.choose(
        encoder.encode_texts_with,
        model,
        model_dir,
        device=device.type,
        gate=options.min_cosine,
        backend=options.fast_backend,
        dtype=options.fast_dtype,
        num_threads=options.num_threads,
        export_dir=export_dir,
        settings={
            "max_input_tokens": encoder.max_input_tokens,
            "pooling": encoder.pooling.name,
            "include_prompt": encoder.pooling.include_prompt,
            "dimensions": encoder.dimensions,
        },
    )
    if forward is None:
        encoder.precision = report
    else:
        encoder.serve_fast(forward, report)


def _pooling(
    config: SentenceConfig, override: Pooling | None, model_config: Any, model_dir: Path
) -> PoolingConfig:
    include_prompt = config.pooling.include_prompt if config.pooling else True
    if override is not None:
        return PoolingConfig((override,), include_prompt)
    if config.pooling is not None:
        return config.pooling
    # No modules.json: sentence-transformers 6.2 builds Transformer + Pooling, last-token for
    # a model made for causal language modelling (unless its config says it is not causal),
    # mean for any other (``SentenceTransformer._load_default_modules``).
    architectures = getattr(model_config, "architectures", None) or []
    causal = bool(architectures) and str(architectures[0]).endswith("ForCausalLM")
    mode: Pooling = "lasttoken" if causal and getattr(model_config, "is_causal", True) else "mean"
    logger.warning(
        "No modules.json found for %s, initializing a new SentenceTransformer model "
        "with %s pooling%s",
        model_dir,
        mode,
        f" (a {architectures[0]})" if causal else "",
    )
    return PoolingConfig((mode,), include_prompt)


def _one_line(message: str) -> str:
    return " ".join(message.split())
