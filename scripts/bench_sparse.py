"""Sparse bulk throughput, one run: a BERT-base-size SPLADE (random weights,
``benchmarks/sparse_models.py``) served by us (cache off), requests of 32 texts with 4 in flight
on /v1/embeddings, against raw ``SparseEncoder.encode(texts, batch_size=32)`` of the same texts
in this process, rounds interleaved (the order reversed every other round).

    PYTHONPATH=. uv run python scripts/bench_sparse.py [--texts 192] [--rounds 2]

Prints texts/s of each side per round and the ratio of the means. Not part of benchmarks/run.py:
a first figure for the sparse task, to be folded into its scenarios.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch
from sentence_transformers import SparseEncoder

from benchmarks.sparse_models import build_splade
from tests.live import live_server, test_settings

_WORDS = ["fox", "snow", "winter", "market", "bread", "river", "mountain", "city", "music"]
_WORDS += ["science", "history", "garden", "ocean", "engine", "language", "school", "doctor"]
_WORDS += ["forest", "storm", "train", "coffee", "letter", "window", "summer"]


def _texts(count: int, words: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(words)) for _ in range(count)]


def _serve(url: str, texts: list[str], per_request: int, in_flight: int) -> float:
    chunks = [texts[i : i + per_request] for i in range(0, len(texts), per_request)]
    with httpx.Client(base_url=url, timeout=600) as client:

        def post(chunk: list[str]) -> None:
            body = {"model": "splade", "input": chunk, "encoding_format": "float"}
            response = client.post("/v1/embeddings", json=body)
            response.raise_for_status()

        post(chunks[0])  # the model loaded and warm at a full batch
        start = time.perf_counter()
        with ThreadPoolExecutor(in_flight) as pool:
            list(pool.map(post, chunks))
        return len(texts) / (time.perf_counter() - start)


def _raw(model: SparseEncoder, texts: list[str]) -> float:
    start = time.perf_counter()
    model.encode(texts, batch_size=32)
    return len(texts) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--texts", type=int, default=192)
    parser.add_argument("--words", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    texts = _texts(args.texts, args.words)
    with tempfile.TemporaryDirectory() as root:
        model_dir = build_splade(Path(root) / "splade-base", "base")
        models = Path(root) / "models.yaml"
        models.write_text(f'{{"models": [{{"name": "splade", "source": "{model_dir}"}}]}}')
        reference = SparseEncoder(str(model_dir), device="cpu")
        reference.encode(texts[:4])
        raw: list[float] = []
        ours: list[float] = []
        with live_server(test_settings(models_file=models, cache="off")) as url:
            for round_index in range(args.rounds):
                steps = ["raw", "ours"] if round_index % 2 == 0 else ["ours", "raw"]
                for step in steps:
                    if step == "raw":
                        raw.append(_raw(reference, texts))
                    else:
                        ours.append(_serve(url, texts, 32, 4))
                sys.stdout.write(
                    f"round {round_index + 1}: raw {raw[-1]:.1f} texts/s, ours {ours[-1]:.1f}\n"
                )
    sys.stdout.write(
        f"bulk (32 texts x 4 in flight) / raw SparseEncoder.encode: "
        f"{statistics.mean(ours) / statistics.mean(raw):.2f}x "
        f"({statistics.mean(ours):.1f} vs {statistics.mean(raw):.1f} texts/s)\n"
    )


if __name__ == "__main__":
    main()
