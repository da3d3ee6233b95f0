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
wait: spans without children whose start and end this module times itself, queued as they are
(``trace_export.Finished``) in the SDK's ``BatchSpanProcessor``. They skip what a leaf does not
need: making the span current, the sampler (a leaf is recorded exactly when its parent is, which
is what the default parent-based sampler decides), the attribute locks, the copy the SDK makes
of every span when it ends, and the ``ReadableSpan`` itself.

The processor's exporter is not in this process: ``trace_export.SpanPipe`` pickles each batch
to a child process that runs the official OTLP exporter, because the protobuf encoding, done
here, cost chatty traffic 5-8 % of its throughput (``core/trace_export.py`` and
``docs/operations.md``, "What it costs", have the figures). In-process, a traced one-input request
now costs ~0.06 ms of CPU on the request's thread (the SDK's server span is half of it) and
~0.025 ms on the processor's.

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
from typing import Protocol, cast

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Link, Span, SpanContext, SpanKind, Tracer
from opentelemetry.util.types import AttributeValue

TRACER_NAME = "emb_model_provider"
#: ``service.name`` when neither OTEL_SERVICE_NAME nor OTEL_RESOURCE_ATTRIBUTES names one.
DEFAULT_SERVICE_NAME = "emb-model-provider"

Attributes = Mapping[str, AttributeValue]
#: The forward that served a queued input: its span context, and when it started (ns since the
#: epoch).
Served = tuple[SpanContext, int]


class RecordLeaf(Protocol):
    """Hands a finished leaf span, a child of ``parent``, to the exporter; ``error`` is the
    exception that ended it, if one did."""

    def __call__(
        self,
        name: str,
        parent: SpanContext,
        start_ns: int,
        end_ns: int,
        attributes: Attributes,
        *,
        links: Sequence[Link] = (),
        error: Exception | None = None,
    ) -> None: ...


@dataclass(frozen=True, eq=False)
class AppTracer:
    """An app's SDK tracer, and how its leaf spans are written (``leaf``)."""

    sdk: Tracer
    record: RecordLeaf


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
    ``OTEL_*`` variables: the SDK's ``BatchSpanProcessor`` hands its batches to the official
    exporter in a process of its own (``core/trace_export.py``)."""
    from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

    from emb_model_provider.core.trace_export import Finished, SpanPipe, export_timeout_s

    resource = Resource.create({SERVICE_VERSION: service_version})
    # Resource.create falls back to "unknown_service:<executable>" when the environment names no
    # service; ours is a better fallback, and an OTEL_SERVICE_NAME still wins.
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))

    ids = RandomIdGenerator()
    # The sampler comes from OTEL_TRACES_SAMPLER.
    provider = TracerProvider(resource=resource, id_generator=ids)
    processor = BatchSpanProcessor(
        SpanPipe(resource, export_timeout_s(), leaf_scope=(TRACER_NAME, service_version, None))
    )
    provider.add_span_processor(processor)

    def record(
        name: str,
        parent: SpanContext,
        start_ns: int,
        end_ns: int,
        attributes: Attributes,
        *,
        links: Sequence[Link] = (),
        error: Exception | None = None,
    ) -> None:
        span_id = ids.generate_span_id()
        failure = (type(error).__qualname__, str(error)) if error is not None else None
        finished = Finished(name, parent, span_id, start_ns, end_ns, attributes, links, failure)
        # The processor queues it as it is (it reads only the sampled flag); the pipe sends it.
        processor.on_end(cast(ReadableSpan, finished))

    tracer = AppTracer(provider.get_tracer(TRACER_NAME, service_version), record)
    return Tracing(tracer, provider.shutdown)


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
    parent = trace.get_current_span()
    if not parent.is_recording():
        return _NO_SPAN
    return _timed(tracer, name, parent.get_span_context(), Leaf(attributes))


@contextlib.contextmanager
def _timed(tracer: AppTracer, name: str, parent: SpanContext, current: Leaf) -> Iterator[Leaf]:
    start = time.time_ns()
    try:
        yield current
    except Exception as exc:
        tracer.record(name, parent, start, time.time_ns(), current.attributes, error=exc)
        raise
    tracer.record(name, parent, start, time.time_ns(), current.attributes)


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
        origin.tracer.record(
            "batcher.queue_wait",
            origin.span_context,
            origin.queued_ns,
            max(started_ns, origin.queued_ns),
            {},
            links=(Link(forward),),
        )
