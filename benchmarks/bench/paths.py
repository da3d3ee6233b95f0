"""Where the benchmark's files are, and the model the standard scenarios serve."""

from __future__ import annotations

from pathlib import Path

BENCH = Path(__file__).resolve().parents[1]
ROOT = BENCH.parent
VENVS = BENCH / ".venvs"
CORPUS = BENCH / "corpus.jsonl"
MODEL_NAME = "all-MiniLM-L6-v2"
