"""Quantised vectors, as sentence-transformers' ``quantize_embeddings``
(``sentence_transformers/util/quantization.py``) computes them, in plain numpy.

- binary / ubinary: the signs of the (normalised, ``dimensions``-cut) vector packed 8 per byte,
  big-endian bit order (``np.packbits``), as int8 (byte - 128) or uint8; bit for bit the library's.
- int8 / uint8: 256 buckets per dimension between fixed ``ranges`` (min and max per dimension),
  clipped. The ranges come from a calibration set, never from the batch being quantised, so a
  text gets the same integers alone and in any batch.

The set (``data/calibration_texts.txt``) is typical input, since ranges should cover what users
send; the precision gate of ``encoders/fast.py`` has its own (``encoders/calibration.json``) of
hard cases (512-token texts, URLs, code), which would stretch these ranges for nothing.
"""

from __future__ import annotations

from importlib import resources

import numpy as np
import numpy.typing as npt

from emb_model_provider.core.kinds import Quantization
from emb_model_provider.core.vectors import Vectors

#: Integer vectors: int8 for int8 and binary, uint8 for uint8 and ubinary.
IntVectors = npt.NDArray[np.int8] | npt.NDArray[np.uint8]
#: (2, dimensions) float32: per-dimension minimum and maximum.
Ranges = npt.NDArray[np.float32]

CALIBRATION_FILE = "calibration_texts.txt"


def calibration_texts() -> list[str]:
    """The built-in calibration set: a few hundred short texts of many kinds (questions,
    news, code, logs, reviews, many languages), one per line, shipped with the package."""
    text = (
        resources.files("emb_model_provider")
        .joinpath("data", CALIBRATION_FILE)
        .read_text(encoding="utf-8")
    )
    return [line for line in text.splitlines() if line.strip()]


def ranges_of(calibration: Vectors) -> Ranges:
    """Per-dimension min and max of calibration vectors (already cut and normalised as the
    vectors they will quantise)."""
    ranges: Ranges = np.vstack((calibration.min(axis=0), calibration.max(axis=0))).astype(
        np.float32
    )
    return ranges


def quantize(vectors: Vectors, precision: Quantization, ranges: Ranges | None) -> IntVectors:
    """``quantize_embeddings(vectors, precision, ranges=ranges)``; ``ranges`` is needed for int8
    and uint8 only. The expressions are the library's, so the results are equal."""
    if precision in ("binary", "ubinary"):
        packed = np.packbits(vectors > 0, axis=-1)
        return packed if precision == "ubinary" else (packed - 128).astype(np.int8)
    if ranges is None:
        raise ValueError(f"{precision} needs calibration ranges")
    starts = ranges[0, :]
    steps = (ranges[1, :] - starts) / 255
    steps = np.where(steps == 0, 1, steps)
    buckets = np.clip(np.floor((vectors - starts) / steps), 0, 255)
    if precision == "uint8":
        return buckets.astype(np.uint8)
    return (buckets - 128).astype(np.int8)
