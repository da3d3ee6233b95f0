"""The scheduler (dynamic batching): inputs from concurrent requests are merged into full batches.

Not to be confused with ``batch_api/`` (OpenAI's Batch API, whose lines come here as background
work) or ``offline/`` (the ``embed`` command, which runs the encoders without a server).

One worker thread per model takes everything that is waiting, sorts it by length (less padding),
cuts batches by count (``max_batch_size``) and by padded tokens (longest x count <=
``max_batch_tokens``, as text-embeddings-inference does), and runs the encoder on each. A round's
last batch, when it is not full and new inputs arrived while the round ran, goes back to the front
of the queue to be merged with them (once per input): with many one-input clients the model then
runs full batches instead of a full one and a remainder. Each input
has its own future, so a failure reaches only its own request: a batch that raises is split in
halves and retried until the failing input is alone. While the model is busy, new inputs gather,
so the next batch is full without any artificial wait. The queue is bounded: a request that would
overflow it is refused before anything is queued. Stopping finishes what was
accepted. Inputs whose future is already done (the client
went away) are skipped.

Background work (Batch API jobs) waits in a second queue that the worker serves only when no
interactive input is waiting, one (smaller) batch at a time: an online request arriving behind a
bulk job waits at most for the one background batch already running.

When the request is traced (``core/tracing.py``), its inputs carry its span context into the
queue; each forward pass is a span linked to every request it served, and each request, once
answered, writes its queue-wait span linked back to it (on its own thread: the model thread
only notes which forward served each input, and when it started).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from emb_model_provider.core import tracing
from emb_model_provider.core.errors import Internal, NotReady, Overloaded, ProviderError
from emb_model_provider.encoders.base import PreparedInput, Vectors

logger = logging.getLogger(__name__)

#: How many batches' worth of waiting inputs one round sorts together; bounds how long an input
#: that arrived during a round can wait behind it.
_ROUND_BATCHES = 8


#: Upper bounds of the queue-wait histogram, in seconds (Prometheus' default buckets, finer at
#: the low end where an idle server answers).
QUEUE_WAIT_BUCKETS_S = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0
)  # fmt: skip
#: Upper bounds of the batch-size histogram, in inputs.
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


@dataclass(slots=True)
class Histogram:
    """A cumulative histogram in plain Python, so the batcher needs no metrics library: the
    metrics collector reads it at scrape time. ``counts[i]`` counts observations <= ``bounds[i]``
    (not cumulative over buckets); the last slot is +Inf."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        slot = len(self.bounds)
        for index, bound in enumerate(self.bounds):
            if value <= bound:
                slot = index
                break
        self.counts[slot] += 1
        self.total += value
        self.count += 1


@dataclass(slots=True)
class BatcherStats:
    """Counters for metrics and tests; written by the worker thread only."""

    batches: int = 0
    encoded_inputs: int = 0
    #: Inputs dropped before they ran because their request was gone (client disconnected).
    skipped_inputs: int = 0
    failed_inputs: int = 0
    #: Inputs per batch that ran.
    batch_sizes: Histogram = field(default_factory=lambda: Histogram(BATCH_SIZE_BUCKETS))
    #: Seconds from an input's arrival in the queue to the start of its batch.
    queue_wait_s: Histogram = field(default_factory=lambda: Histogram(QUEUE_WAIT_BUCKETS_S))


@dataclass(slots=True)
class _Item:
    prepared: PreparedInput
    future: asyncio.Future[Vectors]
    loop: asyncio.AbstractEventLoop
    enqueued_s: float  # time.perf_counter() when queued
    origin: tracing.Origin | None  # the traced request that queued it
    deferred: bool = False  # held back once to fill a later batch
    #: The traced forward that first ran it, and when it started (ns since the epoch).
    served: tracing.Served | None = None


def _resolve(future: asyncio.Future[Vectors], result: Vectors | BaseException) -> None:
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


class DynamicBatcher:
    def __init__(
        self,
        name: str,
        encode: Callable[[Sequence[PreparedInput]], Vectors],
        *,
        max_batch_size: int,
        max_batch_tokens: int,
        max_queue_inputs: int,
        background_batch_size: int | None = None,
    ) -> None:
        self.name = name
        self._encode = encode
        self._max_batch_size = max_batch_size
        self._max_batch_tokens = max_batch_tokens
        self._max_queue_inputs = max_queue_inputs
        self._background_batch_size = min(background_batch_size or max_batch_size, max_batch_size)
        self._pending: deque[_Item] = deque()
        self._background: deque[_Item] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self.stats = BatcherStats()
        self._thread = threading.Thread(target=self._run, name=f"batcher-{name}", daemon=True)
        self._thread.start()

    @property
    def queued_inputs(self) -> int:
        return len(self._pending)

    @property
    def queued_background_inputs(self) -> int:
        return len(self._background)

    async def embed(
        self, inputs: Sequence[PreparedInput], *, background: bool = False
    ) -> list[Vectors]:
        """One vector per input, in order. Cancelling the caller drops its queued inputs.
        ``background`` inputs run only while no interactive input waits."""
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        origin = tracing.origin()
        items = [_Item(p, loop.create_future(), loop, now, origin) for p in inputs]
        queue = self._background if background else self._pending
        with self._cond:
            if self._stopping:
                raise NotReady(f"model {self.name} is shutting down", code="shutting_down")
            if len(queue) + len(items) > self._max_queue_inputs:
                raise Overloaded(
                    f"The server is overloaded: {len(queue)} inputs are waiting for model "
                    f"{self.name} (limit {self._max_queue_inputs}). Retry after a short wait.",
                    retry_after_s=1,
                )
            queue.extend(items)
            self._cond.notify()
        try:
            return list(await asyncio.gather(*(item.future for item in items)))
        finally:
            for item in items:  # after an error or cancellation, the rest need not run
                item.future.cancel()
            if origin is not None:
                tracing.queue_waits(origin, [i.served for i in items if i.served is not None])

    def stop(self, timeout_s: float = 30.0) -> None:
        """Refuse new inputs, finish the accepted ones, end the worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout_s)

    # -- worker thread -------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._background and not self._stopping:
                    self._cond.wait()
                if self._pending:
                    queue, take = self._pending, self._max_batch_size * _ROUND_BATCHES
                elif self._background:  # one batch, then look for interactive work again
                    queue, take = self._background, self._background_batch_size
                else:  # stopping, and everything accepted has been answered
                    break
                round_items = [queue.popleft() for _ in range(min(len(queue), take))]
            batches = self._cut(round_items)
            if queue is self._background and len(batches) > 1:
                # The token bound split the round: run the first batch, requeue the rest.
                with self._cond:
                    self._background.extendleft(reversed([i for b in batches[1:] for i in b]))
                batches = batches[:1]
            for index, batch in enumerate(batches):
                if index == len(batches) - 1 and queue is self._pending and self._defer(batch):
                    break
                self._start_batch(batch)

    def _cut(self, items: list[_Item]) -> list[list[_Item]]:
        live = sorted(items, key=lambda item: item.prepared.n_tokens)
        batches: list[list[_Item]] = []
        current: list[_Item] = []
        for item in live:  # ascending length: the newest item is the longest of its batch
            padded = item.prepared.n_tokens * (len(current) + 1)
            if current and (
                len(current) >= self._max_batch_size or padded > self._max_batch_tokens
            ):
                batches.append(current)
                current = []
            current.append(item)
        if current:
            batches.append(current)
        return batches

    def _defer(self, batch: list[_Item]) -> bool:
        """Put a round's unfilled last batch back in front of the queue when inputs arrived
        meanwhile, so the next round cuts it together with them; never the same input twice, so
        an input waits at most one batch longer than it would have."""
        if len(batch) >= self._max_batch_size or any(item.deferred for item in batch):
            return False
        longest = batch[-1].prepared.n_tokens  # ascending order within a batch
        if longest * (len(batch) + 1) > self._max_batch_tokens:
            return False  # cut by the token budget: it is as full as it can be
        with self._cond:
            if not self._pending or self._stopping:
                return False
            for item in batch:
                item.deferred = True
            self._pending.extendleft(reversed(batch))
        return True

    def _start_batch(self, batch: list[_Item]) -> None:
        live = [item for item in batch if not item.future.done()]
        self.stats.skipped_inputs += len(batch) - len(live)
        if not live:
            return
        started = time.perf_counter()
        self.stats.batch_sizes.observe(len(live))
        for item in live:
            self.stats.queue_wait_s.observe(started - item.enqueued_s)
        self._run_batch(live, first=True)

    def _run_batch(self, batch: list[_Item], *, first: bool = False) -> None:
        live = [item for item in batch if not item.future.done()]
        self.stats.skipped_inputs += len(batch) - len(live)
        batch = live
        if not batch:
            return
        origins = [item.origin for item in batch if item.origin is not None]
        try:
            if origins:
                started_ns = time.time_ns()
                with tracing.forward_span(origins, self._forward_attributes(batch)) as forward:
                    if first:  # a retry in halves is not where the inputs stopped waiting
                        for item in batch:
                            item.served = (forward, started_ns)
                    vectors = self._encode([item.prepared for item in batch])
            else:
                vectors = self._encode([item.prepared for item in batch])
        except Exception as exc:
            if len(batch) > 1:
                logger.warning(
                    "batch of %d for %s failed (%s); retrying in halves", len(batch), self.name, exc
                )
                middle = len(batch) // 2
                self._run_batch(batch[:middle])
                self._run_batch(batch[middle:])
                return
            logger.exception("input failed in model %s", self.name)
            error: ProviderError = Internal(f"The model {self.name} failed on this input: {exc}")
            self.stats.failed_inputs += 1
            self._deliver(batch[0], error)
            return
        self.stats.batches += 1
        self.stats.encoded_inputs += len(batch)
        for row, item in enumerate(batch):
            self._deliver(item, vectors[row])

    def _forward_attributes(self, batch: list[_Item]) -> tracing.Attributes:
        tokens = [item.prepared.n_tokens for item in batch]
        return {
            "emb.model": self.name,
            "emb.batch.size": len(batch),
            "emb.batch.tokens": sum(tokens),
            # What a padded forward computes (longest x count); unpadded kernels skip the rest.
            "emb.batch.padded_tokens": max(tokens) * len(batch),
        }

    @staticmethod
    def _deliver(item: _Item, result: Vectors | BaseException) -> None:
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
            item.loop.call_soon_threadsafe(_resolve, item.future, result)
