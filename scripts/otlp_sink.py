"""A local OTLP/HTTP trace sink: accepts ``POST /v1/traces``, answers 200, counts what it got.

For measuring what tracing costs the server without a collector, or for seeing that spans
arrive at all:

    uv run python scripts/otlp_sink.py --port 4318 &
    OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4318 uv run emb-model-provider serve

It decodes nothing unless ``--decode`` (then it counts spans by name with opentelemetry-proto),
so it takes little CPU from the server it listens to. Ctrl-C prints the totals.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

_REPLY = ExportTraceServiceResponse().SerializeToString()


class Totals:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests = 0
        self.bytes = 0
        self.spans: collections.Counter[str] = collections.Counter()


def serve(port: int, *, decode: bool) -> Totals:
    totals = Totals()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            names: list[str] = []
            if decode:
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                request = ExportTraceServiceRequest.FromString(body)
                names = [
                    span.name
                    for resource in request.resource_spans
                    for scope in resource.scope_spans
                    for span in scope.spans
                ]
            with totals.lock:
                totals.requests += 1
                totals.bytes += len(body)
                totals.spans.update(names)
            self.send_response(200 if self.path == "/v1/traces" else 404)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(_REPLY)))
            self.end_headers()
            self.wfile.write(_REPLY)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return totals


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=4318, help="default: %(default)s")
    parser.add_argument("--decode", action="store_true", help="count spans by name")
    args = parser.parse_args(argv)
    totals = serve(args.port, decode=args.decode)
    lines = [f"{totals.requests} export requests, {totals.bytes} bytes"]
    lines += [f"  {count:8d}  {name}" for name, count in totals.spans.most_common()]
    sys.stderr.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
