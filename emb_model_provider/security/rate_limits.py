"""Requests and tokens per minute, per caller: token buckets in memory, bounded.

Each caller (an API key, or a client address when the server is open) has two buckets that hold
at most a minute's budget and refill continuously (``limit / window`` per second), so a caller may
burst up to its limit and then proceeds at the steady rate. A request takes one from the request
bucket before it runs. Its tokens are only known once it has run (``request.state.tokens``), so
they are taken afterwards and may drive the token bucket below zero: the caller is refused until
the bucket is back above zero, which is how OpenAI treats a request that overdraws its budget.

Memory is bounded: buckets that have refilled completely carry no information and are dropped as
they reach the front of the least-recently-used order, and beyond ``max_buckets`` the least
recently used caller is forgotten (it starts again with a full budget).

Not thread-safe by design: the ASGI middleware calls it from the event loop only.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

LimitKind = Literal["requests", "tokens"]

DEFAULT_MAX_BUCKETS = 100_000


def format_duration(seconds: float) -> str:
    """A duration as OpenAI's ``x-ratelimit-reset-*`` headers write it (Go's style):
    ``"20ms"``, ``"1s"``, ``"1.5s"``, ``"6m0s"``, ``"1h2m3s"``."""
    millis = max(0, math.ceil(seconds * 1000))
    if millis == 0:
        return "0s"
    if millis < 1000:
        return f"{millis}ms"
    hours, rest = divmod(millis, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


@dataclass
class _Bucket:
    requests: float
    tokens: float
    updated: float


@dataclass(frozen=True)
class Refusal:
    """Why a request was refused, and when to come back."""

    kind: LimitKind
    limit: int
    retry_after_s: float


class RateLimiter:
    def __init__(
        self,
        *,
        requests_per_window: int,
        tokens_per_window: int,
        window_s: float = 60.0,
        max_buckets: int = DEFAULT_MAX_BUCKETS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if window_s <= 0 or max_buckets < 1:
            raise ValueError("window_s must be positive and max_buckets at least 1")
        self.requests_limit = max(0, requests_per_window)
        self.tokens_limit = max(0, tokens_per_window)
        self.window_s = window_s
        self._max_buckets = max_buckets
        self._clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    @property
    def enabled(self) -> bool:
        return bool(self.requests_limit or self.tokens_limit)

    def acquire(self, caller: str) -> Refusal | None:
        """Take one request from ``caller``'s budget, or say why not (nothing is taken then)."""
        bucket = self._bucket(caller)
        if self.tokens_limit and bucket.tokens <= 0:
            rate = self.tokens_limit / self.window_s
            # Strictly above zero again; at least a millisecond so the client does not spin.
            wait = max(0.001, -bucket.tokens / rate + 1e-3)
            return Refusal("tokens", self.tokens_limit, wait)
        if self.requests_limit:
            if bucket.requests < 1:
                rate = self.requests_limit / self.window_s
                return Refusal("requests", self.requests_limit, (1 - bucket.requests) / rate)
            bucket.requests -= 1
        return None

    def debit_tokens(self, caller: str, tokens: int) -> None:
        """Charge the tokens a request used once it has run."""
        if self.tokens_limit and tokens > 0:
            self._bucket(caller).tokens -= tokens

    def headers(self, caller: str) -> list[tuple[bytes, bytes]]:
        """OpenAI's ``x-ratelimit-*`` headers for ``caller``'s budget now."""
        bucket = self._bucket(caller)
        headers: list[tuple[bytes, bytes]] = []
        if self.requests_limit:
            headers += _headers("requests", self.requests_limit, bucket.requests, self.window_s)
        if self.tokens_limit:
            headers += _headers("tokens", self.tokens_limit, bucket.tokens, self.window_s)
        return headers

    def _bucket(self, caller: str) -> _Bucket:
        now = self._clock()
        bucket = self._buckets.get(caller)
        if bucket is None:
            bucket = _Bucket(float(self.requests_limit), float(self.tokens_limit), now)
            self._buckets[caller] = bucket
            self._evict(now)
            return bucket
        self._refill(bucket, now)
        self._buckets.move_to_end(caller)
        return bucket

    def _refill(self, bucket: _Bucket, now: float) -> None:
        elapsed = max(0.0, now - bucket.updated)
        bucket.updated = now
        if elapsed == 0:
            return
        share = elapsed / self.window_s
        bucket.requests = min(
            float(self.requests_limit), bucket.requests + share * self.requests_limit
        )
        bucket.tokens = min(float(self.tokens_limit), bucket.tokens + share * self.tokens_limit)

    def _evict(self, now: float) -> None:
        while len(self._buckets) > 1:
            caller, oldest = next(iter(self._buckets.items()))
            if len(self._buckets) <= self._max_buckets:
                self._refill(oldest, now)
                full = oldest.requests >= self.requests_limit and oldest.tokens >= self.tokens_limit
                if not full:
                    return
            del self._buckets[caller]


def _headers(
    kind: LimitKind, limit: int, level: float, window_s: float
) -> list[tuple[bytes, bytes]]:
    rate = limit / window_s
    remaining = max(0, math.floor(level))
    reset_s = (limit - level) / rate
    return [
        (f"x-ratelimit-limit-{kind}".encode(), str(limit).encode()),
        (f"x-ratelimit-remaining-{kind}".encode(), str(remaining).encode()),
        (f"x-ratelimit-reset-{kind}".encode(), format_duration(reset_s).encode()),
    ]
