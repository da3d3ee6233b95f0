"""int8 / uint8 ranges per loaded model, and the quantised forms of a request's vectors.

The ranges are fixed per model (``core/quantization.py``): the model embeds its calibration set
once, on the first int8 or uint8 request, and each (size, normalisation) a request asks for gets
the min and max of those vectors cut and normalised the same way. The built-in set ships with the
package; a models-file entry may name its own (``calibration_texts``).
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np

from emb_model_provider.core.quantization import (
    CALIBRATION_FILE,
    Ranges,
    calibration_texts,
    ranges_of,
)
from emb_model_provider.core.vectors import Vectors
from emb_model_provider.registry import ModelSpec
from emb_model_provider.services.models import LoadedModel

#: Embeds calibration texts with a loaded model: raw vectors, full size.
Embedder = Callable[[LoadedModel, list[str]], Awaitable[Vectors]]


def ranges_source(spec: ModelSpec) -> str:
    """Where ``spec``'s int8/uint8 ranges come from, for /v1/models (image models have no
    calibration set: binary and ubinary only)."""
    if spec.modality == "image":
        return "none: image models take binary and ubinary only"
    if spec.calibration_texts is not None:
        return f"calibration set from the models file ({Path(spec.calibration_texts).name})"
    return f"built-in calibration set ({CALIBRATION_FILE}, {len(_builtin())} texts)"


_BUILTIN: list[str] = []


def _builtin() -> list[str]:
    if not _BUILTIN:
        _BUILTIN.extend(calibration_texts())
    return _BUILTIN


def calibration_texts_of(spec: ModelSpec) -> list[str]:
    """The texts whose vectors fix ``spec``'s int8/uint8 ranges."""
    if spec.calibration_texts is None:
        return _builtin()
    text = Path(spec.calibration_texts).read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


class Calibrations:
    """The calibration vectors of each loaded model (dropped with it), computed once however
    many requests ask at the same time, and the ranges derived from them."""

    def __init__(self, embed: Embedder) -> None:
        self._embed = embed
        self._raw: weakref.WeakKeyDictionary[LoadedModel, asyncio.Task[Vectors]] = (
            weakref.WeakKeyDictionary()
        )
        self._ranges: weakref.WeakKeyDictionary[LoadedModel, dict[tuple[int, bool], Ranges]] = (
            weakref.WeakKeyDictionary()
        )

    async def ranges(self, model: LoadedModel, dimensions: int, *, normalize: bool) -> Ranges:
        known = self._ranges.setdefault(model, {})
        found = known.get((dimensions, normalize))
        if found is not None:
            return found
        task = self._raw.get(model)
        if task is None or (task.done() and task.exception() is not None):
            task = asyncio.create_task(self._calibrate(model))
            self._raw[model] = task
        # shield: a client that goes away must not cancel what others wait for.
        raw = await asyncio.shield(task)
        cut = raw[:, :dimensions]
        if normalize:
            cut = cut / np.maximum(np.linalg.norm(cut, axis=1, keepdims=True), 1e-12)
        found = ranges_of(cut.astype(np.float32, copy=False))
        known[(dimensions, normalize)] = found
        return found

    async def _calibrate(self, model: LoadedModel) -> Vectors:
        texts = await asyncio.to_thread(calibration_texts_of, model.spec)
        return await self._embed(model, texts)
