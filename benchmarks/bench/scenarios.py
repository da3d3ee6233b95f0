"""The scenarios: raw reference, interleaved server runs, images, repeated queries, profile."""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.client import Load, pct
from bench.paths import BENCH, CORPUS, MODEL_NAME
from bench.system import CpuMeter, RssSampler, log, tree_rss_kb
from bench.targets import Server, Target, make_targets, ours_argv

SINGLE_TEXT = "How do I reset my password?"


SWEEP_LEVELS = (1, 2, 4, 8, 16, 32, 64, 128)


#: The repeated-query scenario: this share of requests asks for one of REPEAT_HOT_SET texts.
REPEAT_SHARE = 0.9


REPEAT_HOT_SET = 200


REPEAT_CLIENTS = 16


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
    #: The name the servers are asked for (``--model`` serves another model under its own name).
    model: str = MODEL_NAME
    #: Rounds of the single, bulk and chatty scenarios, the servers' order reversed every other
    #: round (A B, B A, ...), so that drift and whatever the machine does to the one measured
    #: second fall on every server alike; the figures are the rounds' mean (inputs/s) or median.
    rounds: int = 1


def run_raw(model_dir: str, plan: Plan, thread_check: bool) -> dict[str, Any]:
    argv = [
        sys.executable,
        str(BENCH / "raw_reference.py"),
        "text",
        "--model-dir",
        model_dir,
        "--corpus",
        str(CORPUS),
        "--n-inputs",
        str(plan.n_inputs),
        "--n-single",
        str(plan.n_single),
        "--single-text",
        SINGLE_TEXT,
        "--budget-s",
        str(plan.raw_budget_s),
    ] + (["--thread-check"] if thread_check else [])
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
    loads = {n: Load(s.base, plan.model, s.target.encoding_format) for n, s in servers.items()}
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

    def sweep_step(level: int, load: Load) -> Any:
        return load.closed_loop(corpus, level, plan.sweep_s)

    try:
        for name, server in servers.items():
            out[name]["startup_s"] = server.startup_s
            out[name]["idle_rss_kb"] = tree_rss_kb(server.proc.pid)
            await each(name, "warm-up", lambda load: load.chunks(corpus[:128], 32, 4, 120))
            out[name]["idle_rss_after_warmup_kb"] = tree_rss_kb(server.proc.pid)
        for round_index in range(plan.rounds):
            order = list(servers) if round_index % 2 == 0 else list(reversed(servers))
            if "single" in scenarios:
                for name in order:
                    await each(
                        name,
                        "single",
                        lambda load: load.sequential(
                            [SINGLE_TEXT], plan.n_single, plan.single_budget_s
                        ),
                    )
            if "bulk" in scenarios:
                for name in order:
                    await each(
                        name, "bulk", lambda load: load.chunks(corpus, 32, 4, plan.bulk_budget_s)
                    )
            if "chatty" in scenarios:
                for name in order:
                    await each(
                        name, "chatty", lambda load: load.closed_loop(corpus, 64, plan.chatty_s)
                    )
        if "sweep" in scenarios:
            for level in SWEEP_LEVELS:
                for name in servers:
                    await each(name, f"sweep-{level}", functools.partial(sweep_step, level))
    finally:
        for name in servers:
            samplers[name].__exit__()
            out[name]["loaded_rss_kb"] = samplers[name].peak_kb
            await loads[name].close()
    for entry in out.values():
        rounds: dict[str, list[dict[str, Any]]] = {}
        for label, result in entry.pop("_steps", []):
            if label.startswith("sweep-"):
                entry.setdefault("sweep", []).append(result)
            elif label != "warm-up":
                rounds.setdefault(label, []).append(result)
        for label, results in rounds.items():
            entry[label] = _single(results) if label == "single" else _merge_rounds(results)
    return out


def _mean_cpu(results: list[dict[str, Any]]) -> dict[str, float]:
    return {key: statistics.fmean(r["cpu"][key] for r in results) for key in results[0]["cpu"]}


def _single(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Every round's latencies pooled: the percentiles of all of them."""
    lat = [ms for result in results for ms in result["latencies_ms"]]
    return {
        "p50_ms": pct(lat, 50),
        "p99_ms": pct(lat, 99),
        "n": len(lat),
        "cpu": _mean_cpu(results),
    }


def _merge_rounds(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One figure per scenario from its rounds: the mean inputs/s (each round's kept), the median
    latency percentiles, the least work done within the time bound."""
    if len(results) == 1:
        return results[0]
    merged = dict(results[0])
    merged["inputs_per_s"] = statistics.fmean(r["inputs_per_s"] for r in results)
    merged["inputs_per_s_rounds"] = [r["inputs_per_s"] for r in results]
    for key in ("p50_ms", "p99_ms"):
        merged[key] = statistics.median(r[key] for r in results)
    for key in ("inputs", "requests"):
        if key in merged:
            merged[key] = min(r[key] for r in results)
    if "complete" in merged:
        merged["complete"] = all(r["complete"] for r in results)
    merged["cpu"] = _mean_cpu(results)
    return merged


async def run_image(model_dir_info: dict[str, Any], logs: Path, plan: Plan) -> dict[str, Any]:
    models_file = Path(model_dir_info["model_dir"]).parent / "models.yaml"
    models_file.write_text(
        "models:\n  - name: bench-dinov3\n"
        f"    source: {model_dir_info['model_dir']}\n    modality: image\n"
    )
    images = [
        {"image": base64.b64encode(p.read_bytes()).decode()}
        for p in sorted(Path(model_dir_info["images_dir"]).glob("*.png"))
    ]
    target = Target("ours-image", "emb-model-provider (image)", ours_argv)
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


async def run_multimodal_server(
    model_dir: str, raw: dict[str, Any], corpus: list[str], logs: Path, plan: Plan
) -> dict[str, Any]:
    """A CLIP/SigLIP directory on our server: images (base64 ``{"image": ...}`` objects) and
    texts, each in requests of 32 from 4 clients, after a warm-up of both."""
    models_file = logs.parent / "models-multimodal.yaml"
    models_file.write_text(
        f"models:\n  - name: bench-multimodal\n    source: {model_dir}\n    modality: multimodal\n"
    )
    images: list[Any] = [
        {"image": base64.b64encode(p.read_bytes()).decode()}
        for p in sorted(Path(raw["images_dir"]).glob("*.png"))
    ]
    texts = corpus[: raw["n_texts"]]
    target = Target("ours-multimodal", "emb-model-provider (multimodal)", ours_argv)
    server = Server(target, "", logs, str(models_file))
    try:
        load = Load(server.base, "bench-multimodal")
        out: dict[str, Any] = {}
        try:
            await load.chunks(images[:64], 32, 2, 120)
            await load.chunks(texts[:64], 32, 2, 120)
            for kind, items in (("images", images), ("texts", texts)):
                with CpuMeter(server.proc.pid) as meter:
                    out[kind] = await load.chunks(items, 32, 4, plan.bulk_budget_s)
                out[kind]["cpu"] = meter.result
        finally:
            await load.close()
        out["loaded_rss_kb"] = tree_rss_kb(server.proc.pid)
        return out
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
                ours_argv,
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
                [
                    uv or "uv",
                    "run",
                    "--no-project",
                    "--with",
                    "py-spy",
                    "py-spy",
                    "record",
                    "--pid",
                    str(server.proc.pid),
                    "--rate",
                    "50",
                    "--nonblocking",
                    "--threads",
                    "--format",
                    "raw",
                    "--output",
                    str(raw),
                    "--duration",
                    "600",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
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
