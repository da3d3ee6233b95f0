"""POST /v1/images/embeddings (JSON and multipart) on a tiny random DINOv3 ViT, against
transformers' AutoImageProcessor + AutoModel on the same weights."""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel, DINOv3ViTConfig, DINOv3ViTModel
from transformers.models.dinov3_vit.image_processing_dinov3_vit import DINOv3ViTImageProcessor

from tests.live import live_server, test_settings


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-dinov3-vit")
    torch.manual_seed(0)
    config = DINOv3ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_register_tokens=4,
    )
    DINOv3ViTModel(config).save_pretrained(folder)
    DINOv3ViTImageProcessor().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def url(vit_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    models_file = tmp_path_factory.mktemp("models") / "models.yaml"
    models_file.write_text(
        f"models:\n  - name: tiny-vit\n    source: {vit_dir}\n    modality: image\n"
        f"  - name: tiny-vit-raw\n    source: {vit_dir}\n    modality: image\n"
        "    normalize: false\n",
        encoding="utf-8",
    )
    with live_server(test_settings(models_file=models_file)) as base_url:
        yield base_url


def _png(seed: int, size: tuple[int, int]) -> bytes:
    pixels = (np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype("uint8")
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _reference(vit_dir: Path, images: list[bytes], *, normalize: bool = True) -> np.ndarray:
    processor = AutoImageProcessor.from_pretrained(vit_dir)
    model = AutoModel.from_pretrained(vit_dir).eval()
    decoded = [Image.open(io.BytesIO(data)).convert("RGB") for data in images]
    with torch.inference_mode():
        pooled = model(**processor(images=decoded, return_tensors="pt")).pooler_output
    if normalize:
        pooled = torch.nn.functional.normalize(pooled, dim=-1)
    return pooled.numpy()


def _assert_close(got: np.ndarray, ref: np.ndarray) -> None:
    cosine = np.sum(got * ref, axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))
    assert cosine.min() >= 0.99999, cosine
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)


def test_json_batch_with_ids(url: str, vit_dir: Path) -> None:
    images = [_png(1, (64, 48)), _png(2, (300, 200)), _png(3, (17, 90))]
    body = {
        "model": "tiny-vit",
        "images": [
            {"id": "a", "image_base64": base64.b64encode(images[0]).decode()},
            {
                "id": 7,
                "image_base64": "data:image/png;base64," + base64.b64encode(images[1]).decode(),
            },
            {"image_base64": base64.b64encode(images[2]).decode()},
        ],
    }
    response = httpx.post(f"{url}/v1/images/embeddings", json=body, timeout=60)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["ids"] == ["a", 7, None]
    assert answer["model_id"] == "tiny-vit"
    assert answer["dim"] == 32
    assert answer["latency_ms"] > 0
    assert answer["usage"]["prompt_tokens"] == 3 * (14 * 14 + 1 + 4)
    _assert_close(np.array(answer["embeddings"], dtype=np.float32), _reference(vit_dir, images))


def test_multipart_upload(url: str, vit_dir: Path) -> None:
    images = [_png(4, (120, 80)), _png(5, (33, 33))]
    files = [
        ("image", ("one.png", images[0], "image/png")),
        ("image", ("two.png", images[1], "image/png")),
    ]
    response = httpx.post(
        f"{url}/v1/images/embeddings", data={"model": "tiny-vit"}, files=files, timeout=60
    )
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["ids"] == ["one.png", "two.png"]
    _assert_close(np.array(answer["embeddings"], dtype=np.float32), _reference(vit_dir, images))


@pytest.mark.parametrize("model", ["tiny-vit", "tiny-vit-raw"])
def test_normalize_is_chosen_per_request(url: str, vit_dir: Path, model: str) -> None:
    """``normalize`` in the request wins over the entry's default, both ways."""
    image = _png(6, (50, 70))
    images = [{"image_base64": base64.b64encode(image).decode()}]
    for normalize in (False, True):
        body = {"model": model, "normalize": normalize, "images": images}
        answer = httpx.post(f"{url}/v1/images/embeddings", json=body, timeout=60).json()
        got = np.array(answer["embeddings"], dtype=np.float32)
        _assert_close(got, _reference(vit_dir, [image], normalize=normalize))
        norm = float(np.linalg.norm(got[0]))
        assert (abs(norm - 1.0) < 1e-5) is normalize, norm


def test_an_entry_that_does_not_normalize_gives_raw_vectors_on_v1_embeddings(
    url: str, vit_dir: Path
) -> None:
    image = _png(7, (40, 40))
    data_uri = "data:image/png;base64," + base64.b64encode(image).decode()
    body = {"model": "tiny-vit-raw", "input": [data_uri], "encoding_format": "float"}
    answer = httpx.post(f"{url}/v1/embeddings", json=body, timeout=60).json()
    _assert_close(
        np.array([answer["data"][0]["embedding"]], dtype=np.float32),
        _reference(vit_dir, [image], normalize=False),
    )


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        ({"model": "tiny-vit", "images": []}, "images", "at least 1 item"),
        ({"model": "tiny-vit", "images": [{"id": 1}]}, "images", "exactly one"),
        (
            {"model": "tiny-vit", "images": [{"image_base64": "bm90IGFuIGltYWdl"}]},
            "input",
            r"images\[0\]",
        ),
        (
            {"model": "all-MiniLM-L6-v2", "images": [{"image_base64": "aGk="}]},
            "model",
            "not images",
        ),
    ],
)
def test_errors_are_openai_shaped(
    url: str, body: dict[str, object], param: str, message: str
) -> None:
    response = httpx.post(f"{url}/v1/images/embeddings", json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    assert re.search(message, error["message"], re.IGNORECASE), error["message"]


def test_multipart_without_files_is_400(url: str) -> None:
    response = httpx.post(
        f"{url}/v1/images/embeddings",
        data={"model": "tiny-vit"},
        files=[("other", ("x.txt", b"x", "text/plain"))],
        timeout=60,
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "image"
