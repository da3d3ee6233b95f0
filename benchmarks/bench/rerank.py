"""The rerank scenarios: a MiniLM-L6-sized cross-encoder (ms-marco-MiniLM-L6-v2's shape, random
weights) served by us, cache off, against raw ``CrossEncoder.predict(pairs, batch_size=32)`` of
the same pairs, in one run.

- ``rerank-32x4``: requests of one query and 32 documents, 4 in flight (target >= 0.95x raw);
- ``rerank-8x32``: 32 clients, each sending one query and 8 documents (target >= 0.85x raw).

Each round measures raw (its own process: ``raw_reference.py rerank``, both pair sets) and the
server (both scenarios), the order reversed every other round; figures are the rounds' means.
"""

from __future__ import annotations

import asyncio
import json
import random
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

RERANK_MODEL = "ms-marco-MiniLM-L6-v2-random"
#: Words per document: an MS MARCO passage's length.
_PASSAGE_WORDS = 60
#: (name, documents per request, requests in flight, target ratio to raw).
SCENARIOS: tuple[tuple[str, int, int, float], ...] = (
    ("rerank-32x4", 32, 4, 0.95),
    ("rerank-8x32", 8, 32, 0.85),
)


class RerankLoad(Load):
    """The benchmark's keep-alive client, posting to /v1/rerank."""

    def __init__(self, base: str, model: str) -> None:
        super().__init__(base, model)
        host_port = base.removeprefix("http://")
        self._head = (
            f"POST /v1/rerank HTTP/1.1\r\nHost: {host_port}\r\n"
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n"
        )

    async def rank(self, query: str, documents: list[str]) -> float:
        start = time.perf_counter()
        body = {"model": self.model, "query": query, "documents": documents}
        status, data = await self._send(json.dumps(body).encode())
        if status != 200:
            raise RuntimeError(f"{status}: {data[:200]!r}")
        if len(json.loads(data)["results"]) != len(documents):
            raise RuntimeError("a result per document was expected")
        return (time.perf_counter() - start) * 1000


def requests_of(
    corpus: list[str], documents: int, pairs: int, seed: int
) -> list[tuple[str, list[str]]]:
    """``pairs // documents`` requests: a query (a corpus text's first sentence, search-query
    length) and ``documents`` corpus texts cut to MS MARCO's passage length (about 60 words)."""
    rng = random.Random(seed)
    out = []
    for _ in range(pairs // documents):
        query = rng.choice(corpus).split(".")[0]
        passages = [
            " ".join(text.split()[:_PASSAGE_WORDS]) for text in rng.sample(corpus, documents)
        ]
        out.append((query, passages))
    return out


async def _serve(
    base: str, requests: list[tuple[str, list[str]]], in_flight: int
) -> dict[str, Any]:
    loads = [RerankLoad(base, RERANK_MODEL) for _ in range(in_flight)]
    queue = list(reversed(requests))
    latencies: list[float] = []

    async def worker(load: RerankLoad) -> None:
        while queue:
            query, documents = queue.pop()
            latencies.append(await load.rank(query, documents))

    try:
        # Warm: a connection per load, and the model through one request.
        await asyncio.gather(*(load.rank(requests[0][0], requests[0][1][:1]) for load in loads))
        await loads[0].rank(*requests[0])
        start = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(worker(load) for load in loads)), timeout=600)
        elapsed = time.perf_counter() - start
    finally:
        for load in loads:
            await load.close()
    pairs = sum(len(documents) for _, documents in requests)
    return {
        "pairs_per_s": pairs / elapsed,
        "p50_ms": pct(latencies, 50),
        "p99_ms": pct(latencies, 99),
    }


def _raw(model_dir: str, pair_sets: dict[str, list[tuple[str, list[str]]]], run_dir: Path) -> Any:
    pairs_file = run_dir / "rerank-pairs.json"
    pairs_file.write_text(
        json.dumps(
            {
                name: [[query, document] for query, documents in requests for document in documents]
                for name, requests in pair_sets.items()
            }
        )
    )
    argv = [
        sys.executable,
        str(BENCH / "raw_reference.py"),
        "rerank",
        "--model-dir",
        model_dir,
        "--pairs",
        str(pairs_file),
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=900, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_rerank(
    corpus: list[str], run_dir: Path, logs: Path, *, rounds: int, quick: bool
) -> dict[str, Any]:
    from rerankers import build_cross_encoder

    model_dir = str(build_cross_encoder("bert", run_dir / "cross-encoder", "minilm"))
    models_file = run_dir / "rerank-models.yaml"
    models_file.write_text(json.dumps({"models": [{"name": RERANK_MODEL, "source": model_dir}]}))
    pairs = 384 if quick else 768
    pair_sets = {
        name: requests_of(corpus, documents, pairs, seed=index)
        for index, (name, documents, _, _) in enumerate(SCENARIOS)
    }
    target = make_targets(["ours"], 0)[0]
    target.env.update({"EMB_PROVIDER_CACHE": "off", "EMB_PROVIDER_DEFAULT_MODEL": RERANK_MODEL})
    raw_runs: list[dict[str, float]] = []
    ours_runs: list[dict[str, dict[str, Any]]] = []
    server = Server(target, model_dir, logs, str(models_file))
    try:
        for round_index in range(rounds):
            steps = ["raw", "ours"] if round_index % 2 == 0 else ["ours", "raw"]
            for step in steps:
                if step == "raw":
                    raw_runs.append(_raw(model_dir, pair_sets, run_dir))
                    log(f"rerank round {round_index + 1}: raw {raw_runs[-1]}")
                else:
                    measured = {
                        name: asyncio.run(_serve(server.base, pair_sets[name], in_flight))
                        for name, _, in_flight, _ in SCENARIOS
                    }
                    ours_runs.append(measured)
                    log(f"rerank round {round_index + 1}: ours {measured}")
    finally:
        server.stop()
    out: dict[str, Any] = {"model": "BERT 6 layers, hidden 384 (MiniLM-L6)", "rounds": rounds}
    for name, documents, in_flight, target_ratio in SCENARIOS:
        raw = statistics.mean(run[name] for run in raw_runs)
        ours = statistics.mean(run[name]["pairs_per_s"] for run in ours_runs)
        out[name] = {
            "documents": documents,
            "in_flight": in_flight,
            "raw_pairs_per_s": raw,
            "ours_pairs_per_s": ours,
            "ratio": ours / raw,
            "target": target_ratio,
            "p50_ms": statistics.median(run[name]["p50_ms"] for run in ours_runs),
            "p99_ms": statistics.median(run[name]["p99_ms"] for run in ours_runs),
        }
    return out


def rerank_table(result: dict[str, Any]) -> str:
    lines = [
        "| scenario | raw CrossEncoder.predict pairs/s | ours pairs/s | ratio (target) "
        "| p50 ms | p99 ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, documents, in_flight, _ in SCENARIOS:
        row = result[name]
        lines.append(
            f"| 1 query x {documents} documents, {in_flight} in flight "
            f"| {row['raw_pairs_per_s']:.0f} | {row['ours_pairs_per_s']:.0f} "
            f"| {row['ratio']:.2f}x (>= {row['target']:.2f}x) "
            f"| {row['p50_ms']:.0f} | {row['p99_ms']:.0f} |"
        )
    return "\n".join(lines) + "\n"
