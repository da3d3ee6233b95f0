"""Image embeddings end to end: a live server on tiny random DINOv3 models against transformers."""

from __future__ import annotations

import base64
import http.server
import io
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import httpx
import numpy as np
import openai
import pytest
import torch
from numpy.testing import assert_allclose
from PIL import Image, ImageOps
from transformers import (
    AutoImageProcessor,
    AutoModel,
)

from tests.live import live_server, test_settings
from tests.tiny_models import image_models_file, tiny_dinov3_convnext, tiny_dinov3_vit

TEXT_MODEL = "all-MiniLM-L6-v2"
MIN_COSINE = 0.99999


@dataclass(frozen=True)
class TinyModel:
    name: str
    path: Path


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TinyModel]:
    root = tmp_path_factory.mktemp("dinov3")
    vit = tiny_dinov3_vit(root / "vit")
    cnx = tiny_dinov3_convnext(root / "cnx")
    return {"tiny-vit": TinyModel("tiny-vit", vit), "tiny-cnx": TinyModel("tiny-cnx", cnx)}


@pytest.fixture(scope="module")
def models_file(
    tiny_models: dict[str, TinyModel], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    path = tmp_path_factory.mktemp("models") / "models.yaml"
    return image_models_file(path, {model.name: model.path for model in tiny_models.values()})


@pytest.fixture(scope="module")
def server_url(models_file: Path) -> Iterator[str]:
    with live_server(test_settings(models_file=models_file, url_allowlist="127.0.0.1/32")) as url:
        yield url


@pytest.fixture(scope="module")
def client(server_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server_url}/v1", api_key="test-key", max_retries=0)


def _handler_for(files: dict[str, tuple[bytes, str]]) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body, content_type = files[self.path]
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # keeps pytest output quiet
            pass

    return Handler


@pytest.fixture(scope="module")
def image_host() -> Iterator[tuple[str, dict[str, tuple[bytes, str]]]]:
    """A local HTTP server standing in for the outside network; tests add files to its dict."""
    files: dict[str, tuple[bytes, str]] = {}
    handler = _handler_for(files)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", files
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@dataclass
class Reference:
    """transformers on the same weights: AutoImageProcessor + AutoModel, pooler_output, L2."""

    path: Path

    def __post_init__(self) -> None:
        self.processor = AutoImageProcessor.from_pretrained(self.path)  # type: ignore[no-untyped-call]
        self.model = AutoModel.from_pretrained(self.path).eval()

    def embed(self, images: list[Image.Image]) -> np.ndarray:
        with torch.inference_mode():
            out = self.model(**self.processor(images=images, return_tensors="pt"))
        return torch.nn.functional.normalize(out.pooler_output, dim=-1).numpy()

    def tokens_per_image(self) -> int:
        with torch.inference_mode():
            out = self.model(**self.processor(images=[_rgb_image(32, 48)], return_tensors="pt"))
        return int(out.last_hidden_state.shape[1])


@pytest.fixture(scope="module")
def references(tiny_models: dict[str, TinyModel]) -> dict[str, Reference]:
    return {name: Reference(model.path) for name, model in tiny_models.items()}


def _rgb_image(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def _encode(image: Image.Image, fmt: str, **save: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save)
    return buffer.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _data_uri(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{_b64(data)}"


def _decoded(data: bytes) -> Image.Image:
    """What the server should see: EXIF transpose, then RGB with any alpha over white."""
    image = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    if image.mode == "RGBA":
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image).convert("RGB")
    return image.convert("RGB")


def _png_rgb() -> bytes:
    return _encode(_rgb_image(90, 120, seed=1), "PNG")


def _jpeg_exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    return _encode(_rgb_image(120, 60, seed=2), "JPEG", quality=95, exif=exif)


def _rgba_transparent() -> bytes:
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (80, 100, 4), dtype=np.uint8)
    pixels[:40, :, 3] = 0  # the top half fully transparent; the rest partly
    return _encode(Image.fromarray(pixels, "RGBA"), "PNG")


def _grayscale() -> bytes:
    pixels = np.random.default_rng(4).integers(0, 256, (70, 70), dtype=np.uint8)
    return _encode(Image.fromarray(pixels, "L"), "PNG")


IMAGES = {
    "png_rgb": _png_rgb,
    "jpeg_exif_orientation_6": _jpeg_exif_rotated,
    "rgba_transparent": _rgba_transparent,
    "grayscale_l": _grayscale,
}


def _sdk(value: object) -> list[str]:
    """The SDK's `input` type knows only text and tokens; the server also takes {"image": ...}."""
    return cast("list[str]", value)


def _vectors(response: openai.types.CreateEmbeddingResponse) -> np.ndarray:
    assert [item.index for item in response.data] == list(range(len(response.data)))
    return np.array([item.embedding for item in response.data], dtype=np.float64)


def _assert_same_direction(got: np.ndarray, expected: np.ndarray) -> None:
    assert got.shape == expected.shape
    assert_allclose(np.linalg.norm(got, axis=-1), 1.0, atol=1e-5)
    cosines = np.sum(got * expected, axis=-1) / np.linalg.norm(expected, axis=-1)
    assert np.all(cosines >= MIN_COSINE), cosines


MODELS = ["tiny-vit", "tiny-cnx"]


def test_jpeg_fixture_really_carries_orientation() -> None:
    image = Image.open(io.BytesIO(_jpeg_exif_rotated()))
    assert image.getexif()[0x0112] == 6
    assert ImageOps.exif_transpose(image).size == (60, 120)


@pytest.mark.parametrize("model", MODELS)
def test_reference_tells_decoding_mistakes_apart(
    references: dict[str, Reference], model: str
) -> None:
    """Guards the threshold: a missed EXIF transpose or alpha on black would fall below it."""
    reference = references[model]
    jpeg, rgba = _jpeg_exif_rotated(), _rgba_transparent()
    right = reference.embed([_decoded(jpeg), _decoded(rgba)])
    wrong = reference.embed([Image.open(io.BytesIO(d)).convert("RGB") for d in (jpeg, rgba)])
    assert np.all(np.sum(right * wrong, axis=-1) < MIN_COSINE)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("kind", list(IMAGES))
@pytest.mark.parametrize("encoding_format", ["base64", "float"])
def test_matches_transformers(
    client: openai.OpenAI,
    references: dict[str, Reference],
    model: str,
    kind: str,
    encoding_format: str,
) -> None:
    data = IMAGES[kind]()
    expected = references[model].embed([_decoded(data)])
    if encoding_format == "base64":
        # The SDK asks for base64 by default and decodes it to floats for us.
        response = client.embeddings.create(model=model, input=_sdk([{"image": _data_uri(data)}]))
    else:
        response = client.embeddings.create(
            model=model,
            input=_sdk([{"image": _data_uri(data)}]),
            encoding_format="float",
        )
    _assert_same_direction(_vectors(response), expected)
    assert response.model == model


@pytest.mark.parametrize("model", MODELS)
def test_mixed_batch_keeps_order_and_counts_tokens(
    client: openai.OpenAI, references: dict[str, Reference], model: str
) -> None:
    images = [
        _encode(_rgb_image(40, 300, seed=10), "PNG"),
        _jpeg_exif_rotated(),
        _encode(_rgb_image(500, 90, seed=11), "PNG"),
        _rgba_transparent(),
        _grayscale(),
        _encode(_rgb_image(16, 16, seed=12), "PNG"),
    ]
    reference = references[model]
    expected = reference.embed([_decoded(data) for data in images])
    response = client.embeddings.create(
        model=model, input=_sdk([{"image": _data_uri(d)} for d in images])
    )
    got = _vectors(response)
    _assert_same_direction(got, expected)
    assert response.usage.prompt_tokens == reference.tokens_per_image() * len(images)
    assert response.usage.total_tokens == response.usage.prompt_tokens
    # Batch equals single, item by item.
    single = _vectors(
        client.embeddings.create(model=model, input=_sdk([{"image": _data_uri(images[2])}]))
    )
    _assert_same_direction(single, got[2:3])


def test_tokens_per_image_are_what_the_reference_model_produces(
    references: dict[str, Reference],
) -> None:
    # ViT: 224/16 = 14 patches a side, + CLS + 4 registers; ConvNeXt: 7x7 + pooled.
    assert references["tiny-vit"].tokens_per_image() == 14 * 14 + 1 + 4
    assert references["tiny-cnx"].tokens_per_image() == 50


@pytest.mark.parametrize("model", MODELS)
def test_every_input_form_gives_the_same_vector(
    client: openai.OpenAI,
    references: dict[str, Reference],
    image_host: tuple[str, dict[str, tuple[bytes, str]]],
    model: str,
) -> None:
    data = _png_rgb()
    expected = references[model].embed([_decoded(data)])
    host, files = image_host
    files["/forms.png"] = (data, "image/png")
    forms: list[object] = [
        _data_uri(data),
        [_data_uri(data)],
        [{"image": _data_uri(data)}],
        [{"image": _b64(data)}],
        f"{host}/forms.png",
        [{"image": f"{host}/forms.png"}],
    ]
    for form in forms:
        response = client.embeddings.create(model=model, input=_sdk(form))
        _assert_same_direction(_vectors(response), expected)
        assert response.usage.prompt_tokens == references[model].tokens_per_image()


def test_url_to_a_private_address_is_refused(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model="tiny-vit", input=_sdk([{"image": "http://10.0.0.1/x.png"}]))
    assert caught.value.status_code == 400
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["param"] == "input"


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_unreachable_allowed_url_is_a_bad_gateway(client: openai.OpenAI) -> None:
    url = f"http://127.0.0.1:{_closed_port()}/x.png"
    with pytest.raises(openai.InternalServerError) as caught:
        client.embeddings.create(model="tiny-vit", input=_sdk([{"image": url}]))
    assert caught.value.status_code == 502


def _bad_request(client: openai.OpenAI, model: str, value: object) -> dict[str, object]:
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model=model, input=_sdk(value))
    assert caught.value.status_code == 400
    body = caught.value.body
    assert isinstance(body, dict)
    assert body["type"] == "invalid_request_error"
    return body


def test_text_to_an_image_model_is_refused(client: openai.OpenAI) -> None:
    body = _bad_request(client, "tiny-vit", "a cat")
    assert "takes images" in str(body["message"])
    assert body["param"] == "input"


def test_images_to_the_text_model_are_refused(client: openai.OpenAI) -> None:
    body = _bad_request(client, TEXT_MODEL, [{"image": _data_uri(_png_rgb())}])
    assert "takes text" in str(body["message"])
    assert body["param"] == "input"


@pytest.mark.parametrize("tokens", [[1, 2, 3], [[1, 2], [3, 4]]])
def test_token_arrays_to_an_image_model_are_refused(client: openai.OpenAI, tokens: object) -> None:
    _bad_request(client, "tiny-vit", tokens)


def test_corrupt_image_is_refused_naming_its_position(client: openai.OpenAI) -> None:
    garbage = _b64(np.random.default_rng(5).bytes(512))
    body = _bad_request(client, "tiny-vit", [{"image": _data_uri(_png_rgb())}, {"image": garbage}])
    assert "input[1]" in str(body["message"])


def test_decompression_bomb_is_refused(client: openai.OpenAI) -> None:
    bomb = _encode(Image.new("L", (20000, 20000)), "PNG")
    assert len(bomb) < 1024 * 1024  # small on the wire, 400 megapixels declared
    body = _bad_request(client, "tiny-vit", [{"image": _data_uri(bomb)}])
    assert body["param"] == "input"


@pytest.mark.parametrize("model", MODELS)
def test_dimensions_is_a_unit_length_prefix(
    client: openai.OpenAI, references: dict[str, Reference], model: str
) -> None:
    data = _png_rgb()
    full = references[model].embed([_decoded(data)])[0]
    dims = 8
    response = client.embeddings.create(
        model=model, input=_sdk([{"image": _data_uri(data)}]), dimensions=dims
    )
    got = _vectors(response)[0]
    assert got.shape == (dims,)
    prefix = full[:dims] / np.linalg.norm(full[:dims])
    assert_allclose(np.linalg.norm(got), 1.0, atol=1e-5)
    assert float(got @ prefix) >= MIN_COSINE


def test_models_lists_image_models(server_url: str) -> None:
    response = httpx.get(f"{server_url}/v1/models", timeout=30)
    assert response.status_code == 200
    cards = {card["id"]: card for card in response.json()["data"]}
    for name in MODELS:
        assert cards[name]["modality"] == "image"
    assert cards["dinov3-vits16"]["modality"] == "image"
    assert cards["dinov3-vits16"]["dimensions"] == 384
    assert cards["dinov3-convnext-tiny"]["modality"] == "image"
    assert cards[TEXT_MODEL]["modality"] == "text"


def test_server_alive_after_errors(client: openai.OpenAI) -> None:
    response = client.embeddings.create(model="tiny-vit", input=_sdk([{"image": _b64(_png_rgb())}]))
    assert len(response.data) == 1
