"""Progress of a job on stderr: a tqdm bar (rate, ETA) on a terminal, else a plain line every
``interval_s`` seconds (logs of batch jobs and CI have no terminal to redraw)."""

from __future__ import annotations

import sys
import time
from typing import Never, TextIO

from tqdm import tqdm


class Progress:
    def __init__(
        self, total: int, *, done: int = 0, interval_s: float = 10.0, stream: TextIO | None = None
    ) -> None:
        self._stream = stream or sys.stderr
        self._total = total
        self._done = done
        self._start_done = done
        self._started = time.monotonic()
        self._interval_s = interval_s
        self._next_line = self._started + interval_s
        self._bar: tqdm[Never] | None = None
        if self._stream.isatty():
            self._bar = tqdm(
                total=total, initial=done, unit="input", file=self._stream, dynamic_ncols=True
            )

    def advance(self, inputs: int, *, tokens: int, computed: bool) -> None:
        """``inputs`` more done; ``computed`` False for chunks an earlier run finished."""
        self._done += inputs
        if not computed:
            self._start_done += inputs
        if self._bar is not None:
            self._bar.update(inputs)
            if computed:
                self._bar.set_postfix(tokens=tokens, refresh=False)
            return
        now = time.monotonic()
        if now >= self._next_line or self._done >= self._total:
            self._next_line = now + self._interval_s
            self._stream.write(self.line(now) + "\n")
            self._stream.flush()

    def line(self, now: float) -> str:
        elapsed = max(now - self._started, 1e-9)
        rate = (self._done - self._start_done) / elapsed
        left = max(self._total - self._done, 0)
        eta = f"{left / rate:.0f} s" if rate > 0 else "?"
        share = 100.0 * self._done / self._total if self._total else 100.0
        return (
            f"embedded {self._done}/{self._total} inputs ({share:.0f}%), "
            f"{rate:.1f} inputs/s, {elapsed:.0f} s elapsed, ETA {eta}"
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
