"""Live responses against OpenAI's own OpenAPI specification (``shared/reference``, beside the
clone): every body we send is a valid CreateEmbeddingRequest, and every body we get back validates
against CreateEmbeddingResponse, ListModelsResponse, Model or ErrorResponse (JSON Schema 2020-12,
the dialect of OpenAPI 3.1).
"""

from __future__ import annotations

import base64
import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from tests.conftest import DEFAULT_MODEL

REFERENCE_DIR = Path(__file__).resolve().parents[2] / "shared" / "reference"
SPEC_PATH = REFERENCE_DIR / "openai-openapi-embeddings.yaml"
SPEC_URI = "urn:openai-openapi:embeddings"
DIMENSIONS = 384

Validate = Callable[[str, object], None]


def _validators(document: dict[str, Any]) -> Callable[[str], Draft202012Validator]:
    """A validator per component schema; ``#/components/schemas/...`` references resolve inside
    the whole document."""
    resource = Resource.from_contents(document, default_specification=DRAFT202012)
    registry: Registry[Any] = Registry().with_resource(SPEC_URI, resource)

    def validator(name: str) -> Draft202012Validator:
        assert name in document["components"]["schemas"], name
        return Draft202012Validator(
            {"$ref": f"{SPEC_URI}#/components/schemas/{name}"},
            registry=registry,
            format_checker=Draft202012Validator.FORMAT_CHECKER,
        )

    return validator


def _with_base64_embeddings(document: dict[str, Any]) -> dict[str, Any]:
    """The specification with one correction: ``Embedding.embedding`` may be a base64 string.

    The specification lists only the float array, but with ``encoding_format="base64"`` OpenAI
    answers with a string of little-endian float32 bytes, which the SDK asks for by default and
    decodes (``openai/resources/embeddings.py``). Everything else is kept as it is.
    """
    patched = copy.deepcopy(document)
    embedding = patched["components"]["schemas"]["Embedding"]["properties"]
    embedding["embedding"] = {
        "anyOf": [embedding["embedding"], {"type": "string", "contentEncoding": "base64"}]
    }
    return patched


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    if not SPEC_PATH.is_file():
        pytest.skip(
            f"OpenAI's OpenAPI specification is not at {SPEC_PATH} (it lives in shared/reference "
            "beside the clone)"
        )
    document: dict[str, Any] = yaml.safe_load(SPEC_PATH.read_text(encoding="utf-8"))
    return document


@pytest.fixture(scope="module")
def validate(spec: dict[str, Any]) -> Validate:
    """``validate(schema_name, instance)``: raises ValidationError naming the failing part."""
    validator = _validators(spec)

    def check(name: str, instance: object) -> None:
        validator(name).validate(instance)

    return check


@pytest.fixture(scope="module")
def validate_base64(spec: dict[str, Any]) -> Validate:
    validator = _validators(_with_base64_embeddings(spec))

    def check(name: str, instance: object) -> None:
        validator(name).validate(instance)

    return check


def _json(response: httpx.Response, status: int) -> Any:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    return response.json()


# -- the validators themselves ------------------------------------------------------------------


def test_the_schemas_reject_what_they_should(validate: Validate, validate_base64: Validate) -> None:
    """Guards against a validator that accepts everything (e.g. an unresolved reference)."""
    good: dict[str, Any] = {
        "object": "list",
        "data": [{"object": "embedding", "index": 0, "embedding": [0.5]}],
        "model": "m",
        "usage": {"prompt_tokens": 1, "total_tokens": 1},
    }
    validate("CreateEmbeddingResponse", good)
    broken_item = copy.deepcopy(good)
    broken_item["data"][0]["embedding"] = ["x"]  # only reachable through the $ref to Embedding
    as_base64 = copy.deepcopy(good)
    as_base64["data"][0]["embedding"] = "AAAAPw=="
    for bad in (broken_item, as_base64, {**good, "usage": {"prompt_tokens": 1}}):
        with pytest.raises(ValidationError):
            validate("CreateEmbeddingResponse", bad)
    validate_base64("CreateEmbeddingResponse", as_base64)
    with pytest.raises(ValidationError):
        validate("ErrorResponse", {"error": {"message": "m", "type": "t", "param": None}})
    with pytest.raises(ValidationError):
        validate("CreateEmbeddingRequest", {"model": DEFAULT_MODEL, "input": []})


# -- POST /v1/embeddings ------------------------------------------------------------------------

TEXTS = ["The quick brown fox jumps over the lazy dog.", "ünïcödé 日本語 🙂", "a"]

REQUESTS = [
    pytest.param({"model": DEFAULT_MODEL, "input": TEXTS[0]}, id="single"),
    pytest.param({"model": DEFAULT_MODEL, "input": TEXTS}, id="batch"),
    pytest.param({"model": DEFAULT_MODEL, "input": [9906, 1917]}, id="token-array"),
    pytest.param({"model": DEFAULT_MODEL, "input": [[9906], [9906, 1917]]}, id="token-arrays"),
    pytest.param(
        {"model": DEFAULT_MODEL, "input": TEXTS, "dimensions": 64, "user": "user-1234"},
        id="dimensions-and-user",
    ),
    pytest.param(
        {"model": "sentence-transformers/all-MiniLM-L6-v2", "input": TEXTS[:2]}, id="alias"
    ),
]


def _n_inputs(body: dict[str, Any]) -> int:
    value = body["input"]
    return 1 if isinstance(value, str) or isinstance(value[0], int) else len(value)


@pytest.mark.parametrize("body", REQUESTS)
def test_float_response_conforms(
    http: httpx.Client, validate: Validate, body: dict[str, Any]
) -> None:
    sent = {**body, "encoding_format": "float"}
    validate("CreateEmbeddingRequest", sent)
    answer = _json(http.post("/v1/embeddings", json=sent), 200)
    validate("CreateEmbeddingResponse", answer)
    assert [item["index"] for item in answer["data"]] == list(range(_n_inputs(body)))
    width = body.get("dimensions", DIMENSIONS)
    assert all(len(item["embedding"]) == width for item in answer["data"])


@pytest.mark.parametrize("body", REQUESTS)
def test_base64_response_conforms(
    http: httpx.Client, validate_base64: Validate, validate: Validate, body: dict[str, Any]
) -> None:
    sent = {**body, "encoding_format": "base64"}
    validate("CreateEmbeddingRequest", sent)
    answer = _json(http.post("/v1/embeddings", json=sent), 200)
    validate_base64("CreateEmbeddingResponse", answer)
    width = body.get("dimensions", DIMENSIONS)
    for item in answer["data"]:
        assert len(base64.b64decode(item["embedding"], validate=True)) == 4 * width
    # Apart from the embedding's encoding, the answer is the specification's to the letter.
    for item in answer["data"]:
        item["embedding"] = [0.0]
    validate("CreateEmbeddingResponse", answer)


@pytest.mark.parametrize("encoding_format", ["int8", "uint8", "binary", "ubinary"])
def test_quantized_responses_conform(
    http: httpx.Client, validate: Validate, encoding_format: str
) -> None:
    """The quantised formats are documented extensions of the request (the specification's enum
    is float and base64); their answer is the specification's CreateEmbeddingResponse as it is:
    integers are JSON numbers."""
    sent = {"model": DEFAULT_MODEL, "input": TEXTS, "encoding_format": encoding_format}
    answer = _json(http.post("/v1/embeddings", json=sent), 200)
    validate("CreateEmbeddingResponse", answer)
    assert all(isinstance(value, int) for value in answer["data"][0]["embedding"])


def test_what_the_sdk_sends_and_gets_conforms(
    server_url: str, validate: Validate, validate_base64: Validate
) -> None:
    """The SDK's own request (base64 unless asked otherwise) and our raw answer to it."""
    sent: list[bytes] = []

    def keep(request: Any) -> None:  # the SDK's own httpx request type
        if request.url.path == "/v1/embeddings":
            sent.append(request.read())

    with openai.OpenAI(
        base_url=f"{server_url}/v1",
        api_key="test-key",
        max_retries=0,
        http_client=openai.DefaultHttpxClient(event_hooks={"request": [keep]}),
    ) as sdk:
        default = sdk.embeddings.with_raw_response.create(model=DEFAULT_MODEL, input=TEXTS)
        as_float = sdk.embeddings.with_raw_response.create(
            model=DEFAULT_MODEL, input=TEXTS[0], encoding_format="float", dimensions=8
        )
    assert len(sent) == 2
    requests = [json.loads(body) for body in sent]
    assert requests[0]["encoding_format"] == "base64"
    for request in requests:
        validate("CreateEmbeddingRequest", request)
    validate_base64("CreateEmbeddingResponse", json.loads(default.http_response.text))
    validate("CreateEmbeddingResponse", json.loads(as_float.http_response.text))
    assert len(default.parse().data[0].embedding) == DIMENSIONS  # decoded by the SDK


# -- GET /v1/models -----------------------------------------------------------------------------


def test_list_models_conforms(http: httpx.Client, validate: Validate) -> None:
    answer = _json(http.get("/v1/models"), 200)
    validate("ListModelsResponse", answer)
    assert DEFAULT_MODEL in [model["id"] for model in answer["data"]]


@pytest.mark.parametrize(
    "model", [DEFAULT_MODEL, "sentence-transformers/all-MiniLM-L6-v2", "all-MiniLM-L12-v2"]
)
def test_retrieve_model_conforms(http: httpx.Client, validate: Validate, model: str) -> None:
    answer = _json(http.get(f"/v1/models/{model}"), 200)
    validate("Model", answer)
    assert model in (answer["id"], *answer["aliases"])


def test_every_listed_model_conforms(http: httpx.Client, validate: Validate) -> None:
    for listed in _json(http.get("/v1/models"), 200)["data"]:
        for name in (listed["id"], *listed["aliases"]):
            validate("Model", _json(http.get(f"/v1/models/{name}"), 200))


# -- errors -------------------------------------------------------------------------------------

#: Bodies the specification itself refuses; we answer each with 400 and OpenAI's error body.
INVALID_REQUESTS = [
    pytest.param({"model": DEFAULT_MODEL, "input": []}, id="empty-list"),
    pytest.param({"model": DEFAULT_MODEL, "input": [[]]}, id="empty-token-array"),
    pytest.param({"model": DEFAULT_MODEL, "input": ["a", 1]}, id="strings-and-ints"),
    pytest.param({"model": DEFAULT_MODEL, "input": [1.5]}, id="float-tokens"),
    pytest.param({"model": DEFAULT_MODEL, "input": 5}, id="number"),
    pytest.param({"model": DEFAULT_MODEL, "input": ["a"] * 2049}, id="2049-inputs"),
    pytest.param({"input": "a"}, id="missing-model"),
    pytest.param({"model": DEFAULT_MODEL}, id="missing-input"),
    pytest.param({"model": 5, "input": "a"}, id="model-number"),
    pytest.param({"model": DEFAULT_MODEL, "input": "a", "dimensions": 0}, id="dimensions-0"),
    pytest.param(
        {"model": DEFAULT_MODEL, "input": "a", "encoding_format": "bogus"}, id="encoding-bogus"
    ),
]


@pytest.mark.parametrize("body", INVALID_REQUESTS)
def test_invalid_request_error_conforms(
    http: httpx.Client, validate: Validate, body: dict[str, Any]
) -> None:
    with pytest.raises(ValidationError):
        validate("CreateEmbeddingRequest", body)
    validate("ErrorResponse", _json(http.post("/v1/embeddings", json=body), 400))


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        pytest.param("POST", "/v1/embeddings", {"model": "nope", "input": "a"}, 404, id="model"),
        pytest.param("GET", "/v1/models/nope", None, 404, id="retrieve"),
        pytest.param("GET", "/v1/models/org/nope", None, 404, id="retrieve-with-slash"),
        pytest.param("GET", "/v1/nope", None, 404, id="url"),
        pytest.param("GET", "/v1/embeddings", None, 405, id="method"),
        pytest.param(
            "POST", "/v1/embeddings", {"model": DEFAULT_MODEL, "input": "a", "dimensions": 385},
            400, id="dimensions-over-native",
        ),
        pytest.param(
            "POST", "/v1/embeddings", {"model": DEFAULT_MODEL, "input": [100256]}, 400,
            id="bad-token-id",
        ),
    ],
)  # fmt: skip
def test_other_errors_conform(
    http: httpx.Client,
    validate: Validate,
    *,
    method: str,
    path: str,
    body: dict[str, Any] | None,
    status: int,
) -> None:
    if body is not None:
        validate("CreateEmbeddingRequest", body)  # well-formed: refused for its meaning
    validate("ErrorResponse", _json(http.request(method, path, json=body), status))


def test_malformed_json_error_conforms(http: httpx.Client, validate: Validate) -> None:
    response = http.post(
        "/v1/embeddings", content=b'{"model": ', headers={"Content-Type": "application/json"}
    )
    validate("ErrorResponse", _json(response, 400))
