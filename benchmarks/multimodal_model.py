"""A CLIP model for the multimodal benchmark: the shapes of openai/clip-vit-base-patch32 (or tiny
ones for a smoke test) with random weights and its processor, saved to a folder, plus the raw
transformers forward the server is compared with.

    uv run python benchmarks/multimodal_model.py /tmp/clip-b32            # build, full size
    uv run python benchmarks/multimodal_model.py /tmp/clip-tiny --size tiny

For the benchmark runner::

    from benchmarks.multimodal_model import RawForward, build, models_file
    folder = build(Path(tmp) / "clip-b32")                # size="full": ViT-B/32, 512 dims
    models = models_file(Path(tmp) / "models.yaml", folder)  # serves it as "clip-b32"
    raw = RawForward(folder)                              # time raw.texts(batch), raw.images(batch)

The builder is the tests' (tests/tiny_multimodal.py), so the benchmark and the tests build one
model the same way.
"""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import torch
from PIL import Image, ImageOps
from transformers import AutoModel, AutoProcessor

# Run as a script (benchmarks/ first on sys.path) or imported from the repository root.
_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from tests.tiny_multimodal import tiny_clip  # noqa: E402 - after the path set-up above

MODEL_NAME = "clip-b32"


def build(path: Path, size: Literal["full", "tiny"] = "full", *, seed: int = 0) -> Path:
    """A random-weight CLIP with its processor in ``path``: ViT-B/32 shapes (``"full"``: 12+12
    layers, 224 pixels, 77 text tokens, 512 dimensions) or 2-layer towers (``"tiny"``)."""
    return Path(tiny_clip(path, seed=seed, size=size))


def models_file(path: Path, folder: Path, name: str = MODEL_NAME) -> Path:
    """A models file serving ``folder`` as the multimodal model ``name``."""
    path.write_text(
        f"models:\n  - name: {name}\n    source: {folder}\n    modality: multimodal\n",
        encoding="utf-8",
    )
    return path


class RawForward:
    """The reference: transformers' processor and ``get_text_features`` /
    ``get_image_features`` on the same folder, under ``inference_mode``, L2-normalised."""

    def __init__(self, folder: Path) -> None:
        # Untyped in transformers.
        self.processor = cast(Callable[[Path], Any], AutoProcessor.from_pretrained)(folder)
        self.model = AutoModel.from_pretrained(folder).eval()

    def texts(self, texts: list[str]) -> np.ndarray:
        inputs = self.processor(text=texts, padding=True, truncation=True, return_tensors="pt")
        with torch.inference_mode():
            features = self.model.get_text_features(**inputs).pooler_output
        return torch.nn.functional.normalize(features, dim=-1).numpy()

    def images(self, images: list[bytes]) -> np.ndarray:
        # As the server decodes: EXIF orientation applied (inputs/images.py).
        pictures = [
            ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB") for data in images
        ]
        inputs = self.processor(images=pictures, return_tensors="pt")
        with torch.inference_mode():
            features = self.model.get_image_features(**inputs).pooler_output
        return torch.nn.functional.normalize(features, dim=-1).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", type=Path)
    parser.add_argument("--size", choices=("full", "tiny"), default="full")
    args = parser.parse_args()
    build(args.path, args.size)


if __name__ == "__main__":
    main()
