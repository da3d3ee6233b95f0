"""Serving behaviour through a live server: disconnects drop work, the server outlives them."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from fastapi import FastAPI

from tests.conftest import DEFAULT_MODEL
from tests.live import live_app, test_settings

DEADLINE_S = 120


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[str, FastAPI]]:
    with live_app(test_settings()) as pair:
        yield pair


def _poll(condition, what: str, deadline_s: float = DEADLINE_S) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)  # polling interval under a deadline
    raise TimeoutError(what)


def test_a_client_that_disconnects_has_its_work_dropped(served: tuple[str, FastAPI]) -> None:
    url, app = served
    batcher = app.state.models.loaded(DEFAULT_MODEL).batcher
    before_encoded = batcher.stats.encoded_inputs
    before_skipped = batcher.stats.skipped_inputs
    before_batches = batcher.stats.batches
    n_inputs = 1000  # 1000 x 256 tokens: under the 300000-token request limit
    body = json.dumps(
        {
            "model": DEFAULT_MODEL,
            "input": [f"long input {i} " + "lorem ipsum " * 150 for i in range(n_inputs)],
        }
    ).encode()
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    head = (
        f"POST /v1/embeddings HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    sock.sendall(head + body)
    _poll(lambda: batcher.stats.batches > before_batches, "the request never started")
    sock.close()  # the client goes away while its request is being embedded

    def settled() -> bool:
        done = (batcher.stats.encoded_inputs - before_encoded) + (
            batcher.stats.skipped_inputs - before_skipped
        )
        return done >= n_inputs

    _poll(settled, "the dropped request's inputs were neither run nor skipped")
    skipped = batcher.stats.skipped_inputs - before_skipped
    assert skipped > n_inputs // 2, f"only {skipped} of {n_inputs} inputs were skipped"
    # And the server goes on serving.
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0)
    assert len(client.embeddings.create(model=DEFAULT_MODEL, input="still here").data) == 1


def test_health_ready_and_about(served: tuple[str, FastAPI]) -> None:
    url, _ = served
    with httpx.Client(base_url=url, timeout=10) as http:
        assert http.get("/health").json() == {"status": "ok"}
        ready = http.get("/ready")
        assert ready.status_code == 200
        assert ready.json()["default_model"] == DEFAULT_MODEL
        about = http.get("/").json()
        assert about["name"] == "emb-model-provider"
        assert about["links"]["embeddings"] == "/v1/embeddings"


def test_ready_is_503_until_the_default_model_is_warm() -> None:
    with (
        live_app(test_settings(), wait_ready=False) as (url, app),
        httpx.Client(base_url=url, timeout=30) as http,
    ):
        first = http.get("/ready")
        if first.status_code == 503:  # the model was still loading: say why, and retry later
            assert first.json()["status"] == "not_ready"
            assert first.headers["retry-after"] == "1"
        _poll(lambda: http.get("/ready").status_code == 200, "never became ready")
        assert app.state.models.loaded(DEFAULT_MODEL) is not None


def test_ready_stays_503_with_the_reason_when_the_default_model_cannot_load(
    tmp_path: Path,
) -> None:
    models_file = tmp_path / "models.yaml"
    models_file.write_text(
        f"models:\n  - name: broken\n    source: {tmp_path / 'missing'}\n", encoding="utf-8"
    )
    settings = test_settings(models_file=models_file, default_model="broken")
    with (
        live_app(settings, wait_ready=False) as (url, _),
        httpx.Client(base_url=url, timeout=30) as http,
    ):
        _poll(lambda: "could not be loaded" in http.get("/ready").text, "no load error shown")
        ready = http.get("/ready")
        assert ready.status_code == 503
        assert "broken" in ready.json()["detail"]
        assert http.get("/health").status_code == 200
        # The other models still serve.
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0)
        assert len(client.embeddings.create(model=DEFAULT_MODEL, input="x").data) == 1
