"""Read uv.lock (stdlib only, run inside the image build) for the CPU build of the image.

PyPI's Linux torch wheel is the CUDA build: torch pulls ~4 GB of nvidia-*/cuda-*/triton wheels
through its `sys_platform == 'linux'` dependencies. The CPU image installs everything else exactly
as uv.lock pins it and takes torch and torchvision, same versions, from the PyPI CPU index.

    python3 lock_packages.py uv.lock cuda-only   # names only torch's CUDA dependencies need
    python3 lock_packages.py uv.lock version torch
"""

from __future__ import annotations

import sys
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

#: What the CPU image takes from the CPU index instead of the lock.
TORCH_PACKAGES = ("torch", "torchvision")


def load(lock: Path) -> dict[str, dict[str, Any]]:
    packages: list[dict[str, Any]] = tomllib.loads(lock.read_text(encoding="utf-8"))["package"]
    # A name may appear twice (one version per Python range, e.g. numpy); keep both entries'
    # dependencies, the closure below is over names.
    merged: dict[str, dict[str, Any]] = {}
    for package in packages:
        entry = merged.setdefault(package["name"], {"deps": [], "extras": {}, "package": package})
        entry["deps"].extend(package.get("dependencies", []))
        for extra, deps in package.get("optional-dependencies", {}).items():
            entry["extras"].setdefault(extra, []).extend(deps)
    return merged


def _edges(lock: dict[str, dict[str, Any]], dep: dict[str, Any]) -> Iterable[dict[str, Any]]:
    """A dependency, and the packages its requested extras add."""
    yield dep
    for extra in dep.get("extra", []):
        yield from lock.get(dep["name"], {}).get("extras", {}).get(extra, [])


def closure(
    lock: dict[str, dict[str, Any]], roots: Iterable[dict[str, Any]], skip: Iterable[str] = ()
) -> set[str]:
    seen: set[str] = set()
    stack = [edge for dep in roots for edge in _edges(lock, dep)]
    skipped = set(skip)
    while stack:
        dep = stack.pop()
        name = dep["name"]
        if name in seen or name in skipped:
            continue
        seen.add(name)
        for child in lock.get(name, {}).get("deps", []):
            stack.extend(_edges(lock, child))
    return seen


def project(lock: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The project's own entry: the one whose source is the working tree."""
    return next(
        entry
        for entry in lock.values()
        if "editable" in entry["package"]["source"] or "virtual" in entry["package"]["source"]
    )


def cuda_only(lock: dict[str, dict[str, Any]]) -> set[str]:
    """torch's Linux-only dependencies and all they pull, less what anything else needs."""
    linux = [
        dep for dep in lock["torch"]["deps"] if "sys_platform == 'linux'" in dep.get("marker", "")
    ]
    pulled = closure(lock, linux)
    needed_elsewhere = closure(lock, project(lock)["deps"], skip=TORCH_PACKAGES)
    return pulled - needed_elsewhere


def main(argv: list[str]) -> int:
    lock = load(Path(argv[1]))
    if argv[2] == "cuda-only":
        sys.stdout.write("\n".join(sorted(cuda_only(lock))) + "\n")
        return 0
    if argv[2] == "version":
        sys.stdout.write(lock[argv[3]]["package"]["version"] + "\n")
        return 0
    sys.stderr.write(__doc__ or "")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
