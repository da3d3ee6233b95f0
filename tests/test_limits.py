"""Request body cap (413) and per-request timeout (504) through one live server; the server keeps
serving after each, and a timed-out request's queued inputs are dropped by the batcher."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from fastapi import FastAPI

from emb_model_provider.core.config import Settings
from tests.conftest import DEFAULT_MODEL
from tests.live import live_app, live_server, test_settings

MAX_REQUEST_BYTES = 2 * 1024 * 1024
TIMEOUT_S = 1.5
DEADLINE_S = 120


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[str, FastAPI]]:
    settings = test_settings(
        max_request_bytes=MAX_REQUEST_BYTES,
        request_timeout_s=TIMEOUT_S,
        # One input per forward pass: a long request takes many, well past the timeout.
        max_batch_size=1,
        metrics=False,
    )
    with live_app(settings) as pair:
        yield pair


@pytest.fixture(scope="module")
def client(served: tuple[str, FastAPI]) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served[0]}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def http(served: tuple[str, FastAPI]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served[0], timeout=60) as session:
        yield session


def _still_serves(client: openai.OpenAI) -> None:
    reply = client.embeddings.create(model=DEFAULT_MODEL, input="still here")
    assert len(reply.data) == 1


def _oversized_body() -> bytes:
    text = "word " * 1000
    body = json.dumps({"model": DEFAULT_MODEL, "input": [text] * 500}).encode()
    assert len(body) > MAX_REQUEST_BYTES
    return body


def _assert_413(response: httpx.Response) -> None:
    assert response.status_code == 413
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert str(MAX_REQUEST_BYTES) in error["message"]
    assert response.headers["x-request-id"]


def test_an_oversized_body_is_refused_from_its_content_length(
    client: openai.OpenAI, http: httpx.Client
) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        client.embeddings.create(model=DEFAULT_MODEL, input=["word " * 1000] * 500)
    assert caught.value.status_code == 413
    body = _oversized_body()
    response = http.post(
        "/v1/embeddings", content=body, headers={"Content-Type": "application/json"}
    )
    assert response.request.headers["content-length"] == str(len(body))
    _assert_413(response)
    _still_serves(client)


def test_an_oversized_chunked_body_is_refused_while_read(
    client: openai.OpenAI, http: httpx.Client
) -> None:
    body = _oversized_body()

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(body), 64 * 1024):
            yield body[start : start + 64 * 1024]

    for path in ("/v1/embeddings", "/v1/images/embeddings"):
        response = http.post(path, content=chunks(), headers={"Content-Type": "application/json"})
        assert "content-length" not in response.request.headers
        assert response.request.headers["transfer-encoding"] == "chunked"
        _assert_413(response)
    _still_serves(client)


def test_a_body_just_under_the_cap_is_served(http: httpx.Client) -> None:
    # Large in bytes, light in work: JSON allows the whitespace.
    small = json.dumps({"model": DEFAULT_MODEL, "input": "hi"}).encode()
    body = small + b" " * (MAX_REQUEST_BYTES - len(small))
    for content in (body, iter([body[: len(body) // 2], body[len(body) // 2 :]])):
        response = http.post(
            "/v1/embeddings", content=content, headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 200, response.text
        assert len(response.json()["data"]) == 1


def test_a_request_past_the_timeout_gets_504_and_its_work_is_dropped(
    served: tuple[str, FastAPI], client: openai.OpenAI
) -> None:
    batcher = served[1].state.models.loaded(DEFAULT_MODEL).batcher
    skipped_before = batcher.stats.skipped_inputs
    with pytest.raises(openai.InternalServerError) as caught:
        # 1000 inputs of 256 tokens, one per forward pass: seconds of work on any CPU
        client.embeddings.create(model=DEFAULT_MODEL, input=["hello " * 260] * 1000)
    error = caught.value
    assert error.status_code == 504
    assert error.code == "request_timeout"
    assert error.type == "server_error"
    assert error.request_id
    assert error.request_id in error.message

    deadline = time.monotonic() + DEADLINE_S
    while batcher.stats.skipped_inputs <= skipped_before:
        assert time.monotonic() < deadline, "the timed-out request's inputs were not dropped"
        time.sleep(0.02)  # polling interval under a deadline
    assert batcher.stats.skipped_inputs - skipped_before > 100
    _still_serves(client)


def test_metrics_can_be_turned_off(http: httpx.Client) -> None:
    assert http.get("/metrics").status_code == 404


def _get_health(sock: socket.socket) -> bytes:
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    return sock.recv(65536)


def test_idle_connections_outlive_the_clients_pool_expiry() -> None:
    """The server keeps an idle connection open longer than httpx's pool does (the OpenAI SDK's
    transport), so a client never reuses one the server is closing; the setting still bounds it."""
    assert Settings.model_fields["keep_alive_s"].default > httpx.Limits().keepalive_expiry
    assert test_settings().keep_alive_s > httpx.Limits().keepalive_expiry
    with live_server(test_settings(keep_alive_s=2, warmup=False), wait_ready=False) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            assert _get_health(sock).startswith(b"HTTP/1.1 200")
            time.sleep(1)  # idle, but within the keep-alive: the same connection answers
            assert _get_health(sock).startswith(b"HTTP/1.1 200")
            time.sleep(3.5)  # past the keep-alive: the server has closed its end
            assert sock.recv(65536) == b""
