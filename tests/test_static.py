"""The architecture and the code checks, as part of the one test command CI runs."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _run(*command: str) -> subprocess.CompletedProcess[str]:
    tool = BIN / command[0]
    if not tool.exists():
        found = shutil.which(command[0])
        if found is None:
            pytest.fail(f"{command[0]} is not installed in the test environment")
        tool = Path(found)
    return subprocess.run(
        [str(tool), *command[1:]],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_import_layers_hold() -> None:
    """Routes know nothing of torch; services and the batcher nothing of HTTP or torch; ..."""
    result = _run("lint-imports")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_is_clean() -> None:
    result = _run("ruff", "check", "emb_model_provider", "tests")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_is_clean() -> None:
    result = _run("mypy")
    assert result.returncode == 0, result.stdout + result.stderr
