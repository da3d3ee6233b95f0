"""The load generator: a minimal HTTP/1.1 keep-alive client and the request patterns."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Any

import numpy as np

from bench.paths import MODEL_NAME


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


#: Seconds after which an idle kept-alive connection is closed rather than reused.
_IDLE_EXPIRY_S = 4.0


class _Connection:
    """One HTTP/1.1 keep-alive connection on asyncio streams: request bytes out, status and body
    (Content-Length or chunked) back. A few tens of microseconds of client CPU per request,
    against about 3 ms for httpx, whose cost would otherwise come out of the 2 cores the server
    is measured on."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def request(self, head: bytes, body: bytes) -> tuple[int, bytes, bool]:
        """(status, body, whether the server keeps the connection)."""
        self.writer.write(head + body)
        header = await self.reader.readuntil(b"\r\n\r\n")
        lines = header.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        fields = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
        if "content-length" in fields:
            data = await self.reader.readexactly(int(fields["content-length"]))
        elif "chunked" in fields.get("transfer-encoding", "").lower():
            parts = []
            while size := int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16):
                parts.append(await self.reader.readexactly(size))
                await self.reader.readexactly(2)
            await self.reader.readuntil(b"\r\n")  # no trailers expected
            data = b"".join(parts)
        else:
            raise RuntimeError(f"response {status} without a length: {fields}")
        return status, data, fields.get("connection", "").lower() != "close"

    def close(self) -> None:
        self.writer.close()


class Load:
    def __init__(self, base: str, model: str = MODEL_NAME, encoding_format: str = "base64") -> None:
        host_port = base.removeprefix("http://")
        self.encoding_format = encoding_format
        self.host, _, port = host_port.partition(":")
        self.port = int(port)
        self.model = model
        self._head = (
            f"POST /v1/embeddings HTTP/1.1\r\nHost: {host_port}\r\n"
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n"
        )
        self._idle: list[tuple[_Connection, float]] = []

    async def close(self) -> None:
        for connection, _ in self._idle:
            connection.close()
        self._idle.clear()

    async def _send(self, body: bytes) -> tuple[int, bytes]:
        head = self._head.format(len(body)).encode()
        while True:
            # A kept-alive connection idle for a while may have been closed by the server (uvicorn
            # closes after 5 s by default; httpx expires its own at 5 s for the same reason): drop
            # those, and try the next on a closed one; a fresh connection's error is real.
            connection = None
            while self._idle:
                candidate, idle_since = self._idle.pop()
                if time.monotonic() - idle_since < _IDLE_EXPIRY_S:
                    connection = candidate
                    break
                candidate.close()
            fresh = connection is None
            if connection is None:
                reader, writer = await asyncio.open_connection(self.host, self.port)
                connection = _Connection(reader, writer)
            try:
                status, data, keep = await asyncio.wait_for(
                    connection.request(head, body), timeout=120
                )
            except (asyncio.IncompleteReadError, ConnectionError):
                connection.close()
                if fresh:
                    raise
                continue
            except BaseException:
                connection.close()
                raise
            if keep:
                self._idle.append((connection, time.monotonic()))
            else:
                connection.close()
            return status, data

    async def post(self, inputs: list[Any]) -> float:
        start = time.perf_counter()
        body = {"model": self.model, "input": inputs, "encoding_format": self.encoding_format}
        status, data = await self._send(json.dumps(body).encode())
        if status != 200:
            raise RuntimeError(f"{status}: {data[:200]!r}")
        rows = json.loads(data)["data"]
        if len(rows) != len(inputs):
            raise RuntimeError(f"{len(rows)} vectors for {len(inputs)} inputs")
        embedding = rows[0]["embedding"]
        if isinstance(embedding, str):
            vector = np.frombuffer(base64.b64decode(embedding), dtype="<f4")
        else:  # float or quantised: a JSON array
            vector = np.asarray(embedding)
        if vector.shape[0] == 0:
            raise RuntimeError("empty vector")
        return (time.perf_counter() - start) * 1000

    async def sequential(self, inputs: list[Any], n: int, budget_s: float) -> list[float]:
        end, out = time.perf_counter() + budget_s, []
        for _ in range(n):
            if time.perf_counter() > end:
                break
            out.append(await self.post(inputs))
        return out

    async def chunks(
        self, items: list[Any], size: int, concurrency: int, budget_s: float
    ) -> dict[str, Any]:
        chunks = [items[i : i + size] for i in range(0, len(items), size)]
        next_chunk, latencies, done_inputs = iter(chunks), [], 0
        end = time.perf_counter() + budget_s

        async def worker() -> None:
            nonlocal done_inputs
            for chunk in next_chunk:  # shared iterator: each chunk is sent once
                if time.perf_counter() > end:
                    return
                latencies.append(await self.post(chunk))
                done_inputs += len(chunk)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
        return {
            "inputs": done_inputs,
            "wall_s": wall,
            "inputs_per_s": done_inputs / wall,
            "p50_ms": pct(latencies, 50),
            "p99_ms": pct(latencies, 99),
            "complete": done_inputs == len(items),
        }

    async def closed_loop(
        self, items: list[Any], concurrency: int, duration_s: float
    ) -> dict[str, Any]:
        """``concurrency`` clients, each sending one-input requests back to back for duration_s."""
        counter = iter(range(10**7))
        latencies: list[float] = []
        end = time.perf_counter() + duration_s

        async def worker() -> None:
            for i in counter:
                if time.perf_counter() > end:
                    return
                latencies.append(await self.post([items[i % len(items)]]))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
        return {
            "concurrency": concurrency,
            "requests": len(latencies),
            "wall_s": wall,
            "inputs_per_s": len(latencies) / wall,
            "p50_ms": pct(latencies, 50),
            "p99_ms": pct(latencies, 99),
        }
