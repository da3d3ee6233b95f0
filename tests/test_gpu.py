"""The CUDA path, run where a GPU is (skipped elsewhere, e.g. in CI): every text family and every
multimodal family on ``cuda`` give the reference library's vectors (sentence-transformers and
transformers, float32 on the CPU) for the same weights: float32 within cosine 0.99999, float16 and
bfloat16 within 0.999, batched and one by one; and the length-grouped forward is one padded call
on a GPU (few large kernels are what a GPU wants)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from sentence_transformers import SentenceTransformer
from transformers import AutoModel, AutoProcessor

from benchmarks.families import FAMILIES, Family, build
from emb_model_provider.encoders.base import LoadOptions
from emb_model_provider.encoders.multimodal import load_multimodal_encoder
from emb_model_provider.encoders.text import load_text_encoder
from tests.tiny_multimodal import BUILDERS

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

TEXTS = [
    "a",
    "Hello World, how ARE you today?",
    "ünïcödé 日本語 🙂 — ça va?",
    "word " * 200,
    "A medium sentence about embeddings and vector search.",
    "Another one, of another length, to make the padding uneven across the batch.",
]
MULTIMODAL = ["clip", "siglip", "siglip2"]
LONG_TEXT = "the quick brown fox jumps over the lazy dog " * 30  # over 77 and 64 tokens
#: Cosine to the float32 reference each dtype must reach.
BOUND = {"float32": 0.99999, "float16": 0.999, "bfloat16": 0.999}


def _unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _assert_close(got: np.ndarray, ref: np.ndarray, dtype: str, what: object) -> None:
    cosine = np.sum(_unit(got) * ref, axis=1)
    assert cosine.min() >= BOUND[dtype], (what, dtype, cosine)


@pytest.fixture(scope="module")
def text_models(tmp_path_factory: pytest.TempPathFactory) -> dict[Family, Path]:
    root = tmp_path_factory.mktemp("gpu-families")
    return {
        family: build(family, root / family, "tiny", seed=index)
        for index, family in enumerate(FAMILIES)
    }


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_text_family_on_cuda(text_models: dict[Family, Path], family: Family, dtype: str) -> None:
    ref = SentenceTransformer(str(text_models[family]), device="cpu").encode(
        TEXTS, normalize_embeddings=True
    )
    encoder = load_text_encoder(
        str(text_models[family]),
        revision=None,
        max_input_tokens=None,
        pooling=None,
        options=LoadOptions(device="cuda", dtype=dtype),
    )
    try:
        assert encoder.placement.startswith("cuda")
        assert encoder.backend == (
            "bert-unpadded" if family in ("bert", "roberta", "xlm-roberta") else "length-grouped"
        )
        assert encoder.pad_share is None  # the whole batch in one padded forward on a GPU
        batched = encoder.encode(encoder.prepare(TEXTS, truncate=True))
        single = np.concatenate(
            [encoder.encode(encoder.prepare([text], truncate=True)) for text in TEXTS]
        )
        _assert_close(batched, ref, dtype, (family, "batched"))
        _assert_close(single, ref, dtype, (family, "one by one"))
    finally:
        encoder.close()


def _png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _features(folder: Path, family: str, texts: list[str], images: list[bytes]) -> np.ndarray:
    """transformers float32 on the CPU: the processor as the model cards call it, the model's
    own text and image features, L2-normalised (texts first, then images)."""
    processor: Any = AutoProcessor.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    text_kwargs: dict[str, object] = (
        {"padding": True, "truncation": True}
        if family == "clip"
        else {"padding": "max_length", "max_length": 64, "truncation": True}
    )
    decoded = [Image.open(io.BytesIO(data)).convert("RGB") for data in images]
    with torch.inference_mode():
        text = model.get_text_features(
            **processor(text=texts, return_tensors="pt", **text_kwargs)
        ).pooler_output
        image = model.get_image_features(
            **processor(images=decoded, return_tensors="pt")
        ).pooler_output
    return _unit(torch.cat([text, image]).numpy())


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("family", MULTIMODAL)
def test_multimodal_on_cuda(tmp_path: Path, family: str, dtype: str) -> None:
    folder = BUILDERS[family](tmp_path / family)
    texts = ["a photo of a cat", LONG_TEXT, "dog"]
    images = [_png(seed) for seed in range(3)]
    ref = _features(folder, family, texts, images)
    encoder = load_multimodal_encoder(
        str(folder),
        revision=None,
        max_input_tokens=None,
        pooling=None,
        options=LoadOptions(device="cuda", dtype=dtype),
    )
    try:
        mixed: list[str | bytes] = [texts[0], images[0], texts[1], images[1], images[2], texts[2]]
        got = encoder.encode(encoder.prepare(mixed, truncate=True))
        _assert_close(got[[0, 2, 5]], ref[:3], dtype, (family, "texts"))
        _assert_close(got[[1, 3, 4]], ref[3:], dtype, (family, "images"))
    finally:
        encoder.close()
