"""OpenTelemetry traces: a live server exports to a real OTLP/HTTP receiver on 127.0.0.1 (the
protobuf decoded with opentelemetry-proto), driven by the OpenAI SDK; the batcher's links between
a forward pass and the requests it merged; nothing built when tracing is off."""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from fastapi import FastAPI
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as ProtoSpan
from opentelemetry.proto.trace.v1.trace_pb2 import Status
from PIL import Image

from emb_model_provider.api.middleware import UNTRACED_PATHS
from emb_model_provider.core import tracing
from emb_model_provider.encoders.base import PreparedInput, Vectors
from emb_model_provider.scheduler import DynamicBatcher
from tests.conftest import AccessLog
from tests.live import live_app, test_settings
from tests.tiny_models import image_models_file, tiny_dinov3_vit

DEADLINE_S = 30
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
SECRET_QUERY = "sig=do-not-export"


def _value(value: AnyValue) -> object:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


@dataclass(frozen=True)
class Received:
    """One exported span, decoded."""

    name: str
    trace_id: str
    span_id: str
    parent_id: str
    kind: int
    attributes: dict[str, object]
    links: tuple[tuple[str, str], ...]
    status: int
    resource: dict[str, object]
    start_ns: int
    end_ns: int
    #: (event name, its attributes)
    events: tuple[tuple[str, dict[str, object]], ...] = ()

    @classmethod
    def of(cls, span: ProtoSpan, resource: dict[str, object]) -> Received:
        return cls(
            name=span.name,
            trace_id=span.trace_id.hex(),
            span_id=span.span_id.hex(),
            parent_id=span.parent_span_id.hex(),
            kind=span.kind,
            attributes={item.key: _value(item.value) for item in span.attributes},
            links=tuple((link.trace_id.hex(), link.span_id.hex()) for link in span.links),
            status=span.status.code,
            resource=resource,
            start_ns=span.start_time_unix_nano,
            end_ns=span.end_time_unix_nano,
            events=tuple(
                (event.name, {item.key: _value(item.value) for item in event.attributes})
                for event in span.events
            ),
        )


class OtlpReceiver:
    """An OTLP/HTTP trace receiver (``POST /v1/traces``, protobuf) in a thread."""

    def __init__(self) -> None:
        self.spans: list[Received] = []
        self._changed = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path != "/v1/traces":
                    self.send_error(404)
                    return
                receiver.add(ExportTraceServiceRequest.FromString(body))
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/v1/traces"

    def add(self, request: ExportTraceServiceRequest) -> None:
        received = []
        for resource_spans in request.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                received += [Received.of(span, resource) for span in scope_spans.spans]
        with self._changed:
            self.spans += received
            self._changed.notify_all()

    def wait_for(
        self, what: str, found: Callable[[list[Received]], bool], deadline_s: float = DEADLINE_S
    ) -> list[Received]:
        """All spans received, once ``found`` holds for them, or fail after ``deadline_s``."""
        with self._changed:
            if not self._changed.wait_for(lambda: found(self.spans), deadline_s):
                names = sorted({span.name for span in self.spans})
                raise AssertionError(f"no {what} after {deadline_s} s; received: {names}")
            return list(self.spans)

    def __enter__(self) -> OtlpReceiver:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)


def _png() -> bytes:
    pixels = (np.random.default_rng(7).random((40, 30, 3)) * 255).astype("uint8")
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def image_host() -> Iterator[str]:
    """Stands in for an outside image host, on 127.0.0.1."""
    image = _png()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(image)))
            self.end_headers()
            self.wfile.write(image)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as running:
        yield running


@pytest.fixture(scope="module")
def served(
    receiver: OtlpReceiver, tmp_path_factory: pytest.TempPathFactory, access_log: AccessLog
) -> Iterator[tuple[str, FastAPI]]:
    """A server whose tracing is turned on by the standard variable alone, exporting every
    50 ms (OTEL_BSP_SCHEDULE_DELAY) to the receiver; the SDK reads the OTEL_* variables."""
    root = tmp_path_factory.mktemp("tracing-models")
    models = image_models_file(root / "models.yaml", {"tiny-vit": tiny_dinov3_vit(root / "vit")})
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", receiver.url)
        env.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
        env.setenv("OTEL_SERVICE_NAME", "emb-under-test")
        env.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
        env.delenv("OTEL_TRACES_SAMPLER", raising=False)
        settings = test_settings(models_file=models, url_allowlist="127.0.0.1/32", cache="memory")
        assert settings.tracing == "auto" and settings.tracing_enabled()
        with live_app(settings) as pair:
            yield pair


@pytest.fixture(scope="module")
def client(served: tuple[str, FastAPI]) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served[0]}/v1", api_key="unused", max_retries=0)


def _of_trace(trace_id: str) -> Callable[[list[Received]], list[Received]]:
    return lambda spans: [span for span in spans if span.trace_id == trace_id]


def _one(spans: Sequence[Received], name: str) -> Received:
    named = [span for span in spans if span.name == name]
    assert len(named) == 1, f"{len(named)} spans named {name}: {[s.name for s in spans]}"
    return named[0]


def _server_span_done(trace_id: str, route: str) -> Callable[[list[Received]], bool]:
    # The server span ends last: once it is in, the request's other spans are too.
    return lambda spans: any(
        span.trace_id == trace_id and span.name == f"POST {route}" for span in spans
    )


def test_one_request_gives_its_spans_with_links_and_the_callers_trace(
    client: openai.OpenAI, receiver: OtlpReceiver, access_log: AccessLog
) -> None:
    raw = client.embeddings.with_raw_response.create(
        model="all-MiniLM-L6-v2",
        input=["a traced sentence", "another one", "a traced sentence"],
        extra_headers={
            "traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01",
            "X-Request-ID": "trace-me-1",
        },
    )
    assert raw.headers["x-request-id"] == "trace-me-1"  # unchanged by tracing
    assert len(raw.parse().data) == 3
    spans = _of_trace(TRACE_ID)(
        receiver.wait_for("server span", _server_span_done(TRACE_ID, "/v1/embeddings"))
    )

    server = _one(spans, "POST /v1/embeddings")
    assert server.parent_id == PARENT_ID  # the caller's span
    assert server.kind == ProtoSpan.SPAN_KIND_SERVER
    assert server.resource["service.name"] == "emb-under-test"  # OTEL_SERVICE_NAME, read by the SDK
    attributes = server.attributes
    assert attributes["http.request.method"] == "POST"
    assert attributes["http.route"] == "/v1/embeddings"
    assert attributes["http.response.status_code"] == 200
    assert attributes["url.scheme"] == "http"
    assert attributes["url.path"] == "/v1/embeddings"
    assert attributes["emb.request_id"] == "trace-me-1"
    assert attributes["gen_ai.request.model"] == "all-MiniLM-L6-v2"
    assert attributes["gen_ai.usage.input_tokens"] == raw.parse().usage.prompt_tokens

    assert not [span for span in spans if span.name == "embeddings.embed"]  # no longer written
    checks = _one(spans, "embeddings.check_inputs")
    assert checks.parent_id == server.span_id
    lookup = _one(spans, "cache.lookup")
    assert lookup.parent_id == server.span_id
    # Three inputs, two distinct, none cached yet: the model computes the two.
    assert lookup.attributes["emb.cache.hits"] == 0
    assert lookup.attributes["emb.cache.misses"] == 3
    assert lookup.attributes["emb.cache.computed"] == 2
    tokenize = _one(spans, "embeddings.tokenize")
    assert tokenize.parent_id == server.span_id
    assert tokenize.attributes["emb.inputs"] == 2
    wait = _one(spans, "batcher.queue_wait")
    assert wait.parent_id == server.span_id
    assert tokenize.end_ns <= wait.start_ns <= wait.end_ns  # queued once tokenised

    # The forward pass is a trace of its own, linked to the request, and the wait back to it.
    assert len(wait.links) == 1
    forward_trace, forward_id = wait.links[0]
    everything = receiver.wait_for(
        "forward span", lambda found: any(span.span_id == forward_id for span in found)
    )
    forward = next(span for span in everything if span.span_id == forward_id)
    assert forward.name == "model.forward"
    assert forward.trace_id == forward_trace != TRACE_ID
    assert forward.parent_id == ""
    assert (TRACE_ID, server.span_id) in forward.links
    assert forward.start_ns >= wait.end_ns  # the wait ends where the forward starts
    assert forward.attributes["emb.model"] == "all-MiniLM-L6-v2"
    assert forward.attributes["emb.batch.size"] == 2
    assert forward.attributes["emb.batch.tokens"] == tokenize.attributes["emb.tokens"]

    # The trace id is in the access-log line.
    logged = [r for r in access_log.records if getattr(r, "request_id", None) == "trace-me-1"]
    assert len(logged) == 1
    assert getattr(logged[0], "trace_id", None) == TRACE_ID


def test_probes_are_not_traced(
    client: openai.OpenAI, receiver: OtlpReceiver, served: tuple[str, FastAPI]
) -> None:
    """/ready is polled from the start; a request sent after it shows the exports went on."""
    assert httpx.get(f"{served[0]}/health", timeout=DEADLINE_S).status_code == 200
    trace_id = "9bf92f3577b34da6a3ce929d0e0e4736"
    client.models.list(extra_headers={"traceparent": f"00-{trace_id}-{PARENT_ID}-01"})
    spans = receiver.wait_for(
        "models span",
        lambda found: any(s.trace_id == trace_id and s.name == "GET /v1/models" for s in found),
    )
    assert not [span for span in spans if span.attributes.get("url.path") in UNTRACED_PATHS]


def test_a_cached_request_records_its_hits_and_runs_no_forward(
    client: openai.OpenAI, receiver: OtlpReceiver
) -> None:
    trace_id = "5bf92f3577b34da6a3ce929d0e0e4736"
    client.embeddings.create(model="all-MiniLM-L6-v2", input=["cached twice"])
    client.embeddings.create(
        model="all-MiniLM-L6-v2",
        input=["cached twice", "cached twice"],
        extra_headers={"traceparent": f"00-{trace_id}-{PARENT_ID}-01"},
    )
    spans = _of_trace(trace_id)(
        receiver.wait_for("server span", _server_span_done(trace_id, "/v1/embeddings"))
    )
    lookup = _one(spans, "cache.lookup")
    assert lookup.attributes["emb.cache.hits"] == 2
    assert lookup.attributes["emb.cache.misses"] == 0
    assert not [span for span in spans if span.name == "batcher.queue_wait"]


def test_image_fetches_are_spans_with_the_host_and_no_query(
    client: openai.OpenAI, receiver: OtlpReceiver, served: tuple[str, FastAPI], image_host: str
) -> None:
    trace_id = "6bf92f3577b34da6a3ce929d0e0e4736"
    urls = [f"{image_host}/a.png?{SECRET_QUERY}", f"{image_host}/b.png?{SECRET_QUERY}"]
    client.embeddings.create(
        model="tiny-vit", input=urls, extra_headers={"traceparent": f"00-{trace_id}-{PARENT_ID}-01"}
    )
    spans = _of_trace(trace_id)(
        receiver.wait_for("server span", _server_span_done(trace_id, "/v1/embeddings"))
    )
    server = _one(spans, "POST /v1/embeddings")
    fetches = [span for span in spans if span.name == "image.fetch"]
    assert len(fetches) == 2
    port = int(image_host.rsplit(":", 1)[1])
    for fetch in fetches:
        assert fetch.parent_id == server.span_id
        assert fetch.kind == ProtoSpan.SPAN_KIND_CLIENT
        assert fetch.attributes["server.address"] == "127.0.0.1"
        assert fetch.attributes["server.port"] == port
        assert fetch.attributes["http.response.body.size"] == len(_png())
    assert sorted(str(fetch.attributes["url.full"]) for fetch in fetches) == [
        f"{image_host}/a.png",
        f"{image_host}/b.png",
    ]
    assert all(SECRET_QUERY not in repr(span.attributes) for span in spans)
    server = _one(spans, "POST /v1/embeddings")
    assert _one(spans, "embeddings.preprocess_images").parent_id == server.span_id

    # The batch-first image API: the same spans under its own route.
    other = "7bf92f3577b34da6a3ce929d0e0e4736"
    response = httpx.post(
        f"{served[0]}/v1/images/embeddings",
        json={"model": "tiny-vit", "images": [{"id": 1, "image_url": urls[0]}]},
        headers={"traceparent": f"00-{other}-{PARENT_ID}-01"},
        timeout=DEADLINE_S,
    )
    assert response.status_code == 200, response.text
    assert response.json()["ids"] == [1]
    spans = _of_trace(other)(
        receiver.wait_for("server span", _server_span_done(other, "/v1/images/embeddings"))
    )
    server = _one(spans, "POST /v1/images/embeddings")
    assert server.attributes["http.route"] == "/v1/images/embeddings"
    assert _one(spans, "embeddings.check_inputs").parent_id == server.span_id
    assert _one(spans, "image.fetch").parent_id == server.span_id


def test_an_error_is_recorded_on_the_server_span(
    client: openai.OpenAI, receiver: OtlpReceiver
) -> None:
    trace_id = "8bf92f3577b34da6a3ce929d0e0e4736"
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(
            model="no-such-model",
            input=["x"],
            extra_headers={"traceparent": f"00-{trace_id}-{PARENT_ID}-01"},
        )
    spans = _of_trace(trace_id)(
        receiver.wait_for("server span", _server_span_done(trace_id, "/v1/embeddings"))
    )
    server = _one(spans, "POST /v1/embeddings")
    assert server.attributes["http.response.status_code"] == 404
    assert server.status != Status.STATUS_CODE_ERROR  # a client error is not the server's
    assert _one(spans, "embeddings.check_inputs").status == Status.STATUS_CODE_ERROR


def test_batch_api_lines_are_traced(client: openai.OpenAI, receiver: OtlpReceiver) -> None:
    lines = [
        {
            "custom_id": f"line-{index}",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": "all-MiniLM-L6-v2", "input": [f"batch line {index}"]},
        }
        for index in range(2)
    ]
    content = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    uploaded = client.files.create(file=("input.jsonl", content), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h"
    )

    def both_lines(spans: list[Received]) -> bool:
        return {
            span.attributes.get("emb.batch.custom_id")
            for span in spans
            if span.name == "batch.line" and span.attributes.get("emb.batch.id") == batch.id
        } == {"line-0", "line-1"}

    spans = receiver.wait_for("batch line spans", both_lines)
    for custom_id in ("line-0", "line-1"):
        line = next(
            span
            for span in spans
            if span.name == "batch.line" and span.attributes["emb.batch.custom_id"] == custom_id
        )
        assert line.parent_id == ""  # each line is a trace of its own
        assert line.attributes["emb.batch.line.status_code"] == 200
        of_line = _of_trace(line.trace_id)(spans)
        assert _one(of_line, "embeddings.check_inputs").parent_id == line.span_id
        wait = _one(of_line, "batcher.queue_wait")
        assert wait.parent_id == line.span_id
        forward_id = wait.links[0][1]
        forward = next(span for span in spans if span.span_id == forward_id)
        assert (line.trace_id, line.span_id) in forward.links


# -- the batcher: one forward, two clients ------------------------------------------------------


class _HeldEncoder:
    """Encodes payload ``k`` as [k]; holds its first batch until released."""

    def __init__(self) -> None:
        self.batches: list[list[object]] = []
        self.started = threading.Event()
        self.release = threading.Event()

    def __call__(self, batch: Sequence[PreparedInput]) -> Vectors:
        self.batches.append([item.payload for item in batch])
        self.started.set()
        assert self.release.wait(DEADLINE_S)
        return np.array([[float(item.payload)] for item in batch], dtype=np.float32)  # type: ignore[arg-type]


def test_a_batch_merged_from_two_clients_links_both(receiver: OtlpReceiver) -> None:
    """While the model is busy, two traced clients queue one input each: the next forward
    serves both, and its span links to each client's span (and each wait links back)."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", receiver.url)
        env.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
        traced = tracing.start_tracing("test")
    encoder = _HeldEncoder()
    batcher = DynamicBatcher(
        "merge-test", encoder, max_batch_size=8, max_batch_tokens=1000, max_queue_inputs=100
    )
    clients: dict[str, str] = {}  # client name -> its span id

    async def client(name: str, payload: int) -> list[Vectors]:
        tracing.activate(traced.tracer)  # this task's own context
        with tracing.span(f"client {name}") as span:
            assert span is not None
            clients[name] = format(span.get_span_context().span_id, "016x")
            return await batcher.embed([PreparedInput(payload=payload, n_tokens=3)])

    async def run() -> list[list[Vectors]]:
        first = asyncio.ensure_future(batcher.embed([PreparedInput(payload=0, n_tokens=3)]))
        assert await asyncio.to_thread(encoder.started.wait, DEADLINE_S)  # the model is busy
        a = asyncio.ensure_future(client("a", 1))
        b = asyncio.ensure_future(client("b", 2))
        while batcher.queued_inputs < 2:
            await asyncio.sleep(0)
        encoder.release.set()
        return await asyncio.gather(first, a, b)

    try:
        results = asyncio.run(run())
    finally:
        batcher.stop()
        traced.shutdown()  # flushes
    assert [row[0][0] for row in results] == [0, 1, 2]
    assert encoder.batches == [[0], [1, 2]]

    def ours(spans: list[Received]) -> list[Received]:
        return [
            s
            for s in spans
            if s.name == "model.forward" and s.attributes["emb.model"] == "merge-test"
        ]

    spans = receiver.wait_for("merged forward", lambda found: bool(ours(found)))
    (forward,) = ours(spans)  # the untraced first request's forward left no span
    assert forward.attributes["emb.batch.size"] == 2
    assert forward.attributes["emb.batch.padded_tokens"] == 6
    client_spans = {s.span_id: s for s in spans if s.name in ("client a", "client b")}
    assert {span_id for _, span_id in forward.links} == set(clients.values())
    for trace_id, span_id in forward.links:
        assert client_spans[span_id].trace_id == trace_id
        waits = [s for s in spans if s.name == "batcher.queue_wait" and s.parent_id == span_id]
        assert len(waits) == 1
        assert waits[0].links == ((forward.trace_id, forward.span_id),)


# -- off ----------------------------------------------------------------------------------------


def test_tracing_turns_on_from_the_standard_variables_or_the_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    assert not test_settings().tracing_enabled()
    assert test_settings(tracing="on").tracing_enabled()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")
    assert test_settings().tracing_enabled()
    assert not test_settings(tracing="off").tracing_enabled()
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://collector:4318/v1/traces")
    assert test_settings().tracing_enabled()


_OFF_PROBE = """
import sys
from emb_model_provider.core.config import Settings
from emb_model_provider.main import create_app
app = create_app(Settings(_env_file=None, device="cpu", cache="off"))
assert app.state.tracing is None
loaded = sorted(name for name in sys.modules if name.startswith("opentelemetry.sdk")
                or name.startswith("opentelemetry.exporter"))
print(",".join(loaded))
"""


def test_with_tracing_off_no_sdk_provider_or_exporter_is_built(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A fresh process: building the app with tracing off imports neither the SDK nor the
    exporter, so no provider or exporter can exist."""
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("EMB_PROVIDER_TRACING", raising=False)
    probe = subprocess.run(
        [sys.executable, "-c", _OFF_PROBE],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == ""


def test_a_request_the_sampler_leaves_out_queues_no_origin(receiver: OtlpReceiver) -> None:
    """OTEL_TRACES_SAMPLER is the SDK's: sampled out, a request's inputs carry no origin, so the
    batcher writes no forward span for it, and its steps write no leaf span."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", receiver.url)
        env.setenv("OTEL_TRACES_SAMPLER", "always_off")
        traced = tracing.start_tracing("test")
    token = tracing.activate(traced.tracer)
    try:
        with tracing.span("sampled out") as span:
            assert span is not None and not span.is_recording()
            assert tracing.origin() is None
            assert tracing.trace_id(span) is not None  # the access log still gets the trace id
            with tracing.leaf("a step") as step:
                assert step is None
    finally:
        tracing.deactivate(token)
        traced.shutdown()


def test_untraced_code_gets_no_span() -> None:
    assert tracing.origin() is None
    with tracing.span("nothing") as span:
        assert span is None
    with tracing.leaf("nothing") as step:
        assert step is None


def test_a_leaf_span_is_the_child_of_the_current_one_and_records_its_error(
    receiver: OtlpReceiver,
) -> None:
    """``leaf`` writes its span itself: parent, times, attributes, and an exception as the SDK's
    spans record one (status error, an ``exception`` event)."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", receiver.url)
        traced = tracing.start_tracing("test")
    token = tracing.activate(traced.tracer)
    try:
        with tracing.span("a parent") as parent:
            assert parent is not None
            with tracing.leaf("fine", {"emb.inputs": 2}) as step:
                assert step is not None
                step.set_attribute("emb.tokens", 7)
            with pytest.raises(ValueError, match="no good"), tracing.leaf("broken"):
                raise ValueError("no good")
    finally:
        tracing.deactivate(token)
        traced.shutdown()  # flushes
    spans = receiver.wait_for("leaf spans", lambda found: len(found) >= 3)
    top = _one(spans, "a parent")
    fine, broken = _one(spans, "fine"), _one(spans, "broken")
    assert fine.trace_id == broken.trace_id == top.trace_id
    assert fine.parent_id == broken.parent_id == top.span_id
    assert fine.attributes == {"emb.inputs": 2, "emb.tokens": 7}
    assert top.start_ns <= fine.start_ns <= fine.end_ns <= broken.start_ns <= top.end_ns
    assert fine.status == Status.STATUS_CODE_UNSET
    assert broken.status == Status.STATUS_CODE_ERROR
    assert broken.events == (
        ("exception", {"exception.type": "ValueError", "exception.message": "no good"}),
    )
    assert fine.resource == top.resource


def test_the_server_span_follows_the_sampler_and_records_an_escaping_error(
    receiver: OtlpReceiver,
) -> None:
    """The request's span follows the provider's sampler (the default parent-based one follows
    the caller's sampled flag: an unsampled caller gets no spans, but its trace id still reaches
    the access log), and an exception leaving the request is recorded on it."""
    unsampled_trace = "abf92f3577b34da6a3ce929d0e0e4736"
    failing_trace = "bbf92f3577b34da6a3ce929d0e0e4736"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", receiver.url)
        env.delenv("OTEL_TRACES_SAMPLER", raising=False)
        traced = tracing.start_tracing("test")
    try:
        caller = [(b"traceparent", f"00-{unsampled_trace}-{PARENT_ID}-00".encode())]
        with tracing.server_span(traced.tracer, "POST", caller, {"url.path": "/x"}) as span:
            assert not span.is_recording()  # the caller did not sample it
            assert tracing.trace_id(span) == unsampled_trace  # still in the access log
            assert tracing.origin() is None
            with tracing.leaf("a step") as step:
                assert step is None
        caller = [(b"traceparent", f"00-{failing_trace}-{PARENT_ID}-01".encode())]
        with (
            pytest.raises(RuntimeError, match="went wrong"),
            tracing.server_span(traced.tracer, "POST", caller, {"url.path": "/y"}) as span,
        ):
            assert span.is_recording()
            span.update_name("POST /y")
            span.set_attributes({"http.route": "/y", "http.response.status_code": 500})
            with tracing.leaf("a step"):
                pass
            raise RuntimeError("went wrong")
        assert not span.is_recording()  # ended with the block
    finally:
        traced.shutdown()  # flushes
    spans = receiver.wait_for("server span", _server_span_done(failing_trace, "/y"))
    assert not _of_trace(unsampled_trace)(spans)
    failed = _one(_of_trace(failing_trace)(spans), "POST /y")
    assert failed.kind == ProtoSpan.SPAN_KIND_SERVER
    assert failed.parent_id == PARENT_ID
    assert failed.attributes == {
        "url.path": "/y",
        "http.route": "/y",
        "http.response.status_code": 500,
    }
    assert failed.status == Status.STATUS_CODE_ERROR
    [(event, details)] = failed.events
    assert event == "exception"
    assert details["exception.type"] == "RuntimeError"
    assert details["exception.message"] == "went wrong"
    assert "went wrong" in str(details["exception.stacktrace"])
    step_span = _one(_of_trace(failing_trace)(spans), "a step")
    assert step_span.parent_id == failed.span_id
    assert failed.start_ns <= step_span.start_ns <= step_span.end_ns <= failed.end_ns


# The export runs in the server's process.


def _children() -> set[int]:
    tasks = Path(f"/proc/{os.getpid()}/task")
    return {
        int(pid)
        for task in tasks.iterdir()
        if (task / "children").exists()
        for pid in (task / "children").read_text().split()
    }


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_spans_are_exported_by_the_server_process_itself(receiver: OtlpReceiver) -> None:
    """The official exporter runs in the batch processor's thread: tracing starts no process,
    and the spans a request ended just before shutdown are exported by it."""
    before = _children()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", receiver.url)
        env.setenv("OTEL_SERVICE_NAME", "in-process")
        traced = tracing.start_tracing("test")
    token = tracing.activate(traced.tracer)
    try:
        with tracing.span("last words"), tracing.leaf("a last step"):
            pass
        assert _children() <= before
    finally:
        tracing.deactivate(token)
        traced.shutdown()
    spans = receiver.wait_for(
        "spans of the in-process export",
        lambda found: (
            {"last words", "a last step"}
            <= {span.name for span in found if span.resource["service.name"] == "in-process"}
        ),
    )
    assert _one(spans, "a last step").parent_id == _one(spans, "last words").span_id
