"""``encoding_format`` int8, uint8, binary and ubinary: integers as sentence-transformers'
``quantize_embeddings`` gives them, with int8/uint8 ranges fixed per model by a calibration set
(the built-in one, or a models file's), never by the batch; through a live server and the OpenAI
SDK, compared with the library on the same weights."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from PIL import Image
from sentence_transformers import SentenceTransformer
from sentence_transformers.util.quantization import quantize_embeddings

from benchmarks.families import build
from emb_model_provider.core.quantization import calibration_texts, ranges_of
from tests.conftest import BUNDLED_DIR, DEFAULT_MODEL
from tests.live import live_server, test_settings
from tests.tiny_models import tiny_dinov3_vit
from tests.tiny_text_models import text_models_file

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "How do I quantize embeddings?",
    "ünïcödé 日本語 🙂",
    "a",
    "Vector databases store int8 and binary vectors to save memory. " * 5,
]
FORMATS = ("int8", "uint8", "binary", "ubinary")
OWN_CALIBRATION = [
    f"calibration text number {index}: {word}"
    for index, word in enumerate(("apple", "river", "engine", "poem", "tax", "storm") * 20)
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build("bert", tmp_path_factory.mktemp("quantized") / "bert", "tiny", seed=3)


@pytest.fixture(scope="module")
def server(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("quantized-models")
    (root / "calibration.txt").write_text("\n".join(OWN_CALIBRATION), encoding="utf-8")
    models = text_models_file(
        root / "models.yaml",
        [
            {"name": "q-own", "source": str(tiny_dir), "calibration_texts": "calibration.txt"},
            {"name": "q-vit", "source": str(tiny_dinov3_vit(root / "vit")), "modality": "image"},
        ],
    )
    with live_server(test_settings(models_file=models)) as url:
        yield url


@pytest.fixture(scope="module")
def http(server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, timeout=60) as session:
        yield session


def _embed(http: httpx.Client, **body: Any) -> list[Any]:
    response = http.post("/v1/embeddings", json={"model": DEFAULT_MODEL, **body})
    assert response.status_code == 200, response.text
    return [item["embedding"] for item in response.json()["data"]]


def _ranges(model: SentenceTransformer, texts: list[str]) -> np.ndarray:
    return ranges_of(np.asarray(model.encode(texts, normalize_embeddings=True)))


@pytest.mark.parametrize("dimensions", [None, 64])
@pytest.mark.parametrize("precision", FORMATS)
def test_quantized_vectors_match_the_library(
    http: httpx.Client, precision: str, dimensions: int | None
) -> None:
    reference = SentenceTransformer(str(BUNDLED_DIR), device="cpu", truncate_dim=dimensions)
    extra = {} if dimensions is None else {"dimensions": dimensions}
    ours = np.array(_embed(http, input=TEXTS, encoding_format=precision, **extra))
    floats = np.array(_embed(http, input=TEXTS, encoding_format="float", **extra), np.float32)
    ranges = _ranges(reference, calibration_texts()) if precision.endswith("int8") else None
    # On our own floats, with ranges from our own floats of the calibration set (the server
    # embeds it 64 at a time), the library gives the very same integers.
    own_ranges = None
    if precision.endswith("int8"):
        texts = calibration_texts()
        calibration = np.concatenate(
            [
                np.array(_embed(http, input=texts[start : start + 64], **extra), np.float32)
                for start in range(0, len(texts), 64)
            ]
        )
        own_ranges = ranges_of(calibration)
    mine = quantize_embeddings(floats, precision, ranges=own_ranges)  # type: ignore[arg-type]
    assert isinstance(mine, np.ndarray)
    np.testing.assert_array_equal(ours, mine.astype(np.int64))
    # On the library's floats (the same within float32 rounding), at most a bucket apart where a
    # value sits on a bucket's edge, and equal nearly everywhere.
    theirs = quantize_embeddings(
        np.asarray(reference.encode(TEXTS, normalize_embeddings=True)),
        precision,  # type: ignore[arg-type]
        ranges=ranges,
    )
    assert isinstance(theirs, np.ndarray)
    difference = np.abs(ours - theirs.astype(np.int64))
    if precision.endswith("binary"):
        assert (difference == 0).mean() > 0.99
    else:
        assert difference.max() <= 1
        assert (difference == 0).mean() > 0.99
    width = (dimensions or 384) // 8 if precision.endswith("binary") else dimensions or 384
    assert ours.shape == (len(TEXTS), width)


@pytest.mark.parametrize("precision", FORMATS)
def test_a_text_gets_the_same_integers_alone_and_in_any_batch(
    http: httpx.Client, precision: str
) -> None:
    batch = _embed(http, input=TEXTS, encoding_format=precision)
    reversed_batch = _embed(http, input=TEXTS[::-1], encoding_format=precision)[::-1]
    for index, text in enumerate(TEXTS):
        alone = _embed(http, input=text, encoding_format=precision)[0]
        assert alone == batch[index] == reversed_batch[index]


def test_a_models_file_calibration_set_fixes_the_ranges(http: httpx.Client, tiny_dir: Path) -> None:
    reference = SentenceTransformer(str(tiny_dir), device="cpu")
    ranges = _ranges(reference, OWN_CALIBRATION)
    ours = np.array(_embed(http, model="q-own", input=TEXTS, encoding_format="uint8"))
    floats = np.array(_embed(http, model="q-own", input=TEXTS, encoding_format="float"))
    expected = quantize_embeddings(floats.astype(np.float32), "uint8", ranges=ranges)
    assert isinstance(expected, np.ndarray)
    # Ranges from our own vectors of the same texts differ from the library's in float32 rounding.
    assert np.abs(ours - expected.astype(np.int64)).max() <= 1
    cards = {card["id"]: card for card in http.get("/v1/models").json()["data"]}
    assert "calibration.txt" in cards["q-own"]["quantization_ranges"]
    assert "built-in calibration set" in cards[DEFAULT_MODEL]["quantization_ranges"]
    assert cards["q-vit"]["quantization_ranges"].startswith("none")


def test_image_models_take_binary_but_refuse_int8(http: httpx.Client) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (90, 160, 30)).save(buffer, format="PNG")
    image = f"data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}"
    binary = _embed(http, model="q-vit", input=[{"image": image}], encoding_format="ubinary")
    assert all(0 <= value <= 255 for value in binary[0])
    refused = http.post(
        "/v1/embeddings",
        json={"model": "q-vit", "input": [{"image": image}], "encoding_format": "int8"},
    )
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "encoding_format"
    assert _embed(http, input="still serving", encoding_format="int8")


def test_the_openai_sdk_passes_the_extension_through(server: str, http: httpx.Client) -> None:
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    response = client.embeddings.create(
        model=DEFAULT_MODEL,
        input=TEXTS[:2],
        encoding_format="int8",  # type: ignore[arg-type]
    )
    assert [item.embedding for item in response.data] == _embed(
        http, input=TEXTS[:2], encoding_format="int8"
    )
    floats = client.embeddings.create(model=DEFAULT_MODEL, input=TEXTS[:2])  # base64 underneath
    assert len(floats.data[0].embedding) == 384


def test_an_unknown_format_is_a_400(http: httpx.Client) -> None:
    response = http.post(
        "/v1/embeddings", json={"model": DEFAULT_MODEL, "input": "x", "encoding_format": "int4"}
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "encoding_format"
