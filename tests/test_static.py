"""The architecture and the code checks, as part of the one test command CI runs."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _run(*command: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    tool = BIN / command[0]
    if not tool.exists():
        found = shutil.which(command[0])
        if found is None:
            pytest.fail(f"{command[0]} is not installed in the test environment")
        tool = Path(found)
    return subprocess.run(
        [str(tool), *command[1:]],
        check=False,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_import_layers_hold() -> None:
    """Routes know nothing of torch; services and the batcher nothing of HTTP or torch; ..."""
    result = _run("lint-imports")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_is_clean() -> None:
    result = _run("ruff", "check", "emb_model_provider", "tests", "benchmarks")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_is_clean() -> None:
    result = _run("mypy")
    assert result.returncode == 0, result.stdout + result.stderr


def test_benchmarks_are_typed_like_the_package() -> None:
    """The benchmark scripts and their ``bench`` package, mypy --strict as the package is
    (run from ``benchmarks/``, where the scripts import ``bench``)."""
    scripts = sorted(path.name for path in (ROOT / "benchmarks").glob("*.py"))
    result = _run(
        "mypy",
        "--strict",
        "--config-file",
        str(ROOT / "pyproject.toml"),
        "bench",
        *scripts,
        cwd=ROOT / "benchmarks",
    )
    assert result.returncode == 0, result.stdout + result.stderr
