"""Every error of POST /v1/embeddings and /v1/models on a live server: the status code, OpenAI's
body ``{"error": {"message", "type", "param", "code"}}``, a message that says what to fix, and the
exception class the real OpenAI SDK raises for it (``openai/_client.py``: 400 BadRequestError,
404 NotFoundError, 429 RateLimitError, >=500 InternalServerError). After each error the same
server must still answer a normal request.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest
from openai.types import CreateEmbeddingResponse
from sentence_transformers import SentenceTransformer

from tests import live
from tests.conftest import DEFAULT_MODEL

ERROR_KEYS = {"message", "type", "param", "code"}
#: The keyword arguments of ``client.embeddings.create``; anything else goes in ``extra_body``.
SDK_PARAMS = ("model", "input", "encoding_format", "dimensions", "user")
INPUT_SHAPES = r"^Invalid type for 'input': expected a non-empty string, an array of non-empty"
LONG = " ".join(f"word{i} and some more text" for i in range(200))  # far over 256 tokens
BROKEN_MODEL = "broken-model"
JSON_HEADERS = {"Content-Type": "application/json"}


@dataclass(frozen=True)
class Server:
    url: str
    http: httpx.Client
    sdk: openai.OpenAI


@contextmanager
def _connect(url: str) -> Iterator[Server]:
    with (
        httpx.Client(base_url=url, timeout=60) as http,
        openai.OpenAI(base_url=f"{url}/v1", api_key="test-key", max_retries=0) as sdk,
    ):
        yield Server(url, http, sdk)


@pytest.fixture(scope="module")
def server(server_url: str, http: httpx.Client, client: openai.OpenAI) -> Server:
    """The session's server with the default settings."""
    return Server(server_url, http, client)


@pytest.fixture(scope="module")
def tight_server() -> Iterator[Server]:
    """At most 3 inputs and 50 tokens per request."""
    settings = live.test_settings(max_inputs_per_request=3, max_tokens_per_request=50)
    with live.live_server(settings) as url, _connect(url) as connected:
        yield connected


@pytest.fixture(scope="module")
def strict_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """No truncation, a queue of 4 inputs, and a registered model whose weights do not exist."""
    models_file = tmp_path_factory.mktemp("models") / "models.yaml"
    missing = tmp_path_factory.mktemp("weights") / "missing"
    models_file.write_text(
        f"models:\n  - name: {BROKEN_MODEL}\n    source: {missing}\n", encoding="utf-8"
    )
    settings = live.test_settings(
        truncate=False, max_queue_inputs=4, max_inputs_per_request=4, models_file=models_file
    )
    with live.live_server(settings) as url, _connect(url) as connected:
        yield connected


# -- helpers ------------------------------------------------------------------------------------


def assert_error_body(
    response: httpx.Response,
    status: int,
    *,
    param: str | None,
    message: str,
    type_: str = "invalid_request_error",
    code: str | None = None,
) -> dict[str, Any]:
    """OpenAI's error body, exactly: one ``error`` object with all four keys (never FastAPI's
    ``{"detail": ...}``); ``message`` is a regular expression the message must match."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == ERROR_KEYS, error
    assert error["type"] == type_
    assert error["param"] == param
    assert error["code"] == code
    assert isinstance(error["message"], str)
    assert re.search(message, error["message"]), error["message"]
    return dict(error)


def assert_sdk_raises(status: int, error: dict[str, Any], call: Callable[[], object]) -> None:
    """The SDK raises the class it maps ``status`` to, carrying the same error object (so it
    sent the same request as httpx did)."""
    expected: type[openai.APIStatusError]
    if status >= 500:
        expected = openai.InternalServerError
    else:
        classes: dict[int, type[openai.APIStatusError]] = {
            400: openai.BadRequestError,
            404: openai.NotFoundError,
            429: openai.RateLimitError,
        }
        expected = classes.get(status, openai.APIStatusError)
    with pytest.raises(openai.APIStatusError) as raised:
        call()
    assert type(raised.value) is expected
    assert raised.value.status_code == status
    assert raised.value.body == error
    assert (raised.value.type, raised.value.param, raised.value.code) == (
        error["type"],
        error["param"],
        error["code"],
    )


def sdk_create(sdk: openai.OpenAI, body: object) -> Callable[[], object]:
    """``body`` sent by the SDK: through ``embeddings.create`` when it has the required
    arguments, else through the client's generic ``post`` (what the SDK's resources use)."""
    if isinstance(body, dict) and "model" in body and "input" in body:
        kwargs = {key: value for key, value in body.items() if key in SDK_PARAMS}
        extra = {key: value for key, value in body.items() if key not in SDK_PARAMS}
        return lambda: sdk.embeddings.create(**kwargs, extra_body=extra or None)
    return lambda: sdk.post("/embeddings", cast_to=CreateEmbeddingResponse, body=body)


def assert_alive(server: Server) -> None:
    response = server.sdk.embeddings.create(model=DEFAULT_MODEL, input=["still", "serving"])
    assert [len(item.embedding) for item in response.data] == [384, 384]


def expect_embeddings_error(
    server: Server,
    body: object,
    status: int,
    *,
    param: str | None,
    message: str,
    type_: str = "invalid_request_error",
    code: str | None = None,
) -> httpx.Response:
    response = server.http.post("/v1/embeddings", json=body)
    error = assert_error_body(
        response, status, param=param, message=message, type_=type_, code=code
    )
    assert_sdk_raises(status, error, sdk_create(server.sdk, body))
    assert_alive(server)
    return response


def _tokens(reference: SentenceTransformer, text: str) -> int:
    return len(reference.tokenizer(text)["input_ids"])


def _text_of(reference: SentenceTransformer, n_tokens: int) -> str:
    """A text of exactly ``n_tokens`` model tokens, [CLS] and [SEP] included."""
    text = " ".join(["word"] * (n_tokens - 2))
    assert _tokens(reference, text) == n_tokens
    return text


# -- request bodies the schema refuses ------------------------------------------------------------

M = DEFAULT_MODEL
VALID = {"model": M, "input": "a"}


def _empty(where: str, what: str) -> str:
    return rf"^Invalid value for '{re.escape(where)}': it cannot be an empty {what}\.$"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        pytest.param([], _empty("input", "array"), id="empty-list"),
        pytest.param("", _empty("input", "string"), id="empty-string"),
        pytest.param(["a", ""], _empty("input[1]", "string"), id="list-with-empty-string"),
        pytest.param([[]], _empty("input[0]", "array"), id="empty-token-array"),
        pytest.param([[1, 2], []], _empty("input[1]", "array"), id="token-arrays-with-empty-one"),
        pytest.param(42, INPUT_SHAPES, id="number"),
        pytest.param({"text": "a"}, INPUT_SHAPES, id="object"),
        pytest.param(None, INPUT_SHAPES, id="null"),
        pytest.param(True, INPUT_SHAPES, id="boolean"),
        pytest.param(["a", 1], INPUT_SHAPES, id="strings-and-ints"),
        pytest.param([1, ""], INPUT_SHAPES, id="int-and-empty-string"),
        pytest.param(["a", []], INPUT_SHAPES, id="string-and-empty-array"),
        pytest.param([True, False], INPUT_SHAPES, id="booleans"),
        pytest.param([[1, True]], INPUT_SHAPES, id="boolean-in-token-array"),
        pytest.param([1.5, 2.0], INPUT_SHAPES, id="floats-as-tokens"),
        pytest.param([[1.0, 2.0]], INPUT_SHAPES, id="floats-in-token-array"),
        pytest.param([["a", "b"]], INPUT_SHAPES, id="nested-strings"),
        pytest.param([[1], ["a"]], INPUT_SHAPES, id="token-array-and-strings"),
    ],
)
def test_invalid_input_is_400(server: Server, value: object, message: str) -> None:
    body = {"model": M, "input": value}
    expect_embeddings_error(server, body, 400, param="input", message=message)


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        ({"input": "a"}, "model", r"^Missing required parameter: 'model'\.$"),
        ({"model": M}, "input", r"^Missing required parameter: 'input'\.$"),
        ({}, "input", r"^Missing required parameter: 'input'\.$"),
        ({**VALID, "model": 5}, "model", r"'model'.*valid string"),
        ({**VALID, "model": None}, "model", r"'model'.*valid string"),
        ({**VALID, "model": [M]}, "model", r"'model'.*valid string"),
        ({**VALID, "dimensions": 0}, "dimensions", r"'dimensions'.*greater than or equal to 1"),
        ({**VALID, "dimensions": -5}, "dimensions", r"'dimensions'.*greater than or equal to 1"),
        ({**VALID, "dimensions": "8"}, "dimensions", r"'dimensions'.*valid integer"),
        ({**VALID, "dimensions": 8.5}, "dimensions", r"'dimensions'.*valid integer"),
        ({**VALID, "dimensions": True}, "dimensions", r"'dimensions'.*valid integer"),
        (
            {**VALID, "encoding_format": "bogus"},
            "encoding_format",
            r"'encoding_format'.*'float', 'base64', 'int8', 'uint8', 'binary' or 'ubinary'",
        ),
        (
            {**VALID, "encoding_format": 1},
            "encoding_format",
            r"'encoding_format'.*'float', 'base64', 'int8', 'uint8', 'binary' or 'ubinary'",
        ),
        ({**VALID, "user": 5}, "user", r"'user'.*valid string"),
    ],
)
def test_invalid_field_is_400(
    server: Server, body: dict[str, object], param: str, message: str
) -> None:
    expect_embeddings_error(server, body, 400, param=param, message=message)


# -- request bodies the schema accepts, refused by the service ------------------------------------


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        pytest.param(
            {"model": M, "input": ["x"] * 2049},
            "input",
            r"Too many inputs: 2049 were sent, at most 2048",
            id="2049-strings",
        ),
        pytest.param(
            {"model": M, "input": [[9906]] * 2049},
            "input",
            r"Too many inputs: 2049 were sent, at most 2048",
            id="2049-token-arrays",
        ),
        pytest.param(
            {"model": M, "input": "a", "dimensions": 385},
            "dimensions",
            r"'dimensions': 385.*384 dimensions; ask for 1 to 384",
            id="dimensions-385",
        ),
        pytest.param(
            {"model": M, "input": "a", "dimensions": 10**6},
            "dimensions",
            r"'dimensions': 1000000.*ask for 1 to 384",
            id="dimensions-huge",
        ),
        pytest.param(
            {"model": M, "input": [100256]},
            "input",
            r"Invalid token id 100256 in input\[0\].*cl100k_base",
            id="unassigned-token-id",
        ),
        pytest.param(
            {"model": M, "input": [9906, -1]},
            "input",
            r"Invalid token id -1 in input\[0\]",
            id="negative-token-id",
        ),
        pytest.param(
            {"model": M, "input": [[9906], [9906, 100300]]},
            "input",
            r"Invalid token id 100300 in input\[1\]",
            id="bad-id-in-second-array",
        ),
        pytest.param(
            {"model": M, "input": [2**70]},
            "input",
            rf"Invalid token id {2**70} in input\[0\]",
            id="token-id-over-64-bits",
        ),
    ],
)
def test_request_over_a_limit_is_400(
    server: Server, body: dict[str, Any], param: str, message: str
) -> None:
    expect_embeddings_error(server, body, 400, param=param, message=message)


@pytest.mark.parametrize("model", ["no-such-model", "sentence-transformers/no-such-model", ""])
def test_unknown_model_is_404(server: Server, model: str) -> None:
    expect_embeddings_error(
        server,
        {"model": model, "input": "a"},
        404,
        param="model",
        code="model_not_found",
        message=rf"^The model `{re.escape(model)}` does not exist",
    )


@pytest.mark.parametrize("model", ["no-such-model", "sentence-transformers/no-such-model"])
def test_retrieve_unknown_model_is_404(server: Server, model: str) -> None:
    response = server.http.get(f"/v1/models/{model}")
    error = assert_error_body(
        response,
        404,
        param="model",
        code="model_not_found",
        message=rf"^The model `{re.escape(model)}` does not exist",
    )
    assert_sdk_raises(404, error, lambda: server.sdk.models.retrieve(model))
    assert_alive(server)


# -- bodies that are not a JSON object ------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        pytest.param(
            b'{"model": "all-MiniLM-L6-v2", "input": ', r"could not parse the JSON", id="truncated"
        ),
        pytest.param(b"{not json}", r"could not parse the JSON", id="not-json"),
        pytest.param(b'{"input": "a",}', r"could not parse the JSON", id="trailing-comma"),
        pytest.param(b"\xff\xfe", r"could not parse the JSON", id="not-utf8"),
        pytest.param(b"", r"must be a JSON object", id="empty-body"),
        pytest.param(b"[1, 2]", r"must be a JSON object", id="array"),
        pytest.param(b'"x"', r"must be a JSON object", id="string"),
        pytest.param(b"3", r"must be a JSON object", id="number"),
        pytest.param(b"null", r"must be a JSON object", id="null"),
    ],
)
def test_body_that_is_not_a_json_object_is_400(server: Server, raw: bytes, message: str) -> None:
    response = server.http.post("/v1/embeddings", content=raw, headers=JSON_HEADERS)
    assert response.status_code != 422
    error = assert_error_body(response, 400, param=None, message=message)
    assert_sdk_raises(
        400,
        error,
        lambda: server.sdk.post(
            "/embeddings",
            cast_to=CreateEmbeddingResponse,
            content=raw,
            options={"headers": JSON_HEADERS},
        ),
    )
    assert_alive(server)


# -- URLs and methods -----------------------------------------------------------------------------


def sdk_call(server: Server, method: str, path: str) -> Callable[[], object]:
    """``method path`` through the SDK's generic verbs; an absolute URL is sent as it is, so paths
    outside the client's /v1 base can be reached too."""
    verbs: dict[str, Callable[..., object]] = {
        "GET": server.sdk.get,
        "POST": server.sdk.post,
        "PUT": server.sdk.put,
        "DELETE": server.sdk.delete,
    }
    return lambda: verbs[method](f"{server.url}{path}", cast_to=CreateEmbeddingResponse)


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/v1/nope"), ("POST", "/v1/embedding"), ("GET", "/v2/models"), ("DELETE", "/v1")],
)
def test_unknown_url_is_404(server: Server, method: str, path: str) -> None:
    response = server.http.request(method, path)
    error = assert_error_body(
        response, 404, param=None, message=rf"^Invalid URL \({method} {re.escape(path)}\)$"
    )
    assert_sdk_raises(404, error, sdk_call(server, method, path))
    assert_alive(server)


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("GET", "/v1/embeddings", "POST"),
        ("PUT", "/v1/embeddings", "POST"),
        ("POST", "/v1/models", "GET"),
        ("DELETE", "/v1/models", "GET"),
        ("POST", f"/v1/models/{M}", "GET"),
    ],
)
def test_wrong_method_is_405(server: Server, method: str, path: str, allowed: str) -> None:
    response = server.http.request(method, path)
    error = assert_error_body(
        response, 405, param=None, message=rf"^Method {method} is not allowed on {re.escape(path)}$"
    )
    assert response.headers["allow"] == allowed
    assert_sdk_raises(405, error, sdk_call(server, method, path))
    assert_alive(server)


# -- what is not an error -------------------------------------------------------------------------


def test_unknown_fields_are_accepted(server: Server) -> None:
    response = server.sdk.embeddings.create(
        model=M, input="extra fields", user="user-1234", extra_body={"foo": 1}
    )
    assert len(response.data) == 1
    raw = server.http.post(
        "/v1/embeddings",
        json={"model": M, "input": "a", "foo": {"nested": [1, None]}, "bar": None},
    )
    assert raw.status_code == 200, raw.text
    assert len(raw.json()["data"]) == 1


def test_2048_inputs_are_accepted(server: Server) -> None:
    response = server.sdk.embeddings.create(model=M, input=[[9906]] * 2048)
    assert len(response.data) == 2048


# -- limits set by the operator -------------------------------------------------------------------


def test_max_inputs_per_request_is_configurable(tight_server: Server) -> None:
    expect_embeddings_error(
        tight_server,
        {"model": M, "input": ["a", "b", "c", "d"]},
        400,
        param="input",
        message=r"Too many inputs: 4 were sent, at most 3 are allowed",
    )
    accepted = tight_server.sdk.embeddings.create(model=M, input=["a", "b", "c"])
    assert len(accepted.data) == 3


def test_max_tokens_per_request(tight_server: Server, reference: SentenceTransformer) -> None:
    texts = [_text_of(reference, 20)] * 3  # 60 tokens, each input far under 256
    expect_embeddings_error(
        tight_server,
        {"model": M, "input": texts},
        400,
        param="input",
        code="max_tokens_per_request",
        message=r"Requested 60 tokens, max 50 tokens per request",
    )
    at_limit = tight_server.sdk.embeddings.create(model=M, input=[_text_of(reference, 25)] * 2)
    assert at_limit.usage.prompt_tokens == 50


def test_context_length_exceeded_without_truncation(
    strict_server: Server, reference: SentenceTransformer
) -> None:
    n_tokens = _tokens(reference, LONG)
    assert n_tokens > 256
    for body in ({"model": M, "input": LONG}, {"model": M, "input": ["short", LONG]}):
        expect_embeddings_error(
            strict_server,
            body,
            400,
            param="input",
            code="context_length_exceeded",
            message=(
                rf"^This model's maximum context length is 256 tokens, however you requested "
                rf"{n_tokens} tokens"
            ),
        )
    at_limit = strict_server.sdk.embeddings.create(model=M, input=_text_of(reference, 256))
    assert at_limit.usage.prompt_tokens == 256


def test_full_queue_is_429_with_retry_after(
    strict_server: Server, reference: SentenceTransformer
) -> None:
    """A burst of concurrent requests overflows the 4-input queue while the model is busy: the
    overflow gets OpenAI's 429 with Retry-After, and every accepted request is answered."""
    body = {"model": M, "input": [_text_of(reference, 256)] * 4}

    def send(_: int) -> httpx.Response:
        return strict_server.http.post("/v1/embeddings", json=body)

    refused: list[httpx.Response] = []
    for _ in range(3):  # a burst almost always overflows; a few tries make it certain
        with ThreadPoolExecutor(max_workers=16) as pool:
            responses = list(pool.map(send, range(16)))
        assert {r.status_code for r in responses} <= {200, 429}, [r.text for r in responses]
        for accepted in (r for r in responses if r.status_code == 200):
            assert len(accepted.json()["data"]) == 4
        refused = [r for r in responses if r.status_code == 429]
        if refused:
            break
    assert refused, "16 concurrent requests never overflowed a queue of 4 inputs"
    error = assert_error_body(
        refused[0],
        429,
        param=None,
        type_="rate_limit_error",
        code="server_overloaded",
        message=r"overloaded.*limit 4",
    )
    assert error["message"]
    assert int(refused[0].headers["retry-after"]) >= 1


def test_model_that_cannot_load_is_5xx(strict_server: Server) -> None:
    expect_embeddings_error(
        strict_server,
        {"model": BROKEN_MODEL, "input": "a"},
        503,
        param="model",
        type_="server_error",
        code="model_load_failed",
        message=rf"^The model `{BROKEN_MODEL}` could not be loaded: .*does not exist",
    )
