"""The dynamic batcher with a plain encode function: merging, order, budgets, failures, bounds."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import numpy as np
import pytest

from emb_model_provider.core.errors import Internal, NotReady, Overloaded
from emb_model_provider.encoders.base import PreparedInput, Vectors
from emb_model_provider.scheduler import DynamicBatcher

DEADLINE_S = 30


class RecordingEncoder:
    """Encodes payload ``k`` as the vector [k, n_tokens]; can hold a batch until released."""

    def __init__(self, *, hold_first: bool = False, poison: object = None) -> None:
        self.batches: list[list[object]] = []
        self.shapes: list[tuple[int, int]] = []
        self.started = threading.Event()
        self.release = threading.Event()
        if not hold_first:
            self.release.set()
        self.poison = poison

    def __call__(self, batch: Sequence[PreparedInput]) -> Vectors:
        self.batches.append([item.payload for item in batch])
        self.shapes.append((len(batch), max(item.n_tokens for item in batch)))
        self.started.set()
        assert self.release.wait(DEADLINE_S)
        if self.poison is not None and any(item.payload == self.poison for item in batch):
            raise ValueError("poisoned input")
        return np.array(
            [[float(item.payload), float(item.n_tokens)] for item in batch],  # type: ignore[arg-type]
            dtype=np.float32,
        )


def _inputs(*lengths: int, start: int = 0) -> list[PreparedInput]:
    return [PreparedInput(payload=start + i, n_tokens=n) for i, n in enumerate(lengths)]


def _batcher(encoder: RecordingEncoder, **limits: int) -> DynamicBatcher:
    values = {"max_batch_size": 4, "max_batch_tokens": 1000, "max_queue_inputs": 100, **limits}
    return DynamicBatcher("test", encoder, **values)


async def _wait_started(encoder: RecordingEncoder) -> None:
    assert await asyncio.to_thread(encoder.started.wait, DEADLINE_S)


def test_results_come_back_in_input_order() -> None:
    encoder = RecordingEncoder()
    batcher = _batcher(encoder)

    async def run() -> list[Vectors]:
        return await batcher.embed(_inputs(9, 1, 5, 3, 7, 2))

    try:
        rows = asyncio.run(run())
    finally:
        batcher.stop()
    assert [row[0] for row in rows] == [0, 1, 2, 3, 4, 5]
    assert [row[1] for row in rows] == [9, 1, 5, 3, 7, 2]
    # Sorted by length before cutting: batches hold neighbours in length.
    assert encoder.batches == [[1, 5, 3, 2], [4, 0]]


def test_concurrent_requests_are_merged_while_the_model_is_busy() -> None:
    encoder = RecordingEncoder(hold_first=True)
    batcher = _batcher(encoder, max_batch_size=32)

    async def run() -> list[list[Vectors]]:
        first = asyncio.ensure_future(batcher.embed(_inputs(3)))
        await _wait_started(encoder)  # the model is busy with the first request
        others = [asyncio.ensure_future(batcher.embed(_inputs(4, start=10 + i))) for i in range(20)]
        while batcher.queued_inputs < 20:
            await asyncio.sleep(0)
        encoder.release.set()
        return await asyncio.gather(first, *others)

    try:
        results = asyncio.run(run())
    finally:
        batcher.stop()
    assert [len(batch) for batch in encoder.batches] == [1, 20]
    assert [result[0][0] for result in results] == [0, *range(10, 30)]


def test_batches_respect_the_size_and_padded_token_budget() -> None:
    encoder = RecordingEncoder()
    batcher = _batcher(encoder, max_batch_size=8, max_batch_tokens=100)
    lengths = [10, 50, 30, 20, 25, 60, 5, 40, 45, 15, 33, 12]

    async def run() -> list[Vectors]:
        return await batcher.embed(_inputs(*lengths))

    try:
        rows = asyncio.run(run())
    finally:
        batcher.stop()
    assert [int(row[1]) for row in rows] == lengths
    assert sum(count for count, _ in encoder.shapes) == len(lengths)
    for count, longest in encoder.shapes:
        assert count <= 8
        assert count * longest <= 100 or count == 1


def test_a_bad_input_fails_only_its_own_request() -> None:
    encoder = RecordingEncoder(hold_first=True, poison=13)
    batcher = _batcher(encoder, max_batch_size=16)

    async def run() -> list[object]:
        blocker = asyncio.ensure_future(batcher.embed(_inputs(1, start=100)))
        await _wait_started(encoder)
        good = [asyncio.ensure_future(batcher.embed(_inputs(5, start=i))) for i in range(10)]
        bad = asyncio.ensure_future(batcher.embed(_inputs(5, 5, start=13)))
        while batcher.queued_inputs < 12:
            await asyncio.sleep(0)
        encoder.release.set()
        return await asyncio.gather(blocker, *good, bad, return_exceptions=True)

    try:
        results = asyncio.run(run())
    finally:
        batcher.stop()
    *ok, failed = results
    assert all(isinstance(result, list) for result in ok)
    assert [result[0][0] for result in ok[1:]] == list(range(10))  # type: ignore[index]
    assert isinstance(failed, Internal)
    assert "poisoned input" in failed.message
    assert batcher.stats.failed_inputs == 1


def test_a_full_queue_refuses_before_queueing() -> None:
    encoder = RecordingEncoder(hold_first=True)
    batcher = _batcher(encoder, max_queue_inputs=10)

    async def run() -> None:
        first = asyncio.ensure_future(batcher.embed(_inputs(1)))
        await _wait_started(encoder)
        queued = asyncio.ensure_future(batcher.embed(_inputs(*[1] * 8)))
        while batcher.queued_inputs < 8:
            await asyncio.sleep(0)
        with pytest.raises(Overloaded) as refused:
            await batcher.embed(_inputs(1, 1, 1))
        assert refused.value.retry_after_s == 1
        assert batcher.queued_inputs == 8  # nothing of the refused request was queued
        encoder.release.set()
        await asyncio.gather(first, queued)

    try:
        asyncio.run(run())
    finally:
        batcher.stop()


def test_cancelled_requests_are_skipped() -> None:
    encoder = RecordingEncoder(hold_first=True)
    batcher = _batcher(encoder)

    async def run() -> None:
        first = asyncio.ensure_future(batcher.embed(_inputs(1)))
        await _wait_started(encoder)
        gone = asyncio.ensure_future(batcher.embed(_inputs(2, 2, 2, start=50)))
        kept = asyncio.ensure_future(batcher.embed(_inputs(3, start=60)))
        while batcher.queued_inputs < 4:
            await asyncio.sleep(0)
        gone.cancel()
        await asyncio.gather(gone, return_exceptions=True)
        encoder.release.set()
        await asyncio.gather(first, kept)

    try:
        asyncio.run(run())
    finally:
        batcher.stop()
    seen = [payload for batch in encoder.batches for payload in batch]
    assert 60 in seen
    assert not {50, 51, 52} & set(seen)
    assert batcher.stats.skipped_inputs == 3


def test_stop_finishes_accepted_inputs_and_refuses_new_ones() -> None:
    encoder = RecordingEncoder(hold_first=True)
    batcher = _batcher(encoder)

    async def run() -> object:
        first = asyncio.ensure_future(batcher.embed(_inputs(1)))
        await _wait_started(encoder)
        waiting = asyncio.ensure_future(batcher.embed(_inputs(2)))
        while batcher.queued_inputs < 1:
            await asyncio.sleep(0)
        stopper = asyncio.ensure_future(asyncio.to_thread(batcher.stop))
        encoder.release.set()
        await stopper
        await first
        return (await asyncio.gather(waiting, return_exceptions=True))[0]

    outcome = asyncio.run(run())
    assert isinstance(outcome, list)
    assert outcome[0][0] == 0
    with pytest.raises(NotReady):
        asyncio.run(batcher.embed(_inputs(1)))


def test_a_batch_too_big_for_the_device_is_split_and_every_input_answered() -> None:
    """What CUDA out-of-memory looks like to the batcher: a batch over some size raises; the
    batcher halves it until the pieces fit, and no request fails."""
    sizes: list[int] = []

    def encode(batch: Sequence[PreparedInput]) -> Vectors:
        sizes.append(len(batch))
        if len(batch) > 3:
            raise MemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return np.array([[float(item.payload)] for item in batch], dtype=np.float32)  # type: ignore[arg-type]

    batcher = DynamicBatcher(
        "oom", encode, max_batch_size=16, max_batch_tokens=10_000, max_queue_inputs=100
    )

    async def run() -> list[Vectors]:
        return await batcher.embed(_inputs(*[5] * 16))

    try:
        rows = asyncio.run(run())
    finally:
        batcher.stop()
    assert [row[0] for row in rows] == list(range(16))
    assert max(size for size in sizes if size <= 3) <= 3
    assert sizes[0] == 16
    assert batcher.stats.failed_inputs == 0


def test_background_inputs_yield_to_interactive_ones_one_batch_at_a_time() -> None:
    """A bulk job queued first runs one batch; interactive inputs that arrive meanwhile run next,
    before the rest of the job, and every background input is still answered in order."""
    encoder = RecordingEncoder(hold_first=True)
    batcher = _batcher(encoder, max_batch_size=4)

    async def run() -> tuple[list[Vectors], list[Vectors]]:
        bulk = asyncio.ensure_future(batcher.embed(_inputs(*[5] * 12), background=True))
        await _wait_started(encoder)  # the first background batch is running
        assert batcher.queued_background_inputs == 8
        online = asyncio.ensure_future(batcher.embed(_inputs(3, 3, start=100)))
        while batcher.queued_inputs < 2:
            await asyncio.sleep(0)
        encoder.release.set()
        return await bulk, await online

    try:
        bulk, online = asyncio.run(run())
    finally:
        batcher.stop()
    assert encoder.batches == [[0, 1, 2, 3], [100, 101], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert [vector[0] for vector in bulk] == list(range(12))
    assert [vector[0] for vector in online] == [100, 101]


def test_stop_drains_background_inputs_too() -> None:
    encoder = RecordingEncoder()
    batcher = _batcher(encoder, max_batch_size=2)

    async def run() -> list[Vectors]:
        return await batcher.embed(_inputs(*[2] * 5), background=True)

    results = asyncio.run(run())
    batcher.stop()
    assert [vector[0] for vector in results] == list(range(5))
    assert sum(len(batch) for batch in encoder.batches) == 5


def test_background_batches_are_cut_at_their_own_smaller_size() -> None:
    encoder = RecordingEncoder()
    batcher = DynamicBatcher(
        "test",
        encoder,
        max_batch_size=8,
        max_batch_tokens=1000,
        max_queue_inputs=100,
        background_batch_size=3,
    )

    async def run() -> tuple[list[Vectors], list[Vectors]]:
        bulk = await batcher.embed(_inputs(*[2] * 7), background=True)
        online = await batcher.embed(_inputs(*[2] * 7, start=10))
        return bulk, online

    try:
        bulk, online = asyncio.run(run())
    finally:
        batcher.stop()
    assert [len(batch) for batch in encoder.batches] == [3, 3, 1, 7]
    assert [vector[0] for vector in bulk] == list(range(7))
    assert [vector[0] for vector in online] == list(range(10, 17))


class ArrivingEncoder(RecordingEncoder):
    """A RecordingEncoder during whose ``k``-th batch the requests ``arrivals[k]`` (lists of
    lengths, numbered from ``start``) reach the batcher, as other clients' requests do while the
    model is busy."""

    def __init__(self, arrivals: dict[int, list[tuple[int, int]]]) -> None:
        super().__init__()
        self.arrivals = arrivals
        self.calls = 0
        self.requests: list[asyncio.Future[list[Vectors]]] = []
        self.batcher: DynamicBatcher | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def __call__(self, batch: Sequence[PreparedInput]) -> Vectors:
        self.calls += 1
        batcher, loop = self.batcher, self.loop
        assert batcher is not None and loop is not None
        arriving = self.arrivals.get(self.calls, [])
        expected = batcher.queued_inputs + len(arriving)
        for length, payload in arriving:
            loop.call_soon_threadsafe(self._submit, batcher, length, payload)
        for _ in range(DEADLINE_S * 1000):  # until they are queued, as if they came in time
            if batcher.queued_inputs >= expected:
                break
            threading.Event().wait(0.001)
        return super().__call__(batch)

    def _submit(self, batcher: DynamicBatcher, length: int, payload: int) -> None:
        self.requests.append(asyncio.ensure_future(batcher.embed(_inputs(length, start=payload))))


def _run_with_arrivals(
    arrivals: dict[int, list[tuple[int, int]]], first: int = 100
) -> tuple[ArrivingEncoder, list[float]]:
    """Send one input ``first``; return the encoder's record and every request's payload."""
    encoder = ArrivingEncoder(arrivals)
    batcher = _batcher(encoder, max_batch_size=4)
    encoder.batcher = batcher
    expected = 1 + sum(len(requests) for requests in arrivals.values())

    async def run() -> list[float]:
        encoder.loop = asyncio.get_running_loop()
        rows = [await batcher.embed(_inputs(1, start=first))]
        for _ in range(DEADLINE_S * 100):
            if len(encoder.requests) >= expected - 1 and all(r.done() for r in encoder.requests):
                break
            await asyncio.sleep(0.01)
        rows += await asyncio.gather(*encoder.requests)
        return [float(result[0][0]) for result in rows]

    try:
        payloads = asyncio.run(run())
    finally:
        batcher.stop()
    return encoder, payloads


def test_an_unfilled_last_batch_waits_for_inputs_that_arrived_meanwhile() -> None:
    """Many one-input clients: a round of 6 with batches of 4 runs 4, and the other 2 are cut
    together with the inputs that arrived during that batch, so the model runs full batches."""
    encoder, payloads = _run_with_arrivals(
        {1: [(i + 1, i) for i in range(6)], 2: [(9, 20), (9, 21)]}
    )
    assert encoder.batches == [[100], [0, 1, 2, 3], [4, 5, 20, 21]]
    assert payloads == [100, 0, 1, 2, 3, 4, 5, 20, 21]


def test_an_input_is_held_back_only_once() -> None:
    """The long input 7 is the unfilled remainder of two rounds; it waits for one batch, not
    two."""
    shorts = [(1, 10), (1, 11), (1, 12), (1, 13)]
    encoder, _ = _run_with_arrivals(
        {1: [(1, 0), (1, 1), (1, 2), (1, 3), (50, 7)], 2: shorts, 3: [(1, 14)]}
    )
    assert encoder.batches == [[100], [0, 1, 2, 3], [10, 11, 12, 13], [7], [14]]


def test_an_unfilled_batch_runs_at_once_when_nothing_else_waits() -> None:
    encoder, _ = _run_with_arrivals({1: [(1, 0), (1, 1), (1, 2), (1, 3), (1, 4)]})
    assert encoder.batches == [[100], [0, 1, 2, 3], [4]]
