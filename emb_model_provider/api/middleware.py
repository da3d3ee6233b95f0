"""Request id, access log, metrics, CORS, gzip, body cap and timeout, as pure ASGI middleware.

Pure ASGI (no ``BaseHTTPMiddleware``): each layer wraps ``send``/``receive`` and costs a function
call per message on the hot path, with no extra task or response copy. Order, outermost first:

1. ``RequestContextMiddleware``: request id (client's ``X-Request-ID``, sanitised, or a new one)
   on ``request.state.request_id`` and on every response; one access-log line and the request
   metrics when the request ends. With tracing on (``core/tracing.py``) it also holds the
   request's server span, written here rather than by opentelemetry-instrumentation-asgi: this
   layer already knows the route template, the status and the request id, and one more ASGI
   wrapper would cost a layer of ``send`` calls on every message. The span continues an incoming
   W3C ``traceparent`` and its trace id goes in the access-log line.
2. ``CORSMiddleware`` (Starlette's), when origins are configured: errors carry CORS headers too.
3. ``BodyLimitMiddleware``: 413 from ``Content-Length`` before reading, or while counting a
   streamed (chunked) body.
4. ``TimeoutMiddleware``: 504 when the request takes too long; cancelling the route cancels the
   service call and with it the batcher's futures, so queued inputs are skipped.
5. ``GZipMiddleware`` (Starlette's; compresses in a worker thread above 128 KiB).

FastAPI's ``ServerErrorMiddleware`` sits outside all of these and answers unexpected errors
(``api/exceptions.py`` adds the request id header there itself).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from typing import Any

from fastapi import FastAPI
from opentelemetry.trace import Span, StatusCode
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.middleware.gzip import GZipMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from emb_model_provider.api.exceptions import error_response
from emb_model_provider.core import tracing
from emb_model_provider.core.config import Settings
from emb_model_provider.services.metrics import Metrics

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("emb_model_provider.access")

REQUEST_ID_HEADER = "X-Request-ID"
MAX_REQUEST_ID_CHARS = 128
_UNSAFE_ID_CHARS = re.compile(rb"[^A-Za-z0-9._:/+=@-]")
#: zlib level 1. Measured on 2048 MiniLM (384-d) embeddings: float JSON is 9.7 MB and level 1
#: keeps 44 % of it in ~0.26 s of one core (level 6: 42 % in ~5x the time); base64 (the SDK's
#: default) is 4.3 MB and keeps 75 % in ~0.12 s. Starlette compresses bodies over 128 KiB in a
#: worker thread, so the event loop does not wait on it.
GZIP_LEVEL = 1
#: Probes and scrapes are not traced: a load balancer or Prometheus calls them every few seconds,
#: and their spans would bury the requests' ones.
UNTRACED_PATHS = frozenset({"/health", "/ready", "/metrics"})


def request_id_from(scope: Scope) -> str:
    """The client's ``X-Request-ID`` stripped to safe characters and 128 of them, or a new id."""
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            cleaned = _UNSAFE_ID_CHARS.sub(b"", value[: MAX_REQUEST_ID_CHARS * 4])
            if cleaned:
                return cleaned[:MAX_REQUEST_ID_CHARS].decode("ascii")
            break
    return uuid.uuid4().hex


def _route_template(scope: Scope) -> str:
    """The matched route's template (``/v1/models/{model}``), never the raw path: a metrics label
    must not take one value per URL a client invents."""
    path = getattr(scope.get("route"), "path", None)
    return path if isinstance(path, str) else "unmatched"


class RequestContextMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        metrics: Metrics | None,
        access_log: bool,
        tracer: tracing.AppTracer | None = None,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.access_log = access_log
        self.tracer = tracer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_from(scope)
        state: dict[str, Any] = scope.setdefault("state", {})
        state["request_id"] = request_id
        header = (b"x-request-id", request_id.encode("ascii"))
        started = time.perf_counter()
        status = 500  # what the client gets when the app raises before answering

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        if self.tracer is None or scope["path"] in UNTRACED_PATHS:
            try:
                await self.app(scope, receive, send_with_id)
            finally:
                self._finish(scope, state, request_id, status, time.perf_counter() - started)
            return
        method = scope["method"]
        with tracing.server_span(
            self.tracer, method, scope["headers"], _request_attributes(scope, request_id)
        ) as span:
            try:
                await self.app(scope, receive, send_with_id)
            finally:
                _end_server_span(span, scope, state, status)
                self._finish(
                    scope, state, request_id, status, time.perf_counter() - started, span=span
                )

    def _finish(
        self,
        scope: Scope,
        state: dict[str, Any],
        request_id: str,
        status: int,
        duration_s: float,
        *,
        span: Span | None = None,
    ) -> None:
        model: str | None = state.get("model")
        inputs: int = state.get("inputs", 0)
        tokens: int = state.get("tokens", 0)
        if self.metrics is not None:
            self.metrics.observe_request(
                route=_route_template(scope),
                method=scope["method"],
                status=status,
                duration_s=duration_s,
                model=model,
                inputs=inputs,
                tokens=tokens,
                task=state.get("task", "embed"),
            )
        if not (self.access_log and access_logger.isEnabledFor(logging.INFO)):
            return
        client = scope.get("client")
        peer = f"{client[0]}:{client[1]}" if client else "-"
        fields: dict[str, object] = {
            "request_id": request_id,
            "method": scope["method"],
            "path": scope["path"],
            "status": status,
            "duration_ms": round(duration_s * 1000, 2),
            "client": peer,
        }
        usage = ""
        if model is not None:
            fields.update(model=model, inputs=inputs, tokens=tokens)
            usage = f" model={model} inputs={inputs} tokens={tokens}"
        trace_id = tracing.trace_id(span) if span is not None else None
        if trace_id is not None:
            fields["trace_id"] = trace_id
            usage += f" trace={trace_id}"
        # Never the body or the query: they can hold input text or credentials.
        access_logger.info(
            "%s %s %d %.1fms id=%s client=%s%s",
            scope["method"],
            scope["path"],
            status,
            duration_s * 1000,
            request_id,
            peer,
            usage,
            extra=fields,
        )


def _request_attributes(scope: Scope, request_id: str) -> tracing.Attributes:
    """The server span's attributes known before the app runs (OpenTelemetry's HTTP semantic
    conventions); never the query string, which may hold credentials."""
    attributes: dict[str, str | int] = {
        "http.request.method": scope["method"],
        "url.scheme": scope.get("scheme", "http"),
        "url.path": scope["path"],
        "network.protocol.version": scope.get("http_version", "1.1"),
        "emb.request_id": request_id,
    }
    server = scope.get("server")
    if server and server[1] is not None:
        attributes["server.address"] = server[0]
        attributes["server.port"] = server[1]
    client = scope.get("client")
    if client:
        attributes["client.address"] = client[0]
    return attributes


def _end_server_span(span: Span, scope: Scope, state: dict[str, Any], status: int) -> None:
    """Name the span by the route template (``POST /v1/embeddings``, known only once routing
    ran), add the status and what the request cost; 5xx are errors, 4xx the client's."""
    route = getattr(scope.get("route"), "path", None)
    if isinstance(route, str):
        span.update_name(f"{scope['method']} {route}")
        span.set_attribute("http.route", route)
    span.set_attribute("http.response.status_code", status)
    if status >= 500:
        span.set_attribute("error.type", str(status))
        span.set_status(StatusCode.ERROR)
    model = state.get("model")
    if model is not None:
        span.set_attributes(
            {
                "gen_ai.request.model": model,
                "gen_ai.usage.input_tokens": state.get("tokens", 0),
                "emb.inputs": state.get("inputs", 0),
            }
        )


class RequestTooLarge(StarletteHTTPException):
    """Raised from ``receive`` when a streamed body passes the cap; an ``HTTPException`` so that
    FastAPI's body parsing lets it through to ``api/exceptions.py`` (it turns any other error
    while reading into a 400)."""


def _too_large_message(max_bytes: int, size: str) -> str:
    return (
        f"The request body is too large ({size}); this server accepts at most {max_bytes} bytes. "
        "Send fewer or smaller inputs per request."
    )


#: Bytes a multipart upload adds around its file (boundaries, part headers, the purpose field).
_MULTIPART_ROOM = 64 * 1024


class BodyLimitMiddleware:
    """``max_bytes`` for every path but those in ``path_limits`` (exact paths), which have their
    own: an upload of a Batch API file is bounded by the batch file limit, not the request one."""

    def __init__(
        self, app: ASGIApp, *, max_bytes: int, path_limits: dict[str, int] | None = None
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.path_limits = path_limits or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        max_bytes = self.path_limits.get(scope["path"], self.max_bytes)
        for name, value in scope["headers"]:
            if name == b"content-length":
                if value.isdigit() and int(value) > max_bytes:
                    message = _too_large_message(max_bytes, f"{int(value)} bytes")
                    response = error_response(413, message, type_="invalid_request_error")
                    await response(scope, receive, send)
                    return
                break
        received = 0

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > max_bytes:
                    raise RequestTooLarge(
                        413, _too_large_message(max_bytes, f"more than {max_bytes} bytes")
                    )
            return message

        await self.app(scope, counted_receive, send)


class TimeoutMiddleware:
    """504 once a request has run ``timeout_s``: 504 rather than 408, because 408 says the
    *client* was too slow to send its request (RFC 9110 §15.5.9), while this limit is on the
    server's own work (queue and model). The OpenAI SDK raises ``InternalServerError`` for it
    and retries it with back-off, as it does 408 (``openai/_base_client.py``)."""

    def __init__(self, app: ASGIApp, *, timeout_s: float) -> None:
        self.app = app
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracking(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        deadline = asyncio.timeout(self.timeout_s)
        try:
            async with deadline:
                await self.app(scope, receive, send_tracking)
        except TimeoutError:
            if not deadline.expired():
                raise  # a TimeoutError of the app's own, not ours
            request_id = scope.get("state", {}).get("request_id", "-")
            logger.warning(
                "request %s (%s %s) passed the %.3g s limit; its work was dropped",
                request_id,
                scope["method"],
                scope["path"],
                self.timeout_s,
            )
            if started:  # the status line is out; all that is left is to end the connection
                raise
            response = error_response(
                504,
                f"The request did not complete within the server's limit of {self.timeout_s:g} s "
                f"(request id {request_id}). Retry later, or send fewer inputs per request.",
                type_="server_error",
                code="request_timeout",
            )
            await response(scope, receive, send)


def install_middleware(
    app: FastAPI,
    settings: Settings,
    metrics: Metrics | None,
    *,
    tracer: tracing.AppTracer | None = None,
) -> None:
    """Add the stack above; ``add_middleware`` puts each new layer outside the previous ones."""
    if settings.gzip_min_bytes > 0:
        app.add_middleware(
            GZipMiddleware, minimum_size=settings.gzip_min_bytes, compresslevel=GZIP_LEVEL
        )
    if settings.request_timeout_s > 0:
        app.add_middleware(TimeoutMiddleware, timeout_s=settings.request_timeout_s)
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=settings.max_request_bytes,
        # A batch input file up to its own limit, plus room for the multipart envelope.
        path_limits={"/v1/files": settings.batch_max_file_bytes + _MULTIPART_ROOM},
    )
    origins = settings.cors_origin_list()
    if origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(origins),
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=[REQUEST_ID_HEADER],
            max_age=600,
        )
    app.add_middleware(
        RequestContextMiddleware, metrics=metrics, access_log=settings.access_log, tracer=tracer
    )
