"""Results to a Markdown table, a plot, and docs/benchmarks.md."""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.paths import ROOT
from bench.scenarios import SWEEP_LEVELS
from bench.system import log


def _fmt(value: float | None, digits: int = 0) -> str:
    if value is None or math.isnan(value):
        return "—"
    return f"{value:,.{digits}f}"


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or math.isnan(a) or math.isnan(b) or b == 0:
        return "—"
    return f"{a / b:.2f}×"


def build_table(results: dict[str, Any]) -> str:
    raw = results.get("raw", {})
    servers: dict[str, Any] = results.get("servers", {})
    names = [n for n in servers if "error" not in servers[n]]
    failed = {n: servers[n]["error"] for n in servers if "error" in servers[n]}

    def get(name: str, *path: str) -> float | None:
        node: Any = servers.get(name, {})
        for key in path:
            if not isinstance(node, dict) or key not in node:
                return None
            node = node[key]
        return float(node) if isinstance(node, (int, float)) else None

    def best_sweep(name: str) -> float | None:
        steps = servers.get(name, {}).get("sweep") or []
        return max((s["inputs_per_s"] for s in steps), default=None)

    mb = 1 / 1024
    bare = raw.get("bare_rss_kb")
    rows: list[tuple[str, float | None, float | None, Callable[[str], float | None], int, bool]] = [
        # label, raw (sorted), raw (chunks of 32), server value, digits, higher is better
        ("bulk: inputs/s (the corpus as requests of 32, 4 clients)", raw.get("sorted_inputs_per_s"), raw.get("chunked_inputs_per_s"),
         lambda n: get(n, "bulk", "inputs_per_s"), 0, True),
        ("bulk: request p50 ms", None, (raw.get("chunk_ms") or {}).get("p50"), lambda n: get(n, "bulk", "p50_ms"), 0, False),
        ("bulk: request p99 ms", None, (raw.get("chunk_ms") or {}).get("p99"), lambda n: get(n, "bulk", "p99_ms"), 0, False),
        ("chatty: inputs/s (64 clients, 1 input each)", raw.get("sorted_inputs_per_s"), raw.get("chunked_inputs_per_s"),
         lambda n: get(n, "chatty", "inputs_per_s"), 0, True),
        ("chatty: p50 ms", None, None, lambda n: get(n, "chatty", "p50_ms"), 0, False),
        ("chatty: p99 ms", None, None, lambda n: get(n, "chatty", "p99_ms"), 0, False),
        ("sweep: best inputs/s (1–128 clients)", raw.get("sorted_inputs_per_s"), raw.get("chunked_inputs_per_s"), best_sweep, 0, True),
        ("single small request p50 ms", (raw.get("single_ms") or {}).get("p50"), None, lambda n: get(n, "single", "p50_ms"), 1, False),
        ("single small request p99 ms", (raw.get("single_ms") or {}).get("p99"), None, lambda n: get(n, "single", "p99_ms"), 1, False),
        ("idle RSS MB (raw: bare process with the model)", bare * mb if bare else None, None,
         lambda n: (get(n, "idle_rss_after_warmup_kb") or 0) * mb or None, 0, False),
        ("loaded RSS MB (peak)", bare * mb if bare else None, None, lambda n: (get(n, "loaded_rss_kb") or 0) * mb or None, 0, False),
        ("start-up to ready, s", None, None, lambda n: get(n, "startup_s"), 1, False),
        ("accuracy: least cosine to float32", None, None, lambda n: get(n, "accuracy", "min_cosine"), 5, True),
        ("accuracy: mean cosine to float32", None, None, lambda n: get(n, "accuracy", "mean_cosine"), 6, True),
        ("accuracy: top-10 neighbours agreeing (100 queries)", None, None, lambda n: get(n, "accuracy", "top10_agreement"), 3, True),
        ("bulk: inputs done within the time bound", raw.get("n_inputs"), raw.get("chunked_inputs"), lambda n: get(n, "bulk", "inputs"), 0, True),
        ("bulk: server CPU cores busy", None, None, lambda n: get(n, "bulk", "cpu", "server_cores"), 2, False),
        ("chatty: server CPU cores busy", None, None, lambda n: get(n, "chatty", "cpu", "server_cores"), 2, False),
        ("chatty: client (this process) cores", None, None, lambda n: get(n, "chatty", "cpu", "client_cores"), 2, False),
        ("bulk: cores used by other processes (noise)", (raw.get("cpu") or {}).get("foreign_cores"), None,
         lambda n: get(n, "bulk", "cpu", "foreign_cores"), 2, False),
        ("chatty: cores used by other processes (noise)", None, None, lambda n: get(n, "chatty", "cpu", "foreign_cores"), 2, False),
    ]  # fmt: skip
    head = ["figure", "raw", "raw, chunks of 32", *[servers[n]["label"] for n in names]]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for label, raw_v, raw32, fn, digits, _ in rows:
        lines.append(
            "| "
            + " | ".join(
                [
                    label,
                    _fmt(raw_v, digits),
                    _fmt(raw32, digits),
                    *[_fmt(fn(n), digits) for n in names],
                ]
            )
            + " |"
        )
    for n, error in failed.items():
        lines.append(f"| {servers[n]['label']} | not measured: {error} |" + " |" * (len(head) - 2))

    ours = [n for n in names if n.startswith("ours")]
    peers = [n for n in names if not n.startswith("ours")]
    rhead = ["figure"]
    Row = tuple[str, float | None, float | None, Callable[[str], float | None], int, bool]

    def over_raw(name: str, chunked: bool) -> Callable[[Row], str]:
        return lambda row: _ratio(row[3](name), row[2] if chunked else row[1])

    def over(name: str, other: str) -> Callable[[Row], str]:
        return lambda row: _ratio(row[3](name), row[3](other))

    cols: list[tuple[str, Callable[[Row], str]]] = []
    for n in names:
        cols.append((f"{n} ÷ raw", over_raw(n, chunked=False)))
        cols.append((f"{n} ÷ raw32", over_raw(n, chunked=True)))
    for o in ours:
        for p in [*peers, *[x for x in ours if x != o]]:
            cols.append((f"{o} ÷ {p}", over(o, p)))
    rhead += [c[0] for c in cols]
    rlines = ["| " + " | ".join(rhead) + " |", "|" + " --- |" * len(rhead)]
    for row in rows:
        rlines.append("| " + " | ".join([row[0], *[c[1](row) for c in cols]]) + " |")
    notes = [
        "",
        "Ratios are value ÷ value: above 1 is better for inputs/s, worse for ms and MB. "
        "`raw` = `SentenceTransformer.encode(corpus, batch_size=32)` in one call (sorted by length); "
        "`raw32` = one `encode` per 32-input chunk in corpus order; for RSS, `raw` is a bare Python "
        "process holding the model after one encode.",
    ]
    image = results.get("image")
    if image and "error" not in image:
        notes += [
            "",
            '| images (DINOv3 ViT-S/16 random weights, 256 px PNG as base64 `{"image": ...}`) | raw | ours | ours ÷ raw |',
            "| --- | --- | --- | --- |",
            f"| images/s, requests of 32, 4 clients (raw: processor + forward, batch 32, PIL decoded) | "
            f"{_fmt(image['raw']['images_per_s'], 1)} | {_fmt(image['server']['inputs_per_s'], 1)} | "
            f"{_ratio(image['server']['inputs_per_s'], image['raw']['images_per_s'])} |",
            f"| images/s, raw including PNG decode | {_fmt(image['raw']['images_per_s_with_decode'], 1)} | "
            f"{_fmt(image['server']['inputs_per_s'], 1)} | "
            f"{_ratio(image['server']['inputs_per_s'], image['raw']['images_per_s_with_decode'])} |",
        ]
    elif image:
        notes += ["", f"Images: not measured: {image['error']}"]
    notes += multimodal_table(results.get("multimodal"))
    repeat = results.get("repeat")
    if repeat and "error" not in repeat:
        notes += repeat_table(repeat)
    elif repeat:
        notes += ["", f"Repeated queries: not measured: {repeat['error']}"]
    return "\n".join(lines) + "\n\n" + "\n".join(rlines) + "\n" + "\n".join(notes) + "\n"


def repeat_table(repeat: dict[str, Any]) -> list[str]:
    on, off = repeat["cache-on"], repeat["cache-off"]
    hit_rate = on.get("hit_rate", float("nan")) * 100
    return [
        "",
        f"| repeated queries ({repeat['share']:.0%} of them among {repeat['hot_set']} texts, "
        f"{repeat['clients']} clients, 1 text per request, after one pass over those texts) "
        "| cache off | cache on | on ÷ off |",
        "| --- | --- | --- | --- |",
        *(
            f"| {label} | {_fmt(off[key], digits)} | {_fmt(on[key], digits)} | "
            f"{_ratio(on[key], off[key])} |"
            for label, key, digits in (
                ("inputs/s", "inputs_per_s", 0),
                ("p50 ms", "p50_ms", 1),
                ("p99 ms", "p99_ms", 1),
            )
        ),
        f"| inputs answered from the cache (measured runs) | — | {_fmt(hit_rate, 1)} % | |",
    ]


def multimodal_table(multimodal: dict[str, Any] | None) -> list[str]:
    if not multimodal:
        return []
    if "error" in multimodal:
        return ["", f"Multimodal: not measured: {multimodal['error']}"]
    raw, server = multimodal["raw"], multimodal["server"]
    images, texts = server["images"]["inputs_per_s"], server["texts"]["inputs_per_s"]
    rows = [
        (
            "images/s (raw: processor + get_image_features, PIL decoded)",
            raw["images_per_s"],
            images,
        ),
        ("images/s, raw including PNG decode", raw["images_per_s_with_decode"], images),
        ("texts/s (raw: processor + get_text_features, corpus order)", raw["texts_per_s"], texts),
        ("texts/s, raw sorted by length", raw["texts_sorted_per_s"], texts),
    ]
    return [
        "",
        "| multimodal (CLIP ViT-B/32-sized, random weights; requests of 32, 4 clients) "
        "| raw | ours | ours ÷ raw |",
        "| --- | --- | --- | --- |",
        *(f"| {label} | {_fmt(a, 1)} | {_fmt(b, 1)} | {_ratio(b, a)} |" for label, a, b in rows),
    ]


def plot(results: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no plot (uv sync --dev)")
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for res in results.get("servers", {}).values():
        steps = res.get("sweep") or []
        if not steps:
            continue
        xs = [s["concurrency"] for s in steps]
        ax1.plot(xs, [s["inputs_per_s"] for s in steps], marker="o", label=res["label"])
        ax2.plot(xs, [s["p99_ms"] for s in steps], marker="o", label=res["label"])
    raw = results.get("raw", {})
    if raw.get("sorted_inputs_per_s"):
        ax1.axhline(
            raw["sorted_inputs_per_s"], ls="--", c="grey", label="raw encode (whole corpus)"
        )
    if raw.get("chunked_inputs_per_s"):
        ax1.axhline(
            raw["chunked_inputs_per_s"], ls=":", c="grey", label="raw encode (chunks of 32)"
        )
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(SWEEP_LEVELS, [str(x) for x in SWEEP_LEVELS])
        ax.set_xlabel("concurrent clients (1 input per request)")
        ax.grid(alpha=0.3)
    ax1.set_ylabel("inputs/s")
    ax2.set_ylabel("p99 latency, ms")
    ax2.set_yscale("log")
    ax1.legend(fontsize=7)
    fig.suptitle(f"all-MiniLM-L6-v2, {results['machine']['nproc']} CPU cores, {results['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def write_docs(results: dict[str, Any], table: str, png: Path | None) -> None:
    docs = ROOT / "docs"
    docs.mkdir(exist_ok=True)
    if png is not None and png.exists():
        shutil.copyfile(png, docs / "benchmarks.png")
    m, v = results["machine"], results["versions"]
    block = [
        "<!-- results:start (written by benchmarks/run.py --write-docs) -->",
        f"Run {results['date']} with `{results['command']}` on {m['nproc']} cores ({m['cpu']}), "
        f"{m['mem_gib']} GiB, Python {m['python']}; torch {v['torch']}, transformers {v['transformers']}, "
        f"sentence-transformers {v['sentence-transformers']}, tokenizers {v['tokenizers']}, "
        f"emb-model-provider {v['emb-model-provider']}"
        + "".join(
            f", {s['label']}"
            for s in results["servers"].values()
            if s.get("version") and not s["label"].startswith("emb")
        )
        + ".",
        "",
        "![throughput and p99 latency against concurrency](benchmarks.png)"
        if (docs / "benchmarks.png").exists()
        else "",
        "",
        table,
        "<!-- results:end -->",
    ]
    path = docs / "benchmarks.md"
    text = (
        path.read_text()
        if path.exists()
        else "# Benchmarks\n\n<!-- results:start -->\n<!-- results:end -->\n"
    )
    start, end = text.find("<!-- results:start"), text.find("<!-- results:end -->")
    if start < 0 or end < 0:
        text += "\n<!-- results:start -->\n<!-- results:end -->\n"
        start, end = text.find("<!-- results:start"), text.find("<!-- results:end -->")
    path.write_text(text[:start] + "\n".join(block) + text[end + len("<!-- results:end -->") :])
