"""Request ids, the access log (JSON lines), Prometheus metrics, CORS and gzip, through one live
server driven by the OpenAI SDK and httpx."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import httpx
import openai
import pytest
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from emb_model_provider.core.logging import JsonFormatter
from tests.conftest import DEFAULT_MODEL, AccessLog
from tests.live import live_app, test_settings

ORIGIN = "https://app.example"
DEADLINE_S = 30

T = TypeVar("T")
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="module")
def served(access_log: AccessLog) -> Iterator[tuple[str, FastAPI]]:
    with live_app(test_settings(cors_origins=f"{ORIGIN}, http://localhost:3000")) as pair:
        yield pair


@pytest.fixture(scope="module")
def http(served: tuple[str, FastAPI]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served[0], timeout=60) as session:
        yield session


def _client(url: str, **headers: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{url}/v1", api_key="unused", max_retries=0, default_headers=headers
    )


def _poll(read: Callable[[], T | None], what: str) -> T:
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        value = read()
        if value is not None:
            return value
        time.sleep(0.02)  # polling interval under a deadline
    raise TimeoutError(what)


def _scrape(http: httpx.Client) -> Samples:
    response = http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


# -- request id ---------------------------------------------------------------------------------


def test_a_request_id_is_generated_when_the_client_sends_none(http: httpx.Client) -> None:
    first = http.get("/health").headers["x-request-id"]
    second = http.get("/health").headers["x-request-id"]
    assert len(first) == 32
    assert int(first, 16) >= 0
    assert first != second


def test_the_clients_request_id_is_echoed_sanitised_and_bounded(http: httpx.Client) -> None:
    assert (
        http.get("/health", headers={"X-Request-ID": "job-7.run:3"}).headers["x-request-id"]
        == "job-7.run:3"
    )
    assert (
        http.get("/health", headers={"X-Request-ID": 'a b<script>"c"'}).headers["x-request-id"]
        == "abscriptc"
    )
    assert http.get("/health", headers={"X-Request-ID": "x" * 1000}).headers["x-request-id"] == (
        "x" * 128
    )
    generated = http.get("/health", headers={"X-Request-ID": "<>"}).headers["x-request-id"]
    assert len(generated) == 32


def test_errors_carry_the_request_id(served: tuple[str, FastAPI], http: httpx.Client) -> None:
    client = _client(served[0], **{"X-Request-ID": "bad-request-1"})
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model=DEFAULT_MODEL, input="")
    assert caught.value.request_id == "bad-request-1"
    with pytest.raises(openai.NotFoundError) as missing:
        client.embeddings.create(model="no-such-model", input="hi")
    assert missing.value.request_id == "bad-request-1"
    assert http.get("/no/such/path").headers["x-request-id"]


# -- metrics --------------------------------------------------------------------------------------


def test_metrics_follow_the_requests(served: tuple[str, FastAPI], http: httpx.Client) -> None:
    client = _client(served[0])
    route = {"route": "/v1/embeddings", "method": "POST"}
    before = _scrape(http)
    replies = [
        client.embeddings.create(model=DEFAULT_MODEL, input=["one", "two words", "three"])
        for _ in range(2)
    ]
    model = replies[0].model
    tokens = sum(reply.usage.prompt_tokens for reply in replies)
    ok = {**route, "model": model, "status": "200"}
    requests_before = _value(before, "emb_provider_requests_total", **ok)

    def settled() -> Samples | None:  # counted once each response is out
        after = _scrape(http)
        done = _value(after, "emb_provider_requests_total", **ok) >= requests_before + 2
        return after if done else None

    after = _poll(settled, "the request counter never counted both requests")
    assert _value(after, "emb_provider_requests_total", **ok) == requests_before + 2

    def grew(name: str, **labels: str) -> float:
        return _value(after, name, **labels) - _value(before, name, **labels)

    assert grew("emb_provider_inputs_total", model=model, task="embed") == 6
    assert grew("emb_provider_tokens_total", model=model, task="embed") == tokens
    assert grew("emb_provider_request_duration_seconds_count", **route) == 2
    assert grew("emb_provider_batch_size_count", model=model) >= 1
    assert grew("emb_provider_batch_size_sum", model=model) == 6
    assert grew("emb_provider_queue_wait_seconds_count", model=model) == 6
    assert _value(after, "emb_provider_batch_size_bucket", model=model, le="+Inf") == _value(
        after, "emb_provider_batch_size_count", model=model
    )
    assert _value(after, "emb_provider_models_loaded") >= 1
    assert _value(after, "emb_provider_model_load_seconds", model=model) > 0
    assert ("emb_provider_queue_inputs", frozenset({("model", model)})) in after
    assert _value(after, "process_resident_memory_bytes") > 0


def test_metrics_label_unknown_paths_by_a_fixed_name(http: httpx.Client) -> None:
    labels = {"route": "unmatched", "method": "GET", "model": "", "status": "404"}
    before = _value(_scrape(http), "emb_provider_requests_total", **labels)
    assert http.get("/made/up/path/123").status_code == 404

    def counted() -> Samples | None:
        after = _scrape(http)
        return after if _value(after, "emb_provider_requests_total", **labels) > before else None

    after = _poll(counted, "the 404 was never counted")
    assert not any("/made/up" in str(labels) for _, labels in after)


def test_separate_apps_keep_separate_registries(served: tuple[str, FastAPI]) -> None:
    import prometheus_client

    assert served[1].state.metrics.registry is not prometheus_client.REGISTRY
    assert prometheus_client.REGISTRY.get_sample_value("emb_provider_requests_total") is None


# -- access log -----------------------------------------------------------------------------------


def test_one_json_access_line_per_request(
    served: tuple[str, FastAPI], access_log: AccessLog
) -> None:
    secret = "a confidential sentence that must never reach a log"
    reply = _client(served[0], **{"X-Request-ID": "log-check-1"}).embeddings.create(
        model=DEFAULT_MODEL, input=[secret, secret]
    )

    def line() -> logging.LogRecord | None:
        mine = [r for r in access_log.records if getattr(r, "request_id", None) == "log-check-1"]
        return mine[0] if mine else None

    record = _poll(line, "no access-log line for the request")
    assert sum(getattr(r, "request_id", None) == "log-check-1" for r in access_log.records) == 1
    text = JsonFormatter().format(record)
    assert "\n" not in text
    entry = json.loads(text)
    assert entry["logger"] == "emb_model_provider.access"
    assert entry["level"] == "INFO"
    assert entry["time"].endswith("+00:00")
    assert entry["request_id"] == "log-check-1"
    assert (entry["method"], entry["path"], entry["status"]) == ("POST", "/v1/embeddings", 200)
    assert (entry["model"], entry["inputs"]) == (reply.model, 2)
    assert entry["tokens"] == reply.usage.prompt_tokens
    assert entry["duration_ms"] > 0
    assert entry["client"].startswith("127.0.0.1:")
    assert "log-check-1" in entry["message"]
    assert secret not in text
    assert secret not in record.getMessage()


def test_errors_are_logged_with_their_status(http: httpx.Client, access_log: AccessLog) -> None:
    http.post("/v1/embeddings", json={"model": DEFAULT_MODEL}, headers={"X-Request-ID": "e-400"})

    def line() -> logging.LogRecord | None:
        mine = [r for r in access_log.records if getattr(r, "request_id", None) == "e-400"]
        return mine[0] if mine else None

    record = _poll(line, "no access-log line for the failed request")
    assert getattr(record, "status", None) == 400
    assert not hasattr(record, "model")


# -- CORS and gzip --------------------------------------------------------------------------------


def test_cors_preflight_and_headers(http: httpx.Client) -> None:
    preflight = http.options(
        "/v1/embeddings",
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()

    simple = http.get("/health", headers={"Origin": "http://localhost:3000"})
    assert simple.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert "x-request-id" in simple.headers["access-control-expose-headers"].lower()

    stranger = http.get("/health", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in stranger.headers
    refused = http.options(
        "/v1/embeddings",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert refused.status_code == 400


def test_large_responses_are_gzipped_when_accepted(served: tuple[str, FastAPI]) -> None:
    body = {"model": DEFAULT_MODEL, "input": ["text"] * 64, "encoding_format": "float"}
    with httpx.Client(base_url=served[0], timeout=60) as raw:
        zipped = raw.post("/v1/embeddings", json=body, headers={"Accept-Encoding": "gzip"})
        assert zipped.status_code == 200
        assert zipped.headers["content-encoding"] == "gzip"
        assert zipped.headers["x-request-id"]
        # httpx decompresses; the size on the wire is the Content-Length
        assert int(zipped.headers["content-length"]) < len(zipped.content) / 1.5
        assert len(zipped.json()["data"]) == 64
        plain = raw.post("/v1/embeddings", json=body, headers={"Accept-Encoding": "identity"})
        assert "content-encoding" not in plain.headers
        assert plain.json() == zipped.json()
        small = raw.post(
            "/v1/embeddings",
            json={"model": DEFAULT_MODEL, "input": "text"},
            headers={"Accept-Encoding": "gzip"},
        )
        assert small.status_code == 200
        assert "content-encoding" not in small.headers
