"""CLIP, SigLIP and SigLIP 2 end to end: a live server on tiny random models against transformers'
``get_text_features`` / ``get_image_features`` on the same folders, texts and images mixed."""

from __future__ import annotations

import asyncio
import base64
import http.server
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import torch
from qdrant_client import QdrantClient, models
from transformers import AutoModel, AutoProcessor

from emb_model_provider.core import model_thread
from emb_model_provider.encoders.base import PreparedInput
from emb_model_provider.encoders.runtime import image_prepare_thread
from emb_model_provider.services.embedding_service import EmbeddingService, RequestLimits
from tests.live import live_server, test_settings
from tests.test_cache import cache_status
from tests.test_image_embeddings import (
    _assert_same_direction,
    _decoded,
    _encode,
    _jpeg_exif_rotated,
    _png_rgb,
    _rgb_image,
    _sdk,
    _vectors,
)
from tests.tiny_models import tiny_dinov3_vit
from tests.tiny_multimodal import BUILDERS

MIN_COSINE = 0.99999
FAMILIES = ["clip", "siglip", "siglip2"]
TEXT_MODEL = "all-MiniLM-L6-v2"
LONG_TEXT = "the quick brown fox jumps over the lazy dog " * 30  # over 77 and 64 tokens


@dataclass
class Reference:
    """transformers on the same folder: the processor as the model cards call it, the model's
    own features, L2-normalised."""

    family: str
    path: Path

    def __post_init__(self) -> None:
        self.processor: Any = AutoProcessor.from_pretrained(self.path)
        self.model = AutoModel.from_pretrained(self.path).eval()

    def _text_kwargs(self) -> dict[str, object]:
        if self.family == "clip":
            return {"padding": True, "truncation": True}
        return {"padding": "max_length", "max_length": 64, "truncation": True}

    def texts(self, texts: list[str]) -> np.ndarray:
        inputs = self.processor(text=texts, return_tensors="pt", **self._text_kwargs())
        with torch.inference_mode():
            features = self.model.get_text_features(**inputs).pooler_output
        return torch.nn.functional.normalize(features, dim=-1).numpy()

    def images(self, images: list[bytes]) -> np.ndarray:
        inputs = self.processor(images=[_decoded(data) for data in images], return_tensors="pt")
        with torch.inference_mode():
            features = self.model.get_image_features(**inputs).pooler_output
        return torch.nn.functional.normalize(features, dim=-1).numpy()

    def text_tokens(self, texts: list[str]) -> int:
        limit = 77 if self.family == "clip" else 64
        encoded = self.processor.tokenizer(texts, truncation=True, max_length=limit)
        return sum(len(ids) for ids in encoded["input_ids"])

    def image_tokens(self, images: list[bytes]) -> int:
        inputs = self.processor(images=[_decoded(data) for data in images], return_tensors="pt")
        if "pixel_attention_mask" in inputs:
            return int(inputs["pixel_attention_mask"].sum())
        with torch.inference_mode():
            positions = self.model.get_image_features(**inputs).last_hidden_state.shape[1]
        return positions * len(images)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("multimodal")
    built = {family: BUILDERS[family](root / family) for family in FAMILIES}
    built["tiny-dinov3"] = tiny_dinov3_vit(root / "dinov3")
    return built


@pytest.fixture(scope="module")
def references(folders: dict[str, Path]) -> dict[str, Reference]:
    return {family: Reference(family, folders[family]) for family in FAMILIES}


@pytest.fixture(scope="module")
def models_file(folders: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    lines = ["models:"]
    for family in FAMILIES:
        lines += [f"  - name: tiny-{family}", f"    source: {folders[family]}"]
        lines += ["    modality: multimodal"]
    lines += [
        "  - name: tiny-dinov3",
        f"    source: {folders['tiny-dinov3']}",
        "    modality: image",
    ]
    path = tmp_path_factory.mktemp("models") / "models.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def server_url(models_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    settings = test_settings(
        models_file=models_file,
        url_allowlist="127.0.0.1/32",
        cache="memory",
        data_dir=tmp_path_factory.mktemp("batch-data"),
    )
    with live_server(settings) as url:
        yield url


@pytest.fixture(scope="module")
def client(server_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server_url}/v1", api_key="test-key", max_retries=0)


@pytest.fixture(scope="module")
def image_host() -> Iterator[tuple[str, dict[str, bytes]]]:
    """A local HTTP server standing in for the outside network."""
    files: dict[str, bytes] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = files[self.path]
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # keeps pytest output quiet
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", files
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def _png(seed: int, size: tuple[int, int] = (48, 40)) -> bytes:
    return _encode(_rgb_image(*size, seed=seed), "PNG")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _uri(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{_b64(data)}"


@pytest.mark.parametrize("family", FAMILIES)
def test_texts_match_transformers(
    client: openai.OpenAI, references: dict[str, Reference], family: str
) -> None:
    reference = references[family]
    texts = ["a photo of a cat", "dog", "Two CATS asleep, on a red sofa!", LONG_TEXT]
    expected = reference.texts(texts)
    # The SDK's default: base64 float32.
    response = client.embeddings.create(model=f"tiny-{family}", input=texts)
    _assert_same_direction(_vectors(response), expected)
    assert response.usage.prompt_tokens == reference.text_tokens(texts)
    floats = client.embeddings.create(model=f"tiny-{family}", input=texts, encoding_format="float")
    _assert_same_direction(_vectors(floats), expected)
    # One at a time equals the batch (fixed-length padding for SigLIP, per batch for CLIP).
    single = client.embeddings.create(model=f"tiny-{family}", input=texts[1])
    _assert_same_direction(_vectors(single), expected[1:2])


@pytest.mark.parametrize("family", FAMILIES)
def test_images_match_transformers(
    client: openai.OpenAI,
    references: dict[str, Reference],
    image_host: tuple[str, dict[str, bytes]],
    family: str,
) -> None:
    reference = references[family]
    host, files = image_host
    png, jpeg, remote = _png_rgb(), _jpeg_exif_rotated(), _png(7, (30, 70))
    files["/remote.png"] = remote
    inputs = [
        _uri(png),
        {"image": _uri(jpeg, "image/jpeg")},
        {"image": _b64(png)},  # bare base64 inside an image object
        {"image": f"{host}/remote.png"},
    ]
    images = [png, jpeg, png, remote]
    response = client.embeddings.create(model=f"tiny-{family}", input=_sdk(inputs))
    _assert_same_direction(_vectors(response), reference.images(images))
    assert response.usage.prompt_tokens == reference.image_tokens(images)


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_request_keeps_input_order(
    client: openai.OpenAI,
    server_url: str,
    references: dict[str, Reference],
    image_host: tuple[str, dict[str, bytes]],
    family: str,
) -> None:
    reference = references[family]
    host, files = image_host
    files["/cat.png"] = _png(11)
    url = f"{host}/cat.png"
    png, jpeg = _png(12), _jpeg_exif_rotated()
    # A bare http(s) string is text, even one that names an image.
    inputs = ["a photo of a cat", {"image": _uri(png)}, url, _uri(jpeg, "image/jpeg"), LONG_TEXT]
    inputs += [{"image": url}]
    texts = reference.texts(["a photo of a cat", url, LONG_TEXT])
    images = reference.images([png, jpeg, files["/cat.png"]])
    expected = np.stack([texts[0], images[0], texts[1], images[1], texts[2], images[2]])
    response = client.embeddings.create(model=f"tiny-{family}", input=_sdk(inputs))
    _assert_same_direction(_vectors(response), expected)
    tokens = reference.text_tokens(["a photo of a cat", url, LONG_TEXT])
    tokens += reference.image_tokens([png, jpeg, files["/cat.png"]])
    assert response.usage.prompt_tokens == tokens
    # Again: the result cache answers every input, in the same order and with the same usage.
    before = cache_status(server_url)["hits"]
    again = client.embeddings.create(model=f"tiny-{family}", input=_sdk(inputs))
    _assert_same_direction(_vectors(again), expected)
    assert again.usage.prompt_tokens == tokens
    assert cache_status(server_url)["hits"] == before + len(inputs)  # type: ignore[operator]


def test_dimensions_are_renormalised_prefixes(
    client: openai.OpenAI, references: dict[str, Reference]
) -> None:
    reference = references["clip"]
    png = _png(21)
    response = client.embeddings.create(
        model="tiny-clip", input=_sdk(["a dog", {"image": _uri(png)}]), dimensions=8
    )
    full = np.concatenate([reference.texts(["a dog"]), reference.images([png])])[:, :8]
    _assert_same_direction(_vectors(response), full / np.linalg.norm(full, axis=-1, keepdims=True))


def test_concurrent_requests_merged_in_batches_keep_their_vectors(
    client: openai.OpenAI, references: dict[str, Reference]
) -> None:
    """The batcher merges texts and images of many requests; each gets its own rows."""
    reference = references["siglip2"]
    requests: list[list[object]] = []
    expected: list[np.ndarray] = []
    for index in range(12):
        text, png = f"photo number {index} of a dog", _png(100 + index, (20 + index, 36))
        kind = index % 3
        if kind == 0:
            requests.append([text])
            expected.append(reference.texts([text]))
        elif kind == 1:
            requests.append([{"image": _uri(png)}])
            expected.append(reference.images([png]))
        else:
            requests.append([{"image": _uri(png)}, text])
            expected.append(np.concatenate([reference.images([png]), reference.texts([text])]))

    def send(inputs: list[object]) -> np.ndarray:
        return _vectors(client.embeddings.create(model="tiny-siglip2", input=_sdk(inputs)))

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(send, requests))
    for got, want in zip(results, expected, strict=True):
        _assert_same_direction(got, want)


def test_images_api_takes_multimodal_models(
    server_url: str, references: dict[str, Reference]
) -> None:
    images = [_png(31), _jpeg_exif_rotated()]
    response = httpx.post(
        f"{server_url}/v1/images/embeddings",
        json={
            "model": "tiny-siglip",
            "images": [{"id": i, "image_base64": _b64(data)} for i, data in enumerate(images)],
        },
        timeout=60,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["ids"] == [0, 1]
    assert body["dim"] == 32
    _assert_same_direction(np.asarray(body["embeddings"]), references["siglip"].images(images))


def test_text_models_refuse_images_and_image_models_refuse_text(client: openai.OpenAI) -> None:
    png = _uri(_png(41))
    with pytest.raises(openai.BadRequestError) as text_model:
        client.embeddings.create(model=TEXT_MODEL, input=_sdk(["a cat", {"image": png}]))
    assert "takes text" in text_model.value.message
    assert text_model.value.body["param"] == "input"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as image_model:
        client.embeddings.create(model="tiny-dinov3", input=_sdk([{"image": png}, "a cat"]))
    assert "takes images" in image_model.value.message
    # The server is still there, and the image model still takes its images.
    assert len(client.embeddings.create(model="tiny-dinov3", input=_sdk([png])).data) == 1


def test_bad_inputs_are_named(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        client.embeddings.create(
            model="tiny-clip", input=_sdk(["fine", {"image": _b64(b"not an image")}])
        )
    assert "input[1]" in bad.value.message


def test_qdrant_text_to_image_search(
    client: openai.OpenAI, references: dict[str, Reference]
) -> None:
    reference = references["clip"]
    top = 3
    corpus = [_png(seed, (24 + 3 * seed, 40)) for seed in range(10)]
    indexed = client.embeddings.create(
        model="tiny-clip", input=_sdk([{"image": _uri(data)} for data in corpus])
    ).data
    store = QdrantClient(":memory:")
    store.create_collection(
        "images",
        vectors_config=models.VectorParams(size=len(indexed[0].embedding), distance="Cosine"),
    )
    store.upsert(
        "images",
        points=[models.PointStruct(id=item.index, vector=item.embedding) for item in indexed],
    )
    queries = ["a photo of a cat", "a blue car parked in the street at night", "green trees"]
    found = client.embeddings.create(model="tiny-clip", input=queries).data
    image_features = reference.images(corpus)
    for query, expected_vector in zip(found, reference.texts(queries), strict=True):
        expected = [int(i) for i in np.argsort(-(image_features @ expected_vector))[:top]]
        hits = store.query_points(collection_name="images", query=query.embedding, limit=top)
        assert [int(hit.id) for hit in hits.points] == expected
    store.close()


def test_batch_api_lines_with_mixed_inputs(
    client: openai.OpenAI, references: dict[str, Reference]
) -> None:
    png = _png(51)
    bodies = {
        "mixed": {"model": "tiny-clip", "input": ["a cat", {"image": _uri(png)}]},
        "images": {"model": "tiny-siglip2", "input": [_uri(png)], "encoding_format": "base64"},
        "text": {"model": "tiny-siglip", "input": "a dog"},
    }
    lines = [
        {"custom_id": key, "method": "POST", "url": "/v1/embeddings", "body": body}
        for key, body in bodies.items()
    ]
    raw = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    file_id = client.files.create(file=("input.jsonl", raw), purpose="batch").id
    batch = client.batches.create(
        input_file_id=file_id, endpoint="/v1/embeddings", completion_window="24h"
    )
    deadline = time.monotonic() + 90
    while batch.status not in {"completed", "failed", "expired", "cancelled"}:
        assert time.monotonic() < deadline, batch.status
        time.sleep(0.05)  # polling interval under a deadline
        batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed", batch
    assert batch.output_file_id is not None
    outputs = {}
    for line in client.files.content(batch.output_file_id).text.splitlines():
        item = json.loads(line)
        assert item["response"]["status_code"] == 200, item
        outputs[item["custom_id"]] = [
            np.frombuffer(base64.b64decode(row["embedding"]), dtype="<f4")
            if isinstance(row["embedding"], str)
            else np.asarray(row["embedding"])
            for row in item["response"]["body"]["data"]
        ]
    expected = {
        "mixed": np.concatenate(
            [references["clip"].texts(["a cat"]), references["clip"].images([png])]
        ),
        "images": references["siglip2"].images([png]),
        "text": references["siglip"].texts(["a dog"]),
    }
    for key, want in expected.items():
        _assert_same_direction(np.stack(outputs[key]).astype(np.float64), want)


def test_models_list_the_modality(client: openai.OpenAI) -> None:
    card = client.models.retrieve("tiny-clip")
    assert card.model_extra is not None
    assert card.model_extra["modality"] == "multimodal"


def test_builtin_entries() -> None:
    from emb_model_provider.registry import Registry

    registry = Registry.from_settings(None)
    clip = registry.get("openai/clip-vit-base-patch32")
    siglip = registry.get("siglip2-base-patch16-224")
    assert (clip.name, clip.modality, clip.dimensions) == (
        "clip-vit-base-patch32",
        "multimodal",
        512,
    )
    assert (siglip.source, siglip.modality) == ("google/siglip2-base-patch16-224", "multimodal")


def test_over_long_text_refused_without_truncation(
    folders: dict[str, Path], tmp_path: Path
) -> None:
    models = tmp_path / "models.yaml"
    lines = ["models:"]
    for family in ("clip", "siglip2"):
        lines += [f"  - name: tiny-{family}", f"    source: {folders[family]}"]
        lines += ["    modality: multimodal"]
    models.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with live_server(test_settings(models_file=models, truncate=False)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0)
        for family, limit in (("clip", 77), ("siglip2", 64)):
            with pytest.raises(openai.BadRequestError) as error:
                client.embeddings.create(model=f"tiny-{family}", input=["fine", LONG_TEXT])
            assert f"maximum context length is {limit} tokens" in error.value.message
            assert error.value.code == "context_length_exceeded"
            assert len(client.embeddings.create(model=f"tiny-{family}", input="fine").data) == 1


def test_benchmark_model_builder_smoke(tmp_path: Path) -> None:
    """The benchmark's model hook, at its tiny size: our encoder equals its raw forward."""
    from benchmarks.multimodal_model import RawForward, build, models_file
    from emb_model_provider.encoders.base import LoadOptions
    from emb_model_provider.encoders.multimodal import load_multimodal_encoder

    folder = build(tmp_path / "clip", size="tiny")
    assert "modality: multimodal" in models_file(tmp_path / "m.yaml", folder).read_text()
    encoder = load_multimodal_encoder(
        str(folder),
        revision=None,
        max_input_tokens=None,
        pooling=None,
        options=LoadOptions(device="cpu", dtype="float32"),
    )
    raw = RawForward(folder)
    texts, images = ["a photo of a cat", LONG_TEXT], [_png(61), _jpeg_exif_rotated()]
    ours = encoder.encode(encoder.prepare([*texts, *images], truncate=True))
    ours /= np.linalg.norm(ours, axis=-1, keepdims=True)
    expected = np.concatenate([raw.texts(texts), raw.images(images)])
    _assert_same_direction(ours.astype(np.float64), expected)
    encoder.close()


class _KindRecorder:
    """A multimodal encoder whose ``prepare`` notes, per kind of input, the thread it ran on."""

    modality = "multimodal"
    task = "embed"

    def __init__(self) -> None:
        self.threads: dict[str, set[int]] = {"text": set(), "image": set()}

    def prepare(self, inputs: list[str | bytes], *, truncate: bool) -> list[PreparedInput]:
        for value in inputs:
            kind = "text" if isinstance(value, str) else "image"
            self.threads[kind].add(threading.get_ident())
        return [PreparedInput(payload=value, n_tokens=len(value)) for value in inputs]


def test_mixed_inputs_prepare_images_on_the_model_thread_and_texts_off_it() -> None:
    limits = RequestLimits(max_inputs_per_request=8, max_tokens_per_request=1024, truncate=True)
    service = EmbeddingService(None, limits, None)  # type: ignore[arg-type]  # only _prepare runs
    encoder = _KindRecorder()
    data: list[str | bytes] = ["one", b"png", "three", b"jpeg!"]
    prepared = asyncio.run(service._prepare(encoder, data, None, True))  # type: ignore[arg-type]
    assert [item.payload for item in prepared] == data  # input order kept
    model = model_thread.call(threading.get_ident)
    assert encoder.threads["image"] == {model}
    assert encoder.threads["text"] and model not in encoder.threads["text"]


def test_images_are_prepared_on_the_model_thread_on_cpu_and_on_a_decode_worker_on_a_gpu() -> None:
    """The choice follows the device; no GPU is needed to check it."""
    assert image_prepare_thread(torch.device("cpu")) == "model"
    assert image_prepare_thread(torch.device("cuda", 0)) == "worker"
    assert image_prepare_thread(torch.device("mps")) == "worker"


class _WorkerKindRecorder(_KindRecorder):
    """As on a GPU: images go to the decode workers."""

    image_prepare_thread = "worker"


def _names(idents: set[int]) -> set[str]:
    by_ident = {thread.ident: thread.name for thread in threading.enumerate()}
    return {by_ident.get(ident, "?") for ident in idents}


@pytest.mark.parametrize("modality", ["multimodal", "image"])
def test_a_gpu_models_images_are_decoded_off_the_model_thread(modality: str) -> None:
    """With the choice forced as a GPU makes it, the model thread decodes nothing: images go to a
    decode worker, texts to the pool, and the inputs keep their order."""
    limits = RequestLimits(max_inputs_per_request=8, max_tokens_per_request=1024, truncate=True)
    service = EmbeddingService(None, limits, None)  # type: ignore[arg-type]  # only _prepare runs
    encoder = _WorkerKindRecorder()
    encoder.modality = modality
    data: list[str | bytes] = (
        ["one", b"png", "three", b"jpeg!"] if modality == "multimodal" else [b"png", b"jpeg!"]
    )
    prepared = asyncio.run(service._prepare(encoder, data, None, True))  # type: ignore[arg-type]
    assert [item.payload for item in prepared] == data
    model = model_thread.call(threading.get_ident)
    assert encoder.threads["image"] and model not in encoder.threads["image"]
    assert {name.split("_")[0] for name in _names(encoder.threads["image"])} == {"decode"}
    if modality == "multimodal":
        assert encoder.threads["text"] and model not in encoder.threads["text"]


def test_a_real_encoder_forced_to_decode_on_a_worker_gives_the_same_inputs(tmp_path: Path) -> None:
    """A tiny CLIP loaded on CPU, its choice forced to the GPU's: its images are decoded and
    preprocessed on a decode worker, into the same pixels, and encode to the same vectors."""
    from benchmarks.multimodal_model import build
    from emb_model_provider.encoders.base import LoadOptions
    from emb_model_provider.encoders.multimodal import load_multimodal_encoder

    encoder = load_multimodal_encoder(
        str(build(tmp_path / "clip", size="tiny")),
        revision=None,
        max_input_tokens=None,
        pooling=None,
        options=LoadOptions(device="cpu", dtype="float32"),
    )
    assert encoder.image_prepare_thread == "model"
    limits = RequestLimits(max_inputs_per_request=8, max_tokens_per_request=4096, truncate=True)
    service = EmbeddingService(None, limits, None)  # type: ignore[arg-type]  # only _prepare runs
    data: list[str | bytes] = ["a photo of a cat", _png(3), _jpeg_exif_rotated()]
    prepare = encoder.prepare
    threads: set[int] = set()

    def noting(inputs: list[str | bytes], *, truncate: bool) -> list[PreparedInput]:
        if any(isinstance(value, bytes) for value in inputs):
            threads.add(threading.get_ident())
        return prepare(inputs, truncate=truncate)

    encoder.prepare = noting  # type: ignore[method-assign]
    on_model = asyncio.run(service._prepare(encoder, data, None, True))
    assert threads == {model_thread.call(threading.get_ident)}
    threads.clear()
    encoder.image_prepare_thread = "worker"
    on_worker = asyncio.run(service._prepare(encoder, data, None, True))
    assert threads and model_thread.call(threading.get_ident) not in threads
    assert {name.split("_")[0] for name in _names(threads)} == {"decode"}
    np.testing.assert_array_equal(encoder.encode(on_worker), encoder.encode(on_model))
    encoder.close()


def test_token_arrays_are_decoded_to_text(
    client: openai.OpenAI, references: dict[str, Reference]
) -> None:
    """As for text models: cl100k_base ids (LangChain's default) are decoded and embedded as the
    text they stand for ("The quick brown fox")."""
    response = client.embeddings.create(model="tiny-siglip", input=[[791, 4062, 14198, 39935]])
    _assert_same_direction(_vectors(response), references["siglip"].texts(["The quick brown fox"]))
