"""Cohere's embed API (/v2/embed, /v1/embed) through the real ``cohere`` SDK, and TEI's (/embed,
POST /) through huggingface_hub's ``InferenceClient``: vectors equal sentence-transformers' on the
same weights (prompts chosen by ``input_type``), the quantised types equal /v1/embeddings', and
errors reach each client as its own exception carrying our message."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cohere
import httpx
import numpy as np
import pytest
from huggingface_hub import InferenceClient
from huggingface_hub.errors import HfHubHTTPError
from PIL import Image
from sentence_transformers import SentenceTransformer

from benchmarks.families import build
from emb_model_provider.security.keys import hash_key
from tests.conftest import BUNDLED_DIR, DEFAULT_MODEL
from tests.live import live_server, test_settings
from tests.tiny_multimodal import tiny_clip
from tests.tiny_text_models import text_models_file

TEXTS = ["How do vector databases store int8 vectors?", "ünïcödé 🙂", "a"]
PROMPTS = {"query": "query: ", "document": "passage: ", "clustering": "cluster: "}
LONG = "word " * 400  # over the bundled model's 256 tokens


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cohere-tei")
    return {
        "prompted": build("bert", root / "prompted", "tiny", prompts=PROMPTS, seed=4),
        "raw": build("bert", root / "raw", "tiny", normalize=False, seed=5),
        "clip": tiny_clip(root / "clip"),
    }


@pytest.fixture(scope="module")
def server(dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    models = text_models_file(
        tmp_path_factory.mktemp("cohere-tei-models") / "models.yaml",
        [
            {"name": "prompted", "source": str(dirs["prompted"])},
            {"name": "raw", "source": str(dirs["raw"])},
            {"name": "tiny-clip", "source": str(dirs["clip"]), "modality": "multimodal"},
        ],
    )
    with live_server(test_settings(models_file=models)) as url:
        yield url


@pytest.fixture(scope="module")
def http(server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, timeout=60) as session:
        yield session


@pytest.fixture(scope="module")
def v2(server: str) -> cohere.ClientV2:
    return cohere.ClientV2(api_key="unused", base_url=server)


@pytest.fixture(scope="module")
def v1(server: str) -> cohere.Client:
    return cohere.Client(api_key="unused", base_url=server)


def _openai(http: httpx.Client, **body: Any) -> list[Any]:
    response = http.post("/v1/embeddings", json={"encoding_format": "float", **body})
    assert response.status_code == 200, response.text
    return [item["embedding"] for item in response.json()["data"]]


def _reference(path: Path, texts: list[str], **options: Any) -> np.ndarray:
    model = SentenceTransformer(str(path), device="cpu")
    return np.asarray(model.encode(texts, normalize_embeddings=True, **options))


# -- Cohere -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("input_type", "prompt_name"),
    [
        ("search_query", "query"),
        ("search_document", "document"),
        ("clustering", "clustering"),
        ("classification", None),  # the model has no such prompt: none
    ],
)
def test_v2_input_type_selects_the_models_prompt(
    v2: cohere.ClientV2,
    dirs: dict[str, Path],
    input_type: str,
    prompt_name: str | None,
) -> None:
    response = v2.embed(
        model="prompted", texts=TEXTS, input_type=input_type, embedding_types=["float"]
    )
    assert response.embeddings.float_ is not None
    ours = np.array(response.embeddings.float_)
    reference = _reference(dirs["prompted"], TEXTS, prompt_name=prompt_name)
    np.testing.assert_allclose(ours, reference, atol=1e-5)
    assert response.texts == TEXTS


def test_v2_gives_every_type_at_once(v2: cohere.ClientV2, http: httpx.Client) -> None:
    response = v2.embed(
        model=DEFAULT_MODEL,
        texts=TEXTS,
        input_type="search_document",
        embedding_types=["float", "int8", "uint8", "binary", "ubinary", "base64"],
    )
    embeddings = response.embeddings
    assert embeddings.float_ is not None and embeddings.base64 is not None
    floats = np.array(embeddings.float_, dtype=np.float32)
    np.testing.assert_allclose(floats, _openai(http, model=DEFAULT_MODEL, input=TEXTS), atol=1e-6)
    decoded = [np.frombuffer(base64.b64decode(item), dtype="<f4") for item in embeddings.base64]
    np.testing.assert_array_equal(np.array(decoded), floats)
    for kind in ("int8", "uint8", "binary", "ubinary"):
        expected = _openai(http, model=DEFAULT_MODEL, input=TEXTS, encoding_format=kind)
        assert getattr(embeddings, kind) == expected, kind
    usage = http.post("/v1/embeddings", json={"model": DEFAULT_MODEL, "input": TEXTS}).json()
    assert response.meta is not None and response.meta.billed_units is not None
    assert response.meta.billed_units.input_tokens == usage["usage"]["prompt_tokens"]
    assert response.id


def test_v2_output_dimension_and_truncate(v2: cohere.ClientV2, http: httpx.Client) -> None:
    short = v2.embed(
        model=DEFAULT_MODEL,
        texts=TEXTS,
        input_type="search_query",
        embedding_types=["float"],
        output_dimension=64,
    )
    expected = _openai(http, model=DEFAULT_MODEL, input=TEXTS, dimensions=64)
    np.testing.assert_allclose(np.array(short.embeddings.float_), expected, atol=1e-6)
    cut = v2.embed(model=DEFAULT_MODEL, texts=[LONG], input_type="search_query", truncate="END")
    expected = _openai(http, model=DEFAULT_MODEL, input=[LONG])
    np.testing.assert_allclose(np.array(cut.embeddings.float_), expected, atol=1e-6)
    with pytest.raises(cohere.BadRequestError) as caught:
        v2.embed(model=DEFAULT_MODEL, texts=[LONG], input_type="search_query", truncate="NONE")
    assert "maximum context length" in caught.value.body["message"]


def test_v2_images_as_data_uris(v2: cohere.ClientV2, http: httpx.Client) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 30, 90)).save(buffer, format="PNG")
    uri = f"data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}"
    response = v2.embed(
        model="tiny-clip", images=[uri], input_type="image", embedding_types=["float"]
    )
    expected = _openai(http, model="tiny-clip", input=[{"image": uri}])
    np.testing.assert_allclose(np.array(response.embeddings.float_), expected, atol=1e-6)
    assert response.meta is not None and response.meta.billed_units is not None
    assert response.meta.billed_units.images == 1


def test_v1_floats_and_by_type(v1: cohere.Client, dirs: dict[str, Path]) -> None:
    floats = v1.embed(model="prompted", texts=TEXTS, input_type="search_query")
    assert floats.response_type == "embeddings_floats"
    reference = _reference(dirs["prompted"], TEXTS, prompt_name="query")
    np.testing.assert_allclose(np.array(floats.embeddings), reference, atol=1e-5)
    by_type = v1.embed(
        model="prompted", texts=TEXTS, input_type="search_query", embedding_types=["ubinary"]
    )
    assert by_type.response_type == "embeddings_by_type"
    assert by_type.embeddings.ubinary is not None
    assert len(by_type.embeddings.ubinary[0]) == 32 // 8


def test_cohere_errors_carry_our_message(
    v2: cohere.ClientV2, v1: cohere.Client, http: httpx.Client
) -> None:
    with pytest.raises(cohere.NotFoundError) as missing:
        v2.embed(model="no-such-model", texts=["x"], input_type="search_query")
    assert "no-such-model" in missing.value.body["message"]
    with pytest.raises(cohere.BadRequestError) as both:
        v1.embed(model=DEFAULT_MODEL, texts=["x"], images=["data:image/png;base64,AA=="])
    assert "exactly one of `texts` and `images`" in both.value.body["message"]
    with pytest.raises(cohere.BadRequestError) as image_to_text:
        v2.embed(
            model=DEFAULT_MODEL,
            images=["data:image/png;base64,AA=="],
            input_type="image",
        )
    assert "takes text" in image_to_text.value.body["message"]
    # The OpenAI route keeps OpenAI's shape.
    openai_error = http.post("/v1/embeddings", json={"model": "nope", "input": "x"}).json()
    assert openai_error["error"]["code"] == "model_not_found"


# -- TEI --------------------------------------------------------------------------------------


def test_tei_embed_answers_a_bare_array(http: httpx.Client, dirs: dict[str, Path]) -> None:
    response = http.post("/embed", json={"inputs": TEXTS})
    assert response.status_code == 200
    reference = _reference(BUNDLED_DIR, TEXTS)
    np.testing.assert_allclose(np.array(response.json()), reference, atol=1e-5)
    single = http.post("/embed", json={"inputs": TEXTS[0], "model": "prompted"}).json()
    np.testing.assert_allclose(single, _reference(dirs["prompted"], TEXTS[:1]), atol=1e-5)
    raw = http.post("/embed", json={"inputs": TEXTS, "model": "raw", "normalize": False}).json()
    model = SentenceTransformer(str(dirs["raw"]), device="cpu")  # no Normalize module
    np.testing.assert_allclose(raw, model.encode(TEXTS), atol=1e-5)


def test_inference_client_feature_extraction(server: str, dirs: dict[str, Path]) -> None:
    client = InferenceClient(base_url=server)
    vectors = client.feature_extraction(TEXTS[0])
    np.testing.assert_allclose(vectors, _reference(BUNDLED_DIR, TEXTS[:1]), atol=1e-5)
    on_embed = InferenceClient(base_url=f"{server}/embed")
    cut = on_embed.feature_extraction(TEXTS[0], dimensions=16, truncate=True)
    full = np.asarray(
        SentenceTransformer(str(BUNDLED_DIR), device="cpu", truncate_dim=16).encode(
            TEXTS[:1], normalize_embeddings=True
        )
    )
    np.testing.assert_allclose(cut, full, atol=1e-5)
    with pytest.raises(HfHubHTTPError, match="has no prompt `nope`"):
        client.feature_extraction(TEXTS[0], prompt_name="nope")


def test_tei_errors_have_teis_shape(http: httpx.Client) -> None:
    too_long = http.post("/embed", json={"inputs": LONG, "truncate": False})
    assert too_long.status_code == 400
    body = too_long.json()
    assert body["error_type"] == "Validation"
    assert "maximum context length" in body["error"]
    empty = http.post("/embed", json={"inputs": []})
    assert empty.status_code == 400 and set(empty.json()) == {"error", "error_type"}
    assert http.get("/").status_code == 200  # the root page is still there


def test_post_root_takes_a_key_when_keys_are_on(tmp_path: Path) -> None:
    settings = test_settings(api_key_hashes=hash_key("sk-tei-test-key-0123"))
    with live_server(settings) as url:
        refused = httpx.post(f"{url}/", json={"inputs": "x"}, timeout=30)
        assert refused.status_code == 401
        client = InferenceClient(base_url=url, api_key="sk-tei-test-key-0123")
        assert client.feature_extraction("x").shape == (1, 384)
        assert httpx.get(f"{url}/health", timeout=30).status_code == 200
