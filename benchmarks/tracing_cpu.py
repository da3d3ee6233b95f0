"""The CPU a traced request costs the server process, export included, measured in one process:
what a chatty ``/v1/embeddings`` request records (the server span, the input checks and
tokenisation leaves, the queue wait, its share of a forward span for 16 requests), exported by
the SDK's batch processor with the official OTLP/HTTP exporter to a local sink
(``scripts/otlp_sink.py``, in a process of its own).

    uv run python benchmarks/tracing_cpu.py [--requests 20000]

CPU time, unlike a throughput ratio through the server, hardly depends on what else the machine
runs, so this is the figure to read on a shared machine; divide it by a request's CPU in the
untraced server to get the share tracing takes. Prints, per sampler, the process CPU per request
(µs) over the untraced loop's, the batch processor's export included (the provider is shut
down, which flushes, inside the timed span).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from emb_model_provider.core import tracing

ROOT = Path(__file__).resolve().parents[1]
#: Requests whose inputs one forward serves (a chatty batch).
_BATCH = 16


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _requests(tracer: tracing.AppTracer | None, count: int) -> None:
    """``count`` requests' spans, as the middleware, the service and the batcher write them."""
    headers: list[tuple[bytes, bytes]] = []
    attributes: tracing.Attributes = {
        "http.request.method": "POST",
        "url.path": "/v1/embeddings",
        "emb.inputs": 1,
    }
    for start in range(0, count, _BATCH):
        origins: list[tracing.Origin] = []
        for _ in range(min(_BATCH, count - start)):
            if tracer is None:
                continue
            with tracing.server_span(tracer, "POST /v1/embeddings", headers, attributes) as span:
                span.set_attribute("http.response.status_code", 200)
                with tracing.leaf("embeddings.check_inputs"):
                    pass
                with tracing.leaf("embeddings.tokenize", {"emb.inputs": 1}) as step:
                    if step is not None:
                        step.set_attribute("emb.tokens", 12)
                origin = tracing.origin()
                if origin is not None:
                    origins.append(origin)
        if not origins:
            continue
        with tracing.forward_span(origins, {"emb.batch.size": len(origins)}) as forward:
            served = [(forward, time.time_ns())]
        for origin in origins:
            tracing.queue_waits(origin, served)


def _measure(sampler: str | None, arg: str | None, count: int, endpoint: str) -> float:
    """Process CPU seconds for ``count`` requests traced with ``sampler`` (None: tracing off)."""
    for name, value in (("OTEL_TRACES_SAMPLER", sampler), ("OTEL_TRACES_SAMPLER_ARG", arg)):
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = endpoint
    # This loop records spans far faster than a server does: a queue that holds them all, so
    # that none is dropped and every one's export is counted.
    os.environ["OTEL_BSP_MAX_QUEUE_SIZE"] = str(8 * count)
    traced = tracing.start_tracing("bench") if sampler is not None else None
    started = time.process_time()
    _requests(traced.tracer if traced else None, count)
    if traced is not None:
        traced.shutdown()  # flushes: the export's CPU is counted
    return time.process_time() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=3, help="the best of this many runs")
    args = parser.parse_args()
    port = _free_port()
    sink = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "otlp_sink.py"), "--port", str(port)],
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        time.sleep(1)  # the sink binds its port
        endpoint = f"http://127.0.0.1:{port}"
        samplers = [
            ("off", None, None),
            ("always_on", "always_on", None),
            ("parentbased_traceidratio 0.1", "parentbased_traceidratio", "0.1"),
        ]
        _measure("always_on", None, 2_000, endpoint)  # warm: imports, connections
        best = {
            label: min(_measure(s, a, args.requests, endpoint) for _ in range(args.repeats))
            for label, s, a in samplers
        }
    finally:
        sink.send_signal(signal.SIGINT)
        _, totals = sink.communicate(timeout=30)
    off = best["off"]
    print("| sampler | CPU µs per request | added by tracing, µs |")  # noqa: T201
    print("| --- | --- | --- |")  # noqa: T201
    for label, seconds in best.items():
        per = seconds / args.requests * 1e6
        added = (seconds - off) / args.requests * 1e6
        print(f"| {label} | {per:.1f} | {added:.1f} |")  # noqa: T201
    print(f"\nsink: {totals.decode().strip()}")  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
