"""Vision encoders (DINOv3 ViT and ConvNeXt): decode, the model's own preprocessing, the encoder,
the pooled output (unnormalised: the service applies L2 per entry or per request).

Preprocessing is the model's own ``AutoImageProcessor`` (for DINOv3: rescale, bilinear resize to
224x224 with antialiasing, ImageNet normalisation), so vectors equal those of
``AutoImageProcessor`` + ``AutoModel(...).pooler_output`` on the same weights. The pooled output
is the CLS token after the final layer norm for ViT, and the normalised global average for
ConvNeXt.

Usage counts, per image, the positions the encoder's last layer processed: patch tokens plus CLS
and register tokens for ViT (14 x 14 + 1 + 4 = 201 at 224 pixels), the final feature map plus its
pooled position for ConvNeXt (7 x 7 + 1 = 50). The processor resizes every image to one size, so
the count is measured once at load time.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Literal, cast

import numpy as np
import torch
from transformers import AutoImageProcessor, AutoModel, PreTrainedModel

from emb_model_provider.core.errors import BadInput
from emb_model_provider.core.kinds import PrepareThread, TruncationSide
from emb_model_provider.encoders.base import EncoderInput, LoadOptions, PreparedInput, Vectors
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

Preprocess = Callable[[list[object]], torch.Tensor]


class ImageEncoder:
    modality: Literal["image"] = "image"
    task: Literal["embed"] = "embed"

    def __init__(
        self,
        model: PreTrainedModel,
        preprocess: Preprocess,
        *,
        max_pixels: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self._model = model
        self._preprocess = preprocess
        self._max_pixels = max_pixels
        self._device = device
        self._dtype = dtype
        self.placement = f"{device} ({str(dtype).removeprefix('torch.')})"
        self.memory_bytes = weight_bytes(model)
        self.image_prepare_thread: PrepareThread = image_prepare_thread(device)
        self._forward_lock = threading.Lock()
        probe = self._forward(preprocess([blank_image()]))
        self.dimensions = int(probe[1].shape[1])
        self.max_input_tokens = int(probe[0])

    def prepare(
        self,
        inputs: Sequence[EncoderInput],
        *,
        truncate: bool,
        truncation_side: TruncationSide | None = None,
    ) -> list[PreparedInput]:
        """Decode and preprocess image bytes (nothing is truncated); a bad image fails with its
        index named."""
        images: list[object] = []
        for index, data in enumerate(inputs):
            if not isinstance(data, bytes):
                raise BadInput(index, "not an image")
            try:
                images.append(decode_image(data, max_pixels=self._max_pixels))
            except ImageInputError as exc:
                raise BadInput(index, f"not a usable image: {exc}", code=exc.code) from exc
        pixels = self._preprocess(images)
        return [
            PreparedInput(payload=pixels[row], n_tokens=self.max_input_tokens)
            for row in range(pixels.shape[0])
        ]

    def encode(self, batch: Sequence[PreparedInput]) -> Vectors:
        tensors = [cast(torch.Tensor, item.payload) for item in batch]
        _, pooled = self._forward(torch.stack(tensors))
        return pooled

    def _forward(self, pixels: torch.Tensor) -> tuple[int, Vectors]:
        with (
            self._forward_lock,
            oom_releases_cache(self._device),
            torch.inference_mode(),
        ):
            pixel_values = pixels.to(self._device, dtype=self._dtype, non_blocking=True)
            output = self._model(pixel_values=pixel_values)
            pooled = output.pooler_output.float()
            vectors = pooled.cpu().numpy().astype(np.float32, copy=False)
            return int(output.last_hidden_state.shape[1]), vectors

    def warmup(self) -> None:
        self.encode(self.prepare([blank_png()] * 2, truncate=True))

    def close(self) -> None:
        with self._forward_lock:
            release(self._model, self._device)


def blank_image() -> object:
    """A mid-grey 224 x 224 image: probes a model's output shape at load."""
    from PIL import Image

    return Image.new("RGB", (224, 224), (127, 127, 127))


def blank_png() -> bytes:
    """A small PNG for warm-ups: through the same decoding as a request's image."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 100, 50)).save(buffer, format="PNG")
    return buffer.getvalue()


def load_image_encoder(
    source: str,
    *,
    revision: str | None,
    max_input_tokens: int | None,
    pooling: str | None,
    options: LoadOptions,
) -> ImageEncoder:
    if pooling not in (None, "cls"):
        raise SourceError(f"image models use the encoder's pooled output; pooling {pooling!r}")
    model_dir = resolve_source(
        source, revision=revision, token=options.hf_token, cache_dir=options.cache_dir
    )
    device, dtype = torch_runtime(options)
    try:
        load_processor = cast(
            Callable[[str], Callable[..., dict[str, torch.Tensor]]],
            AutoImageProcessor.from_pretrained,
        )  # untyped in transformers
        processor = load_processor(str(model_dir))
        model = AutoModel.from_pretrained(str(model_dir), dtype=dtype)
    except (OSError, ValueError, ImportError) as exc:
        raise SourceError(f"cannot load an image model from {model_dir}: {exc}") from exc

    def preprocess(images: list[object]) -> torch.Tensor:
        pixels: torch.Tensor = processor(images=images, return_tensors="pt")["pixel_values"]
        return pixels

    encoder = ImageEncoder(
        model.to(device).eval(),
        preprocess,
        max_pixels=options.max_image_pixels,
        device=device,
        dtype=dtype,
    )
    logger.info(
        "loaded image model from %s on %s: %d dimensions, %d tokens per image",
        model_dir,
        encoder.placement,
        encoder.dimensions,
        encoder.max_input_tokens,
    )
    return encoder
