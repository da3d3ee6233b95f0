"""OpenTelemetry traces: off by default, a ``ContextVar`` read and an ``is None`` when off.

``main.create_app`` calls ``start_tracing`` when ``Settings.tracing_enabled()``; only then is the
SDK imported and a ``TracerProvider`` with an OTLP/HTTP exporter built. The SDK reads the standard
``OTEL_*`` variables itself (endpoint, headers, timeout, service name, resource attributes,
sampler, batch processor delays), so this module invents none.

The tracer is not installed globally: each app has its own ``AppTracer`` (tests run several apps
in one process, and the global provider can be set only once). The HTTP middleware, and the Batch
API runner for its lines, put it in a ``ContextVar``; asyncio tasks and ``asyncio.to_thread`` copy
it, so the service, the cache and the image fetches find it without a parameter, and find
``None`` (no span, nothing allocated) when tracing is off or the work is not traced.

Two kinds of span. ``span`` is the SDK's own, made current for the block, for spans that have
children or run seldom (the server span, a Batch API line, an image fetch). ``leaf`` is for the
short steps every request takes (input checks, tokenisation, the cache lookup) and the queue
wait: spans without children, which this module times itself and hands to the SDK once they are
over, through its public calls only (``Tracer.start_span(start_time=...)`` and
``Span.end(end_time=...)``). They skip making a span current for the block, and the queue wait
is written by the request's own thread rather than the model's.

The SDK's ``BatchSpanProcessor`` hands the finished spans to the official ``OTLPSpanExporter``
in its own thread, in this process. Through the server, chatty traffic sampled in full pays a
few per cent of its throughput for it (``docs/operations.md``, "What it costs", has the figures
and the sampling to run in production); the heap frozen after a model load (``core/heap.py``)
keeps the collector from multiplying that cost.

The batcher's worker thread has no request context: each queued input carries an ``Origin``
(tracer, the span that queued it, when) and the forward pass becomes a span of its own trace,
linked to every request it served. Each request writes its queue-wait span itself once its
vectors are back, on its own thread rather than the model's, linked back to the forward.

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
from opentelemetry.trace import Link, Span, SpanContext, SpanKind, Status, StatusCode, Tracer
from opentelemetry.util.types import AttributeValue

TRACER_NAME = "emb_model_provider"
#: ``service.name`` when neither OTEL_SERVICE_NAME nor OTEL_RESOURCE_ATTRIBUTES names one.
DEFAULT_SERVICE_NAME = "emb-model-provider"

Attributes = Mapping[str, AttributeValue]
#: The forward that served a queued input: its span context, and when it started (ns since the
#: epoch).
Served = tuple[SpanContext, int]


@dataclass(frozen=True, eq=False)
class AppTracer:
    """An app's SDK tracer: ``span`` opens its spans, ``leaf`` writes its finished ones."""

    sdk: Tracer


_TRACER: ContextVar[AppTracer | None] = ContextVar("emb_model_provider_tracer", default=None)
#: What ``span`` and ``leaf`` return when nothing is traced: reusable, it holds no state.
_NO_SPAN: contextlib.AbstractContextManager[None] = contextlib.nullcontext()


@dataclass(frozen=True)
class Tracing:
    """An app's tracer and how to flush and stop its exporter (at shutdown)."""

    tracer: AppTracer
    shutdown: Callable[[], None]


def start_tracing(service_version: str) -> Tracing:
    """A provider exporting over OTLP/HTTP in the background, configured by the standard
    ``OTEL_*`` variables: the SDK's ``BatchSpanProcessor`` and the official exporter."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({SERVICE_VERSION: service_version})
    # Resource.create falls back to "unknown_service:<executable>" when the environment names no
    # service; ours is a better fallback, and an OTEL_SERVICE_NAME still wins.
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    # The sampler comes from OTEL_TRACES_SAMPLER, the batch sizes from OTEL_BSP_*, the endpoint,
    # headers and timeout from OTEL_EXPORTER_OTLP_*.
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    tracer = AppTracer(provider.get_tracer(TRACER_NAME, service_version))
    return Tracing(tracer, provider.shutdown)


def _record(
    tracer: AppTracer,
    name: str,
    parent: otel_context.Context,
    attributes: Attributes,
    *,
    start_ns: int,
    end_ns: int,
    links: Sequence[Link] = (),
    error: Exception | None = None,
) -> None:
    """A finished leaf span, child of the span current in ``parent``; an exception that ended it
    is recorded as the SDK's spans record one (an ``exception`` event, an error status), by its
    type and message only: a formatted traceback costs more than the whole span."""
    current = tracer.sdk.start_span(
        name, context=parent, attributes=attributes, links=links, start_time=start_ns
    )
    if error is not None:
        kind, message = type(error).__qualname__, str(error)
        current.add_event(
            "exception",
            {"exception.type": kind, "exception.message": message},
            timestamp=end_ns,
        )
        current.set_status(Status(StatusCode.ERROR, f"{kind}: {message}"))
    current.end(end_time=end_ns)


def activate(tracer: AppTracer | None) -> Token[AppTracer | None]:
    """Trace the current task (and the tasks and threads it starts) with ``tracer``."""
    return _TRACER.set(tracer)


def deactivate(token: Token[AppTracer | None]) -> None:
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
    return tracer.sdk.start_as_current_span(name, attributes=attributes, kind=kind)


class Leaf:
    """A leaf span being timed; attributes set before the block ends go on it."""

    __slots__ = ("attributes",)

    def __init__(self, attributes: Attributes | None) -> None:
        self.attributes: dict[str, AttributeValue] = dict(attributes or {})

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        self.attributes[key] = value

    def set_attributes(self, attributes: Attributes) -> None:
        self.attributes.update(attributes)


def leaf(
    name: str, attributes: Attributes | None = None
) -> contextlib.AbstractContextManager[Leaf | None]:
    """A child of the current span for the ``with`` block, which opens no span of its own
    (``None`` when nothing is traced, or the current span is not recorded); an exception leaving
    the block is recorded on it and sets its status to error."""
    tracer = _TRACER.get()
    if tracer is None:
        return _NO_SPAN
    parent = otel_context.get_current()
    if not trace.get_current_span(parent).is_recording():
        return _NO_SPAN
    return _timed(tracer, name, parent, Leaf(attributes))


@contextlib.contextmanager
def _timed(
    tracer: AppTracer, name: str, parent: otel_context.Context, current: Leaf
) -> Iterator[Leaf]:
    start = time.time_ns()
    try:
        yield current
    except Exception as exc:
        _record(
            tracer,
            name,
            parent,
            current.attributes,
            start_ns=start,
            end_ns=time.time_ns(),
            error=exc,
        )
        raise
    _record(tracer, name, parent, current.attributes, start_ns=start, end_ns=time.time_ns())


@contextlib.contextmanager
def server_span(
    tracer: AppTracer, name: str, headers: Sequence[tuple[bytes, bytes]], attributes: Attributes
) -> Iterator[Span]:
    """The span of one HTTP request, continuing the caller's trace when its headers carry one
    (W3C ``traceparent``, or what OTEL_PROPAGATORS names), with ``tracer`` active inside."""
    carrier = {key.decode("latin-1"): value.decode("latin-1") for key, value in headers}
    parent = propagate.extract(carrier)
    token = _TRACER.set(tracer)
    try:
        with tracer.sdk.start_as_current_span(
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

    tracer: AppTracer
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
def forward_span(origins: Sequence[Origin], attributes: Attributes) -> Iterator[SpanContext]:
    """The model forward serving inputs of ``origins`` (not empty): a span of its own trace,
    linked to each request; yields its context, for the requests' queue waits."""
    distinct = list({id(item): item for item in origins}.values())
    forward = distinct[0].tracer.sdk.start_span(
        "model.forward",
        context=otel_context.Context(),  # a root: it serves many requests, none is its parent
        attributes=attributes,
        links=[Link(item.span_context) for item in distinct],
    )
    with trace.use_span(forward, end_on_exit=True):
        yield forward.get_span_context()


def queue_waits(origin: Origin, served: Sequence[Served]) -> None:
    """The request's queue-wait spans, one per forward that served its inputs: from when it
    queued them to when that forward started (``served``: the forward's context and start, ns
    since the epoch), each linked to its forward."""
    seen: set[int] = set()
    for forward, started_ns in served:
        if forward.span_id in seen:
            continue
        seen.add(forward.span_id)
        _record(
            origin.tracer,
            "batcher.queue_wait",
            origin.context,
            {},
            start_ns=origin.queued_ns,
            end_ns=max(started_ns, origin.queued_ns),
            links=(Link(forward),),
        )
