"""Sum a py-spy ``--format raw --threads`` profile into where the server's CPU time goes.

    uv run python benchmarks/profile_summary.py \\
        benchmarks/results/<run>/profile-bulk.txt [--rate 50]

Each sample is put in the first bucket whose marker appears in its stack (leaf-most frame
first), and counted per thread. py-spy without ``--idle`` keeps only samples of running threads,
so the totals are CPU seconds, roughly.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

#: (bucket, markers): a stack goes to the first bucket with a marker in any of its frames.
BUCKETS: list[tuple[str, tuple[str, ...]]] = [
    (
        "model forward (torch)",
        ("modeling_", "bert_unpadded", "torch/nn/", "_call_impl", "_wrapped_call_impl"),
    ),
    (
        "pad + pool + to numpy (encoder, outside the model)",
        ("encoders/text.py", "encoders/image.py"),
    ),
    ("tokenise", ("encode_batch", "tokenizers", "prepare (emb_model_provider")),
    ("image decode", ("PIL/", "inputs/images.py")),
    (
        "serialise response (base64/JSON)",
        (
            "b64encode",
            "orjson",
            "jsonable_encoder",
            "serialize_response",
            "tobytes",
            "render (",
            "protocol.py",
        ),
    ),
    (
        "parse + validate request",
        ("pydantic", "model_validate", "json/decoder", "api/embeddings.py"),
    ),
    ("service (checks, dimensions, normalise)", ("services/",)),
    ("batcher bookkeeping", ("scheduler.py",)),
    (
        "HTTP (uvicorn/starlette/httptools)",
        ("uvicorn/", "starlette/", "httptools", "h11", "fastapi/"),
    ),
    ("asyncio event loop", ("asyncio/", "uvloop")),
    ("threading / waiting", ("threading.py", "concurrent/futures")),
]


def summarise(path: Path, rate: float) -> str:
    buckets: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        frames = stack.split(";")
        thread = next((f for f in frames if f.startswith("thread ")), "thread ?")
        name = re.sub(r"\(0x[0-9a-fA-F]+\)\s*", "", thread).strip()
        threads[name] += count
        total += count
        leaf_first = frames[::-1]
        bucket = next(
            (b for b, markers in BUCKETS if any(m in f for f in leaf_first for m in markers)),
            "other",
        )
        buckets[bucket] += count
    if not total:
        return f"{path}: no samples\n"
    out = [
        f"{path.name}: {total} samples = {total / rate:.1f} CPU-s at {rate:g} Hz",
        "",
        "| where | share | CPU-s |",
        "| --- | --- | --- |",
    ]
    out += [f"| {b} | {c / total:.0%} | {c / rate:.1f} |" for b, c in buckets.most_common()]
    out += ["", "| thread | share | CPU-s |", "| --- | --- | --- |"]
    out += [f"| {t} | {c / total:.0%} | {c / rate:.1f} |" for t, c in threads.most_common(8)]
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--rate", type=float, default=50.0)
    args = parser.parse_args()
    for path in args.files:
        sys.stdout.write(summarise(path, args.rate) + "\n")


if __name__ == "__main__":
    main()
