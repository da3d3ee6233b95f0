"""Processes and the machine: CPU and memory of a process tree, free ports, versions."""

from __future__ import annotations

import os
import platform
import resource
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

TICK = os.sysconf("SC_CLK_TCK")


def log(message: str) -> None:
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {message}\n")
    sys.stderr.flush()


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
    children, out, todo = _children(), list[int](), [pid]
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
