"""The sparse scenarios: a SPLADE model of BERT-base's size (12 layers, hidden 768, the
30522-term MLM head; random weights, ``sparse_models.py``) served by us, cache off, on
/v1/embeddings (``{"indices", "values"}``, JSON floats), against raw
``SparseEncoder.encode(texts, batch_size=32)`` of the same texts, in one run.

- ``sparse-bulk``: requests of 32 texts, 4 in flight (target >= 0.95x raw);
- ``sparse-64``: 64 clients, each sending one text per request (target >= 0.85x raw).

Each round measures raw (its own process: ``raw_reference.py sparse``) and the server (both
scenarios), the order reversed every other round; figures are the rounds' means.
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.client import Load, pct
from bench.paths import BENCH
from bench.system import log
from bench.targets import Server, make_targets

SPARSE_MODEL = "splade-base-random"
#: Words per text: an MS MARCO passage's length, what SPLADE models index.
_PASSAGE_WORDS = 60
#: Texts per raw ``encode`` batch and per bulk request.
_BATCH = 32
#: (name, texts per request, requests in flight, target ratio to raw).
SCENARIOS: tuple[tuple[str, int, int, float], ...] = (
    ("sparse-bulk", _BATCH, 4, 0.95),
    ("sparse-64", 1, 64, 0.85),
)


class SparseLoad(Load):
    """The benchmark's keep-alive client, asking /v1/embeddings for sparse vectors."""

    async def sparse(self, texts: list[str]) -> float:
        start = time.perf_counter()
        body = {"model": self.model, "input": texts, "encoding_format": "float"}
        status, data = await self._send(json.dumps(body).encode())
        if status != 200:
            raise RuntimeError(f"{status}: {data[:200]!r}")
        items = json.loads(data)["data"]
        if len(items) != len(texts) or set(items[0]["embedding"]) != {"indices", "values"}:
            raise RuntimeError("a sparse vector per text was expected")
        return (time.perf_counter() - start) * 1000


def texts_of(corpus: list[str], count: int, seed: int = 0) -> list[str]:
    """``count`` corpus texts cut to a passage's length (about 60 words)."""
    rng = random.Random(seed)
    return [" ".join(text.split()[:_PASSAGE_WORDS]) for text in rng.sample(corpus, count)]


async def _serve(base: str, texts: list[str], per_request: int, in_flight: int) -> dict[str, Any]:
    loads = [SparseLoad(base, SPARSE_MODEL) for _ in range(in_flight)]
    requests = [texts[start : start + per_request] for start in range(0, len(texts), per_request)]
    queue = list(reversed(requests))
    latencies: list[float] = []

    async def worker(load: SparseLoad) -> None:
        while queue:
            latencies.append(await load.sparse(queue.pop()))

    try:
        # Warm: a connection per load, and the model through one full request.
        await asyncio.gather(*(load.sparse(texts[:1]) for load in loads))
        await loads[0].sparse(requests[0])
        start = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(worker(load) for load in loads)), timeout=900)
        elapsed = time.perf_counter() - start
    finally:
        for load in loads:
            await load.close()
    return {
        "texts_per_s": len(texts) / elapsed,
        "p50_ms": pct(latencies, 50),
        "p99_ms": pct(latencies, 99),
    }


def _raw(model_dir: str, texts_file: Path) -> float:
    argv = [sys.executable, str(BENCH / "raw_reference.py"), "sparse"]
    argv += ["--model-dir", model_dir, "--texts", str(texts_file), "--batch-size", str(_BATCH)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=900, check=True)
    return float(json.loads(done.stdout.strip().splitlines()[-1])["texts_per_s"])


def run_sparse(
    corpus: list[str], run_dir: Path, logs: Path, *, rounds: int, quick: bool
) -> dict[str, Any]:
    from sparse_models import build_splade

    model_dir = str(build_splade(run_dir / "splade-base", "base"))
    models_file = run_dir / "sparse-models.yaml"
    models_file.write_text(json.dumps({"models": [{"name": SPARSE_MODEL, "source": model_dir}]}))
    texts = texts_of(corpus, 128 if quick else 384)
    texts_file = run_dir / "sparse-texts.json"
    texts_file.write_text(json.dumps(texts))
    target = make_targets(["ours"], 0)[0]
    target.env.update({"EMB_PROVIDER_CACHE": "off", "EMB_PROVIDER_DEFAULT_MODEL": SPARSE_MODEL})
    raw_runs: list[float] = []
    ours_runs: list[dict[str, dict[str, Any]]] = []
    server = Server(target, model_dir, logs, str(models_file))
    try:
        for round_index in range(rounds):
            steps = ["raw", "ours"] if round_index % 2 == 0 else ["ours", "raw"]
            for step in steps:
                if step == "raw":
                    raw_runs.append(_raw(model_dir, texts_file))
                    log(f"sparse round {round_index + 1}: raw {raw_runs[-1]:.2f} texts/s")
                else:
                    measured = {
                        name: asyncio.run(_serve(server.base, texts, per_request, in_flight))
                        for name, per_request, in_flight, _ in SCENARIOS
                    }
                    ours_runs.append(measured)
                    log(f"sparse round {round_index + 1}: ours {measured}")
    finally:
        server.stop()
        shutil.rmtree(model_dir, ignore_errors=True)  # 440 MB of random weights, rebuilt per run
    raw = statistics.mean(raw_runs)
    out: dict[str, Any] = {
        "model": "SPLADE, BERT-base (12 layers, hidden 768, 30522 terms), random weights",
        "rounds": rounds,
        "texts": len(texts),
        "raw_texts_per_s": raw,
        "raw_rounds": raw_runs,
    }
    for name, per_request, in_flight, target_ratio in SCENARIOS:
        ours = statistics.mean(run[name]["texts_per_s"] for run in ours_runs)
        out[name] = {
            "per_request": per_request,
            "in_flight": in_flight,
            "ours_texts_per_s": ours,
            "ours_rounds": [run[name]["texts_per_s"] for run in ours_runs],
            "ratio": ours / raw,
            "target": target_ratio,
            "p50_ms": statistics.median(run[name]["p50_ms"] for run in ours_runs),
            "p99_ms": statistics.median(run[name]["p99_ms"] for run in ours_runs),
        }
    return out


def sparse_table(result: dict[str, Any]) -> str:
    lines = [
        "| scenario | raw SparseEncoder.encode inputs/s | ours inputs/s | ratio (target) "
        "| p50 ms | p99 ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, per_request, in_flight, _ in SCENARIOS:
        row = result[name]
        shape = (
            f"bulk: {per_request} texts x {in_flight} in flight"
            if per_request > 1
            else f"{in_flight} clients, 1 text each"
        )
        lines.append(
            f"| {shape} | {result['raw_texts_per_s']:.1f} | {row['ours_texts_per_s']:.1f} "
            f"| {row['ratio']:.2f}x (>= {row['target']:.2f}x) "
            f"| {row['p50_ms']:.0f} | {row['p99_ms']:.0f} |"
        )
    return "\n".join(lines) + "\n"
