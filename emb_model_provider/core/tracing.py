"""OpenTelemetry traces: off by default, a ``ContextVar`` read and an ``is None`` when off.

``main.create_app`` calls ``start_tracing`` when ``Settings.tracing_enabled()``; only then is the
SDK imported and a ``TracerProvider`` with an OTLP/HTTP exporter built. The SDK reads the standard
``OTEL_*`` variables itself (endpoint, headers, timeout, service name, resource attributes,
sampler, batch processor delays), so this module invents none.

The tracer is not installed globally: each app has its own (tests run several apps in one
process, and the global provider can be set only once). The HTTP middleware, and the Batch API
runner for its lines, put it in a ``ContextVar``; asyncio tasks and ``asyncio.to_thread`` copy
it, so the service, the cache and the image fetches find it without a parameter, and find
``None`` (no span, nothing allocated) when tracing is off or the work is not traced.

The batcher's worker thread has no request context: each queued input carries an ``Origin``
(tracer, the span that queued it, when) and the forward pass becomes a span of its own trace,
linked to every request it served; each request's queue-wait span links back to it.

Only opentelemetry-api is imported at module level, so the services and the batcher may use this
floor without pulling the SDK in.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextvars import ContextVar, Token
from dataclasses import dataclass

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Link, Span, SpanContext, SpanKind, Tracer
from opentelemetry.util.types import AttributeValue

TRACER_NAME = "emb_model_provider"
#: ``service.name`` when neither OTEL_SERVICE_NAME nor OTEL_RESOURCE_ATTRIBUTES names one.
DEFAULT_SERVICE_NAME = "emb-model-provider"

Attributes = Mapping[str, AttributeValue]

_TRACER: ContextVar[Tracer | None] = ContextVar("emb_model_provider_tracer", default=None)
#: What ``span`` returns when nothing is traced: reusable, it holds no state.
_NO_SPAN: contextlib.AbstractContextManager[None] = contextlib.nullcontext()


@dataclass(frozen=True)
class Tracing:
    """An app's tracer and how to flush and stop its exporter (at shutdown)."""

    tracer: Tracer
    shutdown: Callable[[], None]


def start_tracing(service_version: str) -> Tracing:
    """A provider exporting over OTLP/HTTP in the background (``BatchSpanProcessor``), configured
    by the standard ``OTEL_*`` variables."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({SERVICE_VERSION: service_version})
    # Resource.create falls back to "unknown_service:<executable>" when the environment names no
    # service; ours is a better fallback, and an OTEL_SERVICE_NAME still wins.
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    provider = TracerProvider(resource=resource)  # the sampler comes from OTEL_TRACES_SAMPLER
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return Tracing(provider.get_tracer(TRACER_NAME, service_version), provider.shutdown)


def activate(tracer: Tracer | None) -> Token[Tracer | None]:
    """Trace the current task (and the tasks and threads it starts) with ``tracer``."""
    return _TRACER.set(tracer)


def deactivate(token: Token[Tracer | None]) -> None:
    _TRACER.reset(token)


def active() -> bool:
    return _TRACER.get() is not None


def span(
    name: str, attributes: Attributes | None = None, *, kind: SpanKind = SpanKind.INTERNAL
) -> contextlib.AbstractContextManager[Span | None]:
    """A child of the current span for the ``with`` block (``None`` when nothing is traced);
    an exception leaving the block is recorded on it and sets its status to error."""
    tracer = _TRACER.get()
    if tracer is None:
        return _NO_SPAN
    return tracer.start_as_current_span(name, attributes=attributes, kind=kind)


@contextlib.contextmanager
def server_span(
    tracer: Tracer, name: str, headers: Sequence[tuple[bytes, bytes]], attributes: Attributes
) -> Iterator[Span]:
    """The span of one HTTP request, continuing the caller's trace when its headers carry one
    (W3C ``traceparent``, or what OTEL_PROPAGATORS names), with ``tracer`` active inside."""
    carrier = {key.decode("latin-1"): value.decode("latin-1") for key, value in headers}
    parent = propagate.extract(carrier)
    token = _TRACER.set(tracer)
    try:
        with tracer.start_as_current_span(
            name, context=parent, kind=SpanKind.SERVER, attributes=attributes
        ) as current:
            yield current
    finally:
        _TRACER.reset(token)


def trace_id(current: Span) -> str | None:
    """The span's trace id as W3C writes it (32 lower-case hex digits); ``None`` when it has none
    (OTEL_SDK_DISABLED and no incoming ``traceparent``)."""
    context = current.get_span_context()
    return trace.format_trace_id(context.trace_id) if context.is_valid else None


@dataclass(frozen=True, eq=False)
class Origin:
    """Where queued inputs came from: the tracer, the context and span that queued them, and
    when (ns since the epoch); shared by the inputs of one call."""

    tracer: Tracer
    context: otel_context.Context
    span_context: SpanContext
    queued_ns: int


def origin() -> Origin | None:
    """The current request's origin for inputs about to be queued; ``None`` when not traced, or
    when the sampler left the request out (its queue wait would not be recorded either, and a
    forward pass linked to nothing recorded is noise)."""
    tracer = _TRACER.get()
    if tracer is None:
        return None
    current = otel_context.get_current()
    span = trace.get_current_span(current)
    if not span.is_recording():
        return None
    return Origin(tracer, current, span.get_span_context(), time.time_ns())


@contextlib.contextmanager
def forward_span(
    origins: Sequence[Origin], attributes: Attributes, *, started_ns: int | None
) -> Iterator[None]:
    """The model forward serving inputs of ``origins`` (not empty): a span of its own trace,
    linked to each request. With ``started_ns`` (the batch's first attempt) each request also
    gets its queue-wait span, from its ``queued_ns`` to ``started_ns``, linked to the forward."""
    distinct = list({id(item): item for item in origins}.values())
    tracer = distinct[0].tracer
    forward = tracer.start_span(
        "model.forward",
        context=otel_context.Context(),  # a root: it serves many requests, none is its parent
        attributes=attributes,
        links=[Link(item.span_context) for item in distinct],
    )
    try:
        with trace.use_span(forward, end_on_exit=True):
            yield
    finally:
        # Written after the forward (their times are given), so they never delay its start.
        if started_ns is not None:
            back = [Link(forward.get_span_context())]
            for item in distinct:
                wait = tracer.start_span(
                    "batcher.queue_wait",
                    context=item.context,
                    start_time=item.queued_ns,
                    links=back,
                )
                wait.end(end_time=max(started_ns, item.queued_ns))
