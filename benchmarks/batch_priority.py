"""Benchmark: online latency with and without a Batch API job running, and the job's throughput.

    uv run python benchmarks/batch_priority.py                      # starts its own server
    uv run python benchmarks/batch_priority.py --lines 3000 --online 200
    uv run python benchmarks/batch_priority.py --url http://127.0.0.1:9000   # a running server

In one run, against one server:

1. ``idle``: ``--online`` sequential single-text /v1/embeddings requests (base64, as the SDK sends)
   on an idle server;
2. ``batch``: the same requests while a Batch API job of ``--lines`` lines runs (it is created
   first and checked to be still running at the end);
3. ``bulk``: the same requests while a plain client sends the job's texts to /v1/embeddings
   itself (``--bulk-concurrency`` requests of ``--bulk-size`` inputs in flight): the same work
   at interactive priority, for contrast;
4. ``idle`` again, to see how much the machine drifted.

Then it waits for the job and reports its throughput (inputs/s from creation to ``completed``,
client side). Every online text is unique (no result-cache hits). Every loop is bounded in
count and time. The load generator shares the CPU with the server: on a busy machine the
figures move, so compare the ratios of one run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

BENCH = Path(__file__).resolve().parent
CORPUS = BENCH / "corpus.jsonl"
MODEL = "all-MiniLM-L6-v2"
TERMINAL = ("completed", "failed", "expired", "cancelled")


def log(message: str) -> None:
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {message}\n")


def texts(count: int, tag: str) -> list[str]:
    """``count`` corpus texts, each made unique by ``tag`` and its index."""
    corpus = [json.loads(line)["text"] for line in CORPUS.read_text(encoding="utf-8").splitlines()]
    return [f"{corpus[index % len(corpus)]} [{tag}{index}]" for index in range(count)]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@contextlib.contextmanager
def server(data_dir: Path, deadline_s: float, extra: dict[str, str]) -> Iterator[str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {key: value for key, value in os.environ.items() if not key.startswith("EMB_PROVIDER_")}
    env.update(
        EMB_PROVIDER_DATA_DIR=str(data_dir),
        EMB_PROVIDER_ACCESS_LOG="false",
        EMB_PROVIDER_CACHE="off",  # every text is unique anyway
        HF_HUB_OFFLINE="1",
    )
    env.update(extra)
    command = [str(Path(sys.executable).parent / "emb-model-provider"), "serve"]
    command += ["--port", str(port), "--device", "cpu", "--log-level", "warning"]
    process = subprocess.Popen(command, env=env, cwd=data_dir)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            time.sleep(0.2)  # polling interval under a deadline
        else:
            raise TimeoutError(f"server not ready after {deadline_s} s")
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


async def online(http: httpx.AsyncClient, inputs: list[str], budget_s: float) -> list[float]:
    """Sequential single-input requests; latencies in ms."""
    latencies: list[float] = []
    stop_at = time.monotonic() + budget_s
    for text in inputs:
        if time.monotonic() > stop_at:
            break
        started = time.perf_counter()
        response = await http.post(
            "/v1/embeddings", json={"model": MODEL, "input": text, "encoding_format": "base64"}
        )
        response.raise_for_status()
        latencies.append((time.perf_counter() - started) * 1000)
    return latencies


async def bulk(
    http: httpx.AsyncClient, inputs: list[str], size: int, concurrency: int, stop: asyncio.Event
) -> int:
    """Send ``inputs`` in requests of ``size`` until done or ``stop``; inputs sent."""
    chunks = [inputs[start : start + size] for start in range(0, len(inputs), size)]
    sent = 0

    async def worker() -> None:
        nonlocal sent
        while chunks and not stop.is_set():
            chunk = chunks.pop()
            body = {"model": MODEL, "input": chunk, "encoding_format": "base64"}
            (await http.post("/v1/embeddings", json=body)).raise_for_status()
            sent += len(chunk)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return sent


def summary(latencies: list[float]) -> dict[str, float]:
    result = {
        "requests": len(latencies),
        "p50_ms": round(statistics.median(latencies), 2),
        "p99_ms": round(pct(latencies, 0.99), 2),
        "max_ms": round(max(latencies), 2),
    }
    log(f"  {result}")
    return result


async def start_batch(http: httpx.AsyncClient, payload: bytes, name: str) -> tuple[str, float]:
    """Upload ``payload`` and create a batch of it: its id and when it was created."""
    uploaded = await http.post(
        "/v1/files", files={"file": (name, payload)}, data={"purpose": "batch"}
    )
    uploaded.raise_for_status()
    created_at = time.perf_counter()
    created = await http.post(
        "/v1/batches",
        json={
            "input_file_id": uploaded.json()["id"],
            "endpoint": "/v1/embeddings",
            "completion_window": "24h",
        },
    )
    created.raise_for_status()
    return created.json()["id"], created_at


async def job_alone(http: httpx.AsyncClient, payload: bytes, deadline_s: float) -> float:
    """Seconds from creating a batch of ``payload`` to its completion, with no other traffic."""
    batch_id, started = await start_batch(http, payload, "alone.jsonl")
    while (await http.get(f"/v1/batches/{batch_id}")).json()["status"] not in TERMINAL:
        if time.perf_counter() - started > deadline_s:
            raise TimeoutError("the solitary batch did not finish in time")
        await asyncio.sleep(0.05)  # polling interval under a deadline
    return time.perf_counter() - started


async def measure(url: str, args: argparse.Namespace) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=args.bulk_concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        await online(http, texts(20, "warm"), 30)  # warm-up, not counted
        results: dict[str, Any] = {}
        log(f"idle: {args.online} online requests")
        results["idle"] = summary(await online(http, texts(args.online, "idle"), args.budget_s))

        job_texts = texts(args.lines, "job")
        lines = [
            {
                "custom_id": f"line-{index}",
                "method": "POST",
                "url": "/v1/embeddings",
                "body": {"model": MODEL, "input": text, "encoding_format": "base64"},
            }
            for index, text in enumerate(job_texts)
        ]
        payload = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
        batch_id, created_at = await start_batch(http, payload, "job.jsonl")
        log(f"batch: {args.online} online requests while batch {batch_id} runs")
        with_batch = await online(http, texts(args.online, "batch"), args.budget_s)
        state = (await http.get(f"/v1/batches/{batch_id}")).json()
        results["batch"] = {
            **summary(with_batch),
            "job_status_after": state["status"],
            "job_lines_done_after": state["request_counts"]["completed"],
        }
        if state["status"] != "in_progress":
            log("the job ended before the online requests did: raise --lines")

        if not args.skip_bulk:
            log(f"bulk: {args.online} online requests while a client sends the texts online")
            stop = asyncio.Event()
            bulk_task = asyncio.create_task(
                bulk(http, texts(args.lines, "bulk"), args.bulk_size, args.bulk_concurrency, stop)
            )
            await asyncio.sleep(0.5)  # let the bulk client fill the queue first
            with_bulk = await online(http, texts(args.online, "bulk-online"), args.budget_s)
            stop.set()
            results["bulk"] = {**summary(with_bulk), "bulk_inputs_sent": await bulk_task}

        log("waiting for the job to finish")
        while (await http.get(f"/v1/batches/{batch_id}")).json()["status"] not in TERMINAL:
            if time.perf_counter() - created_at > args.budget_s * 10:
                raise TimeoutError("the batch did not finish in time")
            await asyncio.sleep(0.1)  # polling interval under a deadline
        job_s = time.perf_counter() - created_at
        log(f"idle again: {args.online} online requests")
        results["idle_after"] = summary(
            await online(http, texts(args.online, "after"), args.budget_s)
        )
        final = (await http.get(f"/v1/batches/{batch_id}")).json()
        results["job"] = {
            "lines": args.lines,
            "status": final["status"],
            "request_counts": final["request_counts"],
            "wall_s": round(job_s, 2),
            "inputs_per_s": round(args.lines / job_s, 1),
            "note": "includes the online phases it shared the server with",
        }
        if args.skip_alone:
            return results
        log("job alone: a second job with no other traffic, for its throughput")
        alone_s = await job_alone(http, payload, args.budget_s * 10)
        results["job_alone"] = {
            "lines": args.lines,
            "wall_s": round(alone_s, 2),
            "inputs_per_s": round(args.lines / alone_s, 1),
        }
        return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running server (default: start one)")
    parser.add_argument("--lines", type=int, default=4000, help="lines of the batch job")
    parser.add_argument("--online", type=int, default=200, help="online requests per phase")
    parser.add_argument("--bulk-size", type=int, default=32, help="inputs per bulk request")
    parser.add_argument("--bulk-concurrency", type=int, default=4)
    parser.add_argument("--budget-s", type=float, default=120, help="time cap of each phase")
    parser.add_argument("--skip-bulk", action="store_true", help="no bulk-client phase")
    parser.add_argument("--skip-alone", action="store_true", help="no second, solitary job")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting of the server started here, e.g. --set BATCH_LINE_CONCURRENCY=8",
    )
    args = parser.parse_args()
    if args.url:
        results = asyncio.run(measure(args.url, args))
    else:
        extra = {
            f"EMB_PROVIDER_{name.upper()}": value
            for name, _, value in (item.partition("=") for item in args.set)
        }
        with tempfile.TemporaryDirectory() as folder, server(Path(folder), 300, extra) as url:
            results = asyncio.run(measure(url, args))
    idle = results["idle"]["p99_ms"]
    lines = [
        "| phase | requests | p50 ms | p99 ms | max ms | p99 / idle p99 |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for phase in ("idle", "batch", "bulk", "idle_after"):
        if phase not in results:
            continue
        row = results[phase]
        lines.append(
            f"| {phase} | {row['requests']} | {row['p50_ms']} | {row['p99_ms']} | {row['max_ms']} "
            f"| {row['p99_ms'] / idle:.2f} |"
        )
    lines.append("")
    lines.append(
        f"batch job ({args.lines} lines, shared with the online phases): "
        f"{results['job']['inputs_per_s']} inputs/s"
    )
    if "job_alone" in results:
        lines.append(f"batch job alone: {results['job_alone']['inputs_per_s']} inputs/s")
    sys.stdout.write(json.dumps(results, indent=2) + "\n\n" + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
