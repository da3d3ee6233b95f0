"""A local OTLP/HTTP trace sink for the ``ours-traced`` target: it accepts what the server's
exporter posts to ``/v1/traces`` and answers 200, so that tracing costs the server what it costs
in production (spans, batching, protobuf encoding, the POST) without a collector to install.
It runs on a daemon thread of the benchmark process, whose CPU is reported as the client's."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, sink: TraceSink) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.sink = sink


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        sink = self.server.sink
        with sink.lock:
            sink.requests += 1
            sink.bytes += len(body)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        return


class TraceSink:
    """``endpoint`` is what ``OTEL_EXPORTER_OTLP_ENDPOINT`` should be set to."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests = 0
        self.bytes = 0
        self._server = _Server(self)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
