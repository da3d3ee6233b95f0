"""The OTLP export in a process of its own: the official exporter, off the server's GIL.

Recording a span costs the server little; encoding it to OTLP protobuf costs 14-35 µs of
pure-Python work a span (``opentelemetry-exporter-otlp-proto-common``), and POSTing it more.
Done by the batch processor's thread, in the server, that work holds the GIL that the event loop
and the model thread (between any two torch ops) need, and on a small machine takes a core from
torch's threads. Through the server it cost chatty traffic 7-9 % of its throughput, while a
server dropping its spans instead lost nothing measurable (``docs/operations.md``, "What it
costs").

So the server keeps the SDK's ``TracerProvider``, its sampler and its ``BatchSpanProcessor``
(the ``OTEL_BSP_*`` variables still size the queue and the batches, and a full queue still
drops), and the processor's exporter is ``SpanPipe``: it writes each batch as plain tuples, in
one ``pickle.dumps``, to the stdin of a child process, ~5 µs a span. The child (``python -m
emb_model_provider.core.trace_export``) turns them back into ``ReadableSpan``s and exports them
with the official ``OTLPSpanExporter``, configured by the ``OTEL_*`` variables it inherits. The
round trip loses nothing the OTLP encoder reads (tests/test_tracing.py compares the encoded
bytes). A frame is an 8-byte length and a pickle, written only by the parent.

Failures: a child that exited is started again at the next batch. A frame that cannot be
written within twice the export timeout, plus a second (the child stuck on a collector that does
not answer, or stopped), drops that batch and replaces the child. At shutdown the parent closes
the pipe, and the child exports what it holds, then exits. The child runs in a session of its
own, so a Ctrl-C at the terminal does not reach it, and it ignores SIGINT and SIGTERM (a service
manager may signal every process of the service): the server's last spans are still exported.
It ends at the end of its input, which a server killed outright also gives it.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import logging
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

from opentelemetry.attributes import BoundedAttributes
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.util import BoundedList
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.span import TraceState
from opentelemetry.util.types import AttributeValue

from emb_model_provider.core.logging import JsonFormatter, configure_logging

_log = logging.getLogger(__name__)
_LENGTH = struct.Struct("<Q")
#: How long the parent waits, at shutdown, for the child to export what it holds and exit (on
#: top of the export timeout).
_EXIT_GRACE_S = 5.0
#: The pipe's buffer where Linux lets us size it (64 KiB otherwise): a few batches.
_PIPE_BYTES = 1 << 20

ContextWire = tuple[int, int, int, bool, tuple[tuple[str, str], ...]]
ScopeWire = tuple[str, str | None, str | None]
#: A finished span on the wire: name, context, parent, kind, start, end, attributes, events,
#: links, status, scope, dropped (attributes, events, links).
SpanWire = tuple[
    str,
    ContextWire,
    ContextWire | None,
    int,
    int | None,
    int | None,
    dict[str, AttributeValue],
    list[tuple[str, int, dict[str, AttributeValue]]],
    list[tuple[ContextWire, dict[str, AttributeValue]]],
    tuple[int, str | None],
    ScopeWire,
    tuple[int, int, int],
]


def export_timeout_s() -> float:
    """The OTLP exporter's timeout: OTEL_EXPORTER_OTLP_TRACES_TIMEOUT, else
    OTEL_EXPORTER_OTLP_TIMEOUT (seconds, as the Python exporter reads them), else 10."""
    for name in ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT"):
        with contextlib.suppress(ValueError):
            return float(os.environ.get(name, ""))
    return 10.0


def _context(context: SpanContext) -> ContextWire:
    state = context.trace_state
    return (
        context.trace_id,
        context.span_id,
        int(context.trace_flags),
        context.is_remote,
        tuple(state.items()) if state else (),
    )


def _of_context(wire: ContextWire) -> SpanContext:
    trace_id, span_id, flags, is_remote, state = wire
    return SpanContext(
        trace_id,
        span_id,
        is_remote=is_remote,
        trace_flags=TraceFlags(flags),
        trace_state=TraceState(list(state)) if state else None,
    )


@dataclass(slots=True, eq=False)
class Finished:
    """A leaf span as ``core/tracing.py`` timed it (an internal span, child of ``context``), for
    the batch processor's queue: it skips the ``ReadableSpan``, and the batch processor's thread
    puts it on the wire (``to_wire``). The processor reads only ``context``'s sampled flag, which
    a leaf shares with its parent."""

    name: str
    context: SpanContext  # the parent's
    span_id: int
    start_ns: int
    end_ns: int
    attributes: Mapping[str, AttributeValue]
    links: Sequence[Link]
    #: The exception that ended it, as its type's name and its message (not the exception
    #: itself, whose traceback would keep the request's frames alive until the export).
    error: tuple[str, str] | None


def _finished_wire(span: Finished, scope: ScopeWire) -> SpanWire:
    """As the SDK's span would record it: an exception that ended it is an ``exception`` event
    and an error status."""
    status: tuple[int, str | None] = (StatusCode.UNSET.value, None)
    events: list[tuple[str, int, dict[str, AttributeValue]]] = []
    if span.error is not None:
        kind, message = span.error
        status = (StatusCode.ERROR.value, f"{kind}: {message}")
        exception: dict[str, AttributeValue] = {
            "exception.type": kind,
            "exception.message": message,
        }
        events.append(("exception", span.end_ns, exception))
    parent = _context(span.context)
    return (
        span.name,
        (parent[0], span.span_id, parent[2], False, parent[4]),
        parent,
        SpanKind.INTERNAL.value,
        span.start_ns,
        span.end_ns,
        dict(span.attributes),
        events,
        [(_context(link.context), dict(link.attributes or {})) for link in span.links],
        status,
        scope,
        (0, 0, 0),
    )


def to_wire(span: ReadableSpan | Finished, leaf_scope: ScopeWire = ("", None, None)) -> SpanWire:
    """A finished span as plain, picklable values (``leaf_scope``: a ``Finished`` span's)."""
    if isinstance(span, Finished):
        return _finished_wire(span, leaf_scope)
    scope = span.instrumentation_scope
    status = span.status
    return (
        span.name,
        _context(span.context),
        _context(span.parent) if span.parent is not None else None,
        span.kind.value,
        span.start_time,
        span.end_time,
        dict(span.attributes or {}),
        [(event.name, event.timestamp, dict(event.attributes or {})) for event in span.events],
        [(_context(link.context), dict(link.attributes or {})) for link in span.links],
        (status.status_code.value, status.description),
        (scope.name, scope.version, scope.schema_url) if scope is not None else ("", None, None),
        (span.dropped_attributes, span.dropped_events, span.dropped_links),
    )


def _attributes(values: dict[str, AttributeValue], dropped: int) -> Mapping[str, AttributeValue]:
    """The attributes, and how many the span had to drop (the encoder reads ``.dropped``)."""
    if not dropped:
        return values
    bounded = BoundedAttributes(attributes=values, immutable=False)
    bounded.dropped = dropped
    return bounded


def _counted(items: list[Any], dropped: int) -> Sequence[Any]:
    if not dropped:
        return items
    bounded = BoundedList.from_seq(len(items), items)
    bounded.dropped = dropped
    return bounded


def from_wire(
    wire: SpanWire, resource: Resource, scopes: dict[ScopeWire, InstrumentationScope]
) -> ReadableSpan:
    """The span ``to_wire`` was given, for ``resource`` (``scopes``: one object per scope)."""
    name, context, parent, kind, start, end, attributes, events, links, status, scope, dropped = (
        wire
    )
    if scope not in scopes:
        scopes[scope] = InstrumentationScope(*scope)
    event_list = [Event(event, values, timestamp) for event, timestamp, values in events]
    link_list = [Link(_of_context(linked), values) for linked, values in links]
    return ReadableSpan(
        name,
        _of_context(context),
        _of_context(parent) if parent is not None else None,
        resource,
        _attributes(attributes, dropped[0]),
        _counted(event_list, dropped[1]),
        _counted(link_list, dropped[2]),
        SpanKind(kind),
        status=Status(StatusCode(status[0]), status[1]),
        start_time=start,
        end_time=end,
        instrumentation_scope=scopes[scope],
    )


def _child_argv() -> list[str]:
    """The export process's command line, logging as the server does."""
    root = logging.getLogger()
    json_logs = any(isinstance(handler.formatter, JsonFormatter) for handler in root.handlers)
    return [
        sys.executable,
        "-m",
        __name__,
        "--log-format",
        "json" if json_logs else "text",
        "--log-level",
        logging.getLevelName(root.getEffectiveLevel()).lower(),
    ]


class SpanPipe(SpanExporter):
    """The batch processor's exporter in the server: each batch down a pipe to the export
    process (started here, with the environment as it is now)."""

    def __init__(
        self, resource: Resource, timeout_s: float, *, leaf_scope: ScopeWire = ("", None, None)
    ) -> None:
        self._leaf_scope = leaf_scope
        self._header = pickle.dumps((dict(resource.attributes), resource.schema_url))
        # The child may spend the export timeout on one batch (retries included) before it
        # reads the next frame.
        self._write_timeout_s = 2 * timeout_s + 1
        self._exit_timeout_s = timeout_s + _EXIT_GRACE_S
        self._env = dict(os.environ)
        # The child imports this package as the parent found it, installed or not.
        self._env["PYTHONPATH"] = os.pathsep.join(path for path in sys.path if path)
        self._argv = _child_argv()
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._pid = os.getpid()
        self._closed = False
        self._start()

    @property
    def pid(self) -> int | None:
        """The export process's pid, while one runs."""
        return self._proc.pid if self._proc is not None else None

    def _start(self) -> None:
        # A session of its own: a Ctrl-C at the terminal, sent to the server's process group,
        # does not reach it; it ends when its input does, after the server's last spans.
        self._proc = subprocess.Popen(
            self._argv, stdin=subprocess.PIPE, env=self._env, start_new_session=True
        )
        assert self._proc.stdin is not None
        fd = self._proc.stdin.fileno()
        os.set_blocking(fd, False)
        if hasattr(fcntl, "F_SETPIPE_SZ"):
            with contextlib.suppress(OSError):
                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, _PIPE_BYTES)
        if not self._write(self._header):
            self._stop(kill=True)

    def _write(self, payload: bytes) -> bool:
        """One frame, whole, within the write timeout; False when it could not be."""
        assert self._proc is not None and self._proc.stdin is not None
        fd = self._proc.stdin.fileno()
        view = memoryview(_LENGTH.pack(len(payload)) + payload)
        deadline = time.monotonic() + self._write_timeout_s
        while view:
            try:
                view = view[os.write(fd, view) :]
            except BlockingIOError:
                pass
            except OSError:  # the child is gone
                return False
            if view:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not select.select([], [fd], [], remaining)[1]:
                    return False
        return True

    def _stop(self, *, kill: bool) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if kill:
            proc.kill()
        assert proc.stdin is not None
        with contextlib.suppress(OSError):
            proc.stdin.close()  # end of input: the child exports what it holds and exits
        try:
            proc.wait(timeout=self._exit_timeout_s)
        except subprocess.TimeoutExpired:
            _log.warning("the trace export process did not exit in time; killing it")
            proc.kill()
            proc.wait()

    def _forked(self) -> None:
        """In a process forked from the one that started the child (a pre-forking server): the
        pipe is the parent's, so this process starts its own child."""
        self._lock = threading.Lock()
        self._pid = os.getpid()
        if self._proc is not None and self._proc.stdin is not None:
            with contextlib.suppress(OSError):
                os.close(self._proc.stdin.fileno())
        self._proc = None

    def export(self, spans: Sequence[ReadableSpan | Finished]) -> SpanExportResult:
        scope = self._leaf_scope
        wires = [to_wire(span, scope) for span in spans]
        payload = pickle.dumps(wires, protocol=pickle.HIGHEST_PROTOCOL)
        if self._pid != os.getpid():
            self._forked()
        with self._lock:
            if self._closed:
                return SpanExportResult.FAILURE
            if self._proc is not None and self._proc.poll() is not None:
                _log.warning(
                    "the trace export process exited (%s); starting another",
                    self._proc.returncode,
                )
                self._stop(kill=True)
            if self._proc is None:
                self._start()
            if self._proc is not None and self._write(payload):
                return SpanExportResult.SUCCESS
            _log.warning(
                "the trace export process took no spans for %.0f s: %d spans dropped, "
                "the process replaced",
                self._write_timeout_s,
                len(spans),
            )
            self._stop(kill=True)
            return SpanExportResult.FAILURE

    def shutdown(self) -> None:
        with self._lock:
            self._closed = True
            if self._pid == os.getpid():
                self._stop(kill=False)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def _read(stream: BinaryIO) -> bytes | None:
    """The next frame; None at the end of input."""
    head = stream.read(_LENGTH.size)
    if len(head) < _LENGTH.size:
        return None
    (size,) = _LENGTH.unpack(head)
    body = stream.read(size)
    return body if len(body) == size else None


class _HashedOnce(Resource):
    """The resource, hashed once. The OTLP encoder groups the spans it exports by resource, and
    ``Resource.__hash__`` serialises all the attributes to JSON on every call."""

    def __init__(self, attributes: Mapping[str, AttributeValue], schema_url: str | None) -> None:
        super().__init__(attributes, schema_url)
        self._hash = super().__hash__()

    def __hash__(self) -> int:
        return self._hash


def main(argv: list[str] | None = None) -> int:
    """The export process: frames from stdin, spans to OTLPSpanExporter, until stdin ends."""
    parser = argparse.ArgumentParser(
        description="The trace export process (started by the server)."
    )
    parser.add_argument("--log-format", choices=("text", "json"), default="text")
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    for stop in (signal.SIGINT, signal.SIGTERM):  # the server decides when this ends
        signal.signal(stop, signal.SIG_IGN)
    configure_logging(args.log_level, args.log_format)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    stream = sys.stdin.buffer
    header = _read(stream)
    if header is None:
        return 0
    attributes, schema_url = pickle.loads(header)
    resource = _HashedOnce(attributes, schema_url)
    exporter = OTLPSpanExporter()
    scopes: dict[ScopeWire, InstrumentationScope] = {}
    try:
        while (frame := _read(stream)) is not None:
            try:
                spans = [from_wire(wire, resource, scopes) for wire in pickle.loads(frame)]
                exporter.export(spans)
            except Exception:  # noqa: BLE001 (logged) one bad batch must not end the export
                _log.exception("could not export a batch of spans")
    finally:
        exporter.shutdown()  # type: ignore[no-untyped-call]
    return 0


if __name__ == "__main__":
    sys.exit(main())
