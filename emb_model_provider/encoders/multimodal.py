"""Text-and-image encoders in one vector space (CLIP, SigLIP, SigLIP 2): the model's own processor,
``get_text_features`` / ``get_image_features``, unnormalised (the service applies L2).

Texts are tokenised by the model's processor with the arguments its model card gives: CLIP
truncates to its 77 positions and is padded per batch (its causal mask and attention mask make the
padding invisible to the pooled end-of-text token); SigLIP and SigLIP 2 were trained on texts
padded to a fixed length (64) and pool the last position, so every text is padded to that length,
as ``processor(text=..., padding="max_length", max_length=64)``: anything shorter changes the
vectors. Images are decoded by ``inputs/images.py`` (byte and pixel caps, EXIF rotation) and then
preprocessed by the processor exactly as ``processor(images=...)`` (SigLIP 2's NaFlex processor
also returns the patch mask and the spatial shapes, which are passed on).

A batch from the batcher may mix texts and images (many requests are merged): ``encode`` splits it
by kind, runs one forward per kind and puts the rows back in order.

Usage counts, per text, its tokens (special tokens included, padding not), and per image, the
positions the vision tower processed (CLIP: patches + CLS, 50 at 224 pixels for B/32; SigLIP: the
patches; SigLIP 2 NaFlex: the image's real patches).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, cast

import numpy as np
import numpy.typing as npt
import torch
from transformers import AutoModel, AutoProcessor, PreTrainedModel

from emb_model_provider.core.errors import BadInput, ContextLengthExceeded
from emb_model_provider.core.kinds import PrepareThread, TruncationSide
from emb_model_provider.encoders.base import EncoderInput, LoadOptions, PreparedInput, Vectors
from emb_model_provider.encoders.image import blank_image, blank_png
from emb_model_provider.encoders.runtime import (
    image_prepare_thread,
    oom_releases_cache,
    release,
    torch_runtime,
    weight_bytes,
)
from emb_model_provider.encoders.sources import SourceError, resolve_source
from emb_model_provider.inputs.images import ImageInputError, decode_image

logger = logging.getLogger(__name__)

#: Model types whose texts are padded to a fixed length, as they were trained (SigLIP's model
#: cards: ``padding="max_length"``); the others are padded to the longest text of a batch.
_FIXED_TEXT_LENGTH = frozenset({"siglip", "siglip2"})
_SUPPORTED = frozenset({"clip", *_FIXED_TEXT_LENGTH})


class Features(Protocol):
    """transformers' ``BaseModelOutputWithPooling`` as returned here: both fields are set."""

    pooler_output: torch.Tensor
    last_hidden_state: torch.Tensor


class FeatureModel(Protocol):
    """What transformers' CLIPModel, SiglipModel and Siglip2Model share (untyped there)."""

    def get_text_features(self, **inputs: torch.Tensor) -> Features: ...

    def get_image_features(self, **inputs: torch.Tensor) -> Features: ...


class SidedTokenizer(Protocol):
    """A transformers tokenizer's side of truncation, read on each call."""

    truncation_side: str


class Processor(Protocol):
    """The part of a transformers ``ProcessorMixin`` used here (untyped in transformers)."""

    tokenizer: SidedTokenizer

    def __call__(self, **kwargs: object) -> Mapping[str, object]: ...


@dataclass(frozen=True, slots=True)
class TextPayload:
    """A text's token ids and attention mask, unpadded or padded to the fixed length."""

    arrays: dict[str, npt.NDArray[np.int64]]


@dataclass(frozen=True, slots=True)
class ImagePayload:
    """One image's rows of the processor's output (pixels; SigLIP 2: patch mask, shape)."""

    tensors: dict[str, torch.Tensor]


class MultimodalEncoder:
    modality: Literal["multimodal"] = "multimodal"
    task: Literal["embed"] = "embed"

    def __init__(
        self,
        model: PreTrainedModel,
        processor: Processor,
        *,
        max_text_tokens: int,
        fixed_text_length: bool,
        text_inputs: Sequence[str],
        pad_token_id: int,
        padding_side: Literal["left", "right"],
        max_pixels: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self._model = model
        self._features = cast(FeatureModel, model)
        self._processor = processor
        self.max_text_tokens = max_text_tokens
        self._fixed_text_length = fixed_text_length
        self._text_inputs = tuple(text_inputs)
        self._pad_token_id = pad_token_id
        self._padding_side = padding_side
        self._max_pixels = max_pixels
        self._device = device
        self._dtype = dtype
        self.placement = f"{device} ({str(dtype).removeprefix('torch.')})"
        self.memory_bytes = weight_bytes(model)
        self.image_prepare_thread: PrepareThread = image_prepare_thread(device)
        self._forward_lock = threading.Lock()
        # A fast tokenizer's truncation and padding are set on the shared Rust tokenizer on each
        # call, so two threads tokenising at once would race.
        self._text_lock = threading.Lock()
        #: The side over-long texts are cut from when a request names none (the tokenizer's).
        self.truncation_side: TruncationSide = (
            "left" if processor.tokenizer.truncation_side == "left" else "right"
        )
        probe = [payload for payload, _ in self._preprocess([blank_image()])]
        image_rows, self.image_positions = self._image_features(probe)
        text_rows = self._text_forward(
            [cast(TextPayload, self._texts(["a"], truncate=True)[0].payload)]
        )
        if image_rows.shape[1] != text_rows.shape[1]:
            raise SourceError(
                f"text features have {text_rows.shape[1]} dimensions and image features "
                f"{image_rows.shape[1]}: not one vector space"
            )
        self.dimensions = int(image_rows.shape[1])
        #: Texts are checked against ``max_text_tokens``; images count their positions, which
        #: may be more (SigLIP at 224 pixels: 196 patches, 64 text tokens).
        self.max_input_tokens = max(max_text_tokens, self.image_positions)

    def prepare(
        self,
        inputs: Sequence[EncoderInput],
        *,
        truncate: bool,
        truncation_side: TruncationSide | None = None,
    ) -> list[PreparedInput]:
        """Tokenise the texts (``str``; over-long ones cut from ``truncation_side``, None: the
        tokenizer's own) and decode and preprocess the images (``bytes``) of ``inputs``, in
        order; a bad image or an over-long text fails with its index named."""
        for index, value in enumerate(inputs):
            if not isinstance(value, (str, bytes)):
                raise BadInput(index, "neither a text nor an image")
        text_at = [index for index, value in enumerate(inputs) if isinstance(value, str)]
        image_at = [index for index, value in enumerate(inputs) if isinstance(value, bytes)]
        prepared: list[PreparedInput | None] = [None] * len(inputs)
        if text_at:
            texts = [cast(str, inputs[index]) for index in text_at]
            try:
                items = self._texts(texts, truncate=truncate, side=truncation_side)
            except _TooLong as exc:
                raise ContextLengthExceeded(self.max_text_tokens, exc.n_tokens) from exc
            for index, item in zip(text_at, items, strict=True):
                prepared[index] = item
        if image_at:
            images: list[object] = []
            for index in image_at:
                try:
                    images.append(
                        decode_image(cast(bytes, inputs[index]), max_pixels=self._max_pixels)
                    )
                except ImageInputError as exc:
                    raise BadInput(index, f"not a usable image: {exc}", code=exc.code) from exc
            for index, item in zip(image_at, self._images(images), strict=True):
                prepared[index] = item
        return [item for item in prepared if item is not None]

    def _texts(
        self, texts: list[str], *, truncate: bool, side: TruncationSide | None = None
    ) -> list[PreparedInput]:
        # Lists, not tensors: without truncation an over-long text is longer than the others
        # (and refused below, naming its length).
        kwargs: dict[str, object] = {"truncation": truncate, "max_length": self.max_text_tokens}
        if self._fixed_text_length:
            kwargs.update(padding="max_length")
        else:  # rows of their own lengths, padded per batch in ``encode``
            kwargs.update(padding=False)
        with self._text_lock:
            # The tokenizer reads its ``truncation_side`` on each call; under the lock, set for
            # this call only.
            tokenizer = self._processor.tokenizer
            own = tokenizer.truncation_side
            tokenizer.truncation_side = side or self.truncation_side
            try:
                encoded = self._processor(text=texts, **kwargs)
            finally:
                tokenizer.truncation_side = own
        columns = {name: encoded[name] for name in self._text_inputs if name in encoded}
        ids = cast(Sequence[Sequence[int]], columns["input_ids"])
        masks = cast(Sequence[Sequence[int]] | None, columns.get("attention_mask"))
        items: list[PreparedInput] = []
        for row in range(len(texts)):
            arrays = {
                name: np.asarray(cast(Sequence[Sequence[int]], column)[row], dtype=np.int64)
                for name, column in columns.items()
            }
            n_tokens = int(np.sum(masks[row])) if masks is not None else len(ids[row])
            if n_tokens > self.max_text_tokens or len(ids[row]) > self.max_text_tokens:
                raise _TooLong(row, n_tokens)
            items.append(PreparedInput(payload=TextPayload(arrays), n_tokens=n_tokens))
        return items

    def _images(self, images: list[object]) -> list[PreparedInput]:
        return [
            PreparedInput(payload=payload, n_tokens=self.image_positions if real is None else real)
            for payload, real in self._preprocess(images)
        ]

    def _preprocess(self, images: list[object]) -> list[tuple[ImagePayload, int | None]]:
        """The processor's rows per image, and its real patches where the processor says
        (SigLIP 2's patch mask); the others resize every image to one size."""
        encoded = cast(
            Mapping[str, torch.Tensor], self._processor(images=images, return_tensors="pt")
        )
        mask = encoded.get("pixel_attention_mask")
        return [
            (
                ImagePayload({name: value[row] for name, value in encoded.items()}),
                int(mask[row].sum()) if mask is not None else None,
            )
            for row in range(len(images))
        ]

    def encode(self, batch: Sequence[PreparedInput]) -> Vectors:
        """One forward per kind of input in ``batch``, rows back in the batch's order."""
        text_at: list[int] = []
        image_at: list[int] = []
        texts: list[TextPayload] = []
        images: list[ImagePayload] = []
        for index, item in enumerate(batch):
            if isinstance(item.payload, TextPayload):
                text_at.append(index)
                texts.append(item.payload)
            else:
                image_at.append(index)
                images.append(cast(ImagePayload, item.payload))
        if not images:
            return self._text_forward(texts)
        if not texts:
            return self._image_forward(images)
        out = np.empty((len(batch), self.dimensions), dtype=np.float32)
        out[text_at] = self._text_forward(texts)
        out[image_at] = self._image_forward(images)
        return out

    def _text_forward(self, texts: Sequence[TextPayload]) -> Vectors:
        lengths = {item.arrays["input_ids"].shape[0] for item in texts}
        longest = max(lengths)
        columns: dict[str, npt.NDArray[np.int64]] = {}
        for name in texts[0].arrays:
            if len(lengths) == 1:  # SigLIP's fixed length, or texts of one length: no padding
                columns[name] = np.stack([item.arrays[name] for item in texts])
                continue
            fill = self._pad_token_id if name == "input_ids" else 0
            column = np.full((len(texts), longest), fill, dtype=np.int64)
            for row, item in enumerate(texts):
                values = item.arrays[name]
                if self._padding_side == "left":
                    column[row, longest - values.shape[0] :] = values
                else:
                    column[row, : values.shape[0]] = values
            columns[name] = column
        with self._forward_lock, oom_releases_cache(self._device), torch.inference_mode():
            tensors = {
                name: torch.from_numpy(column).to(self._device, non_blocking=True)
                for name, column in columns.items()
            }
            output = self._features.get_text_features(**tensors)
            return _rows(output.pooler_output)

    def _image_forward(self, images: Sequence[ImagePayload]) -> Vectors:
        return self._image_features(images)[0]

    def _image_features(self, images: Sequence[ImagePayload]) -> tuple[Vectors, int]:
        """Image features and the positions per image of the vision tower's last layer."""
        with self._forward_lock, oom_releases_cache(self._device), torch.inference_mode():
            tensors: dict[str, torch.Tensor] = {}
            for name in images[0].tensors:
                stacked = torch.stack([item.tensors[name] for item in images])
                if stacked.is_floating_point():
                    tensors[name] = stacked.to(self._device, dtype=self._dtype, non_blocking=True)
                else:
                    tensors[name] = stacked.to(self._device, non_blocking=True)
            output = self._features.get_image_features(**tensors)
            mask = tensors.get("pixel_attention_mask")
            positions = mask.shape[1] if mask is not None else output.last_hidden_state.shape[1]
            return _rows(output.pooler_output), int(positions)

    def warmup(self) -> None:
        self.encode(self.prepare(["warm up", blank_png(), "warm up the encoder"], truncate=True))

    def close(self) -> None:
        with self._forward_lock:
            release(self._model, self._device)


class _TooLong(Exception):
    def __init__(self, row: int, n_tokens: int) -> None:
        super().__init__(row, n_tokens)
        self.row = row
        self.n_tokens = n_tokens


def _rows(features: torch.Tensor) -> Vectors:
    rows: Vectors = features.float().cpu().numpy().astype(np.float32, copy=False)
    return rows


def load_multimodal_encoder(
    source: str,
    *,
    revision: str | None,
    max_input_tokens: int | None,
    pooling: str | None,
    options: LoadOptions,
) -> MultimodalEncoder:
    if pooling is not None:
        raise SourceError(
            f"multimodal models use their own text and image features; pooling {pooling!r}"
        )
    model_dir = resolve_source(
        source, revision=revision, token=options.hf_token, cache_dir=options.cache_dir
    )
    device, dtype = torch_runtime(options)
    try:
        load_processor = cast(Callable[[str], Processor], AutoProcessor.from_pretrained)
        processor = load_processor(str(model_dir))
        model = AutoModel.from_pretrained(str(model_dir), dtype=dtype)
    except (OSError, ValueError, ImportError) as exc:
        raise SourceError(f"cannot load a multimodal model from {model_dir}: {exc}") from exc
    model_type = str(getattr(model.config, "model_type", ""))
    if model_type not in _SUPPORTED or not hasattr(model, "get_image_features"):
        raise SourceError(
            f"{model_dir} holds a {model_type or 'unknown'} model; multimodal models are CLIP, "
            "SigLIP or SigLIP 2"
        )
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None or not hasattr(processor, "image_processor"):
        raise SourceError(f"{model_dir} has no processor with a tokenizer and an image processor")
    positions = int(model.config.text_config.max_position_embeddings)
    limit = max_input_tokens or min(int(tokenizer.model_max_length), positions)
    if limit > positions:
        raise SourceError(f"max_input_tokens {limit} exceeds the model's {positions} positions")
    pad_id = tokenizer.pad_token_id
    side = str(tokenizer.padding_side)
    encoder = MultimodalEncoder(
        model.to(device).eval(),
        processor,
        max_text_tokens=int(limit),
        fixed_text_length=model_type in _FIXED_TEXT_LENGTH,
        text_inputs=list(tokenizer.model_input_names),
        pad_token_id=int(pad_id) if pad_id is not None else 0,
        padding_side="left" if side == "left" else "right",
        max_pixels=options.max_image_pixels,
        device=device,
        dtype=dtype,
    )
    logger.info(
        "loaded %s model from %s on %s: %d dimensions, %d text tokens, %d positions per image",
        model_type,
        model_dir,
        encoder.placement,
        encoder.dimensions,
        encoder.max_text_tokens,
        encoder.image_positions,
    )
    return encoder
