"""Runs Batch API jobs: validate the input file, embed each line at background priority, record
each finished line durably, write the output and error files.

- **Priority.** Each line goes through ``EmbeddingService.create(..., background=True)``: its
  inputs wait in the batcher's background lane, which runs one batch at a time and only while no
  interactive input waits (``scheduler.py``). A big job uses an idle server fully and yields it
  to online clients at once.
- **Bounds.** At most ``max_concurrent_jobs`` jobs run, each with at most ``line_concurrency``
  lines in flight; the input file is read a chunk of lines at a time.
- **Durability.** A line counts as done once its output line is committed to the store
  (``batch_api/store.py``); after a restart or a SIGKILL, a job resumes with the lines not
  recorded yet, so no finished line is lost or repeated.
- **Cancel and expiry.** A cancel (or the 24 h window passing) stops the job within one line's
  time: in-flight lines are dropped from the batcher's queue, and the job is finished with what
  it has (``cancelled`` / ``expired``, with partial output). Lines that never ran are listed in
  the error file with code ``batch_cancelled`` / ``batch_expired``, as OpenAI does for expiry.
- **Shutdown.** Stopping the runner cancels the jobs without touching their status; the next
  start resumes them.

Each line's body is parsed by the same ``EmbeddingRequest`` the route uses and runs through the
same service, so it meets the same validation, limits and errors as an online request. Traced,
each line is the root span of a trace of its own (``batch.line``, with the batch id and the line's
``custom_id``), above the same spans an online request gets.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import orjson
from pydantic import ValidationError

from emb_model_provider.batch_api.protocol import (
    BATCH_ENDPOINT,
    RERANK_ENDPOINT,
    TERMINAL_STATUSES,
    render_error_body,
    render_output_line,
    render_unrun_line,
)
from emb_model_provider.batch_api.service import BatchJobs, new_id, now_s
from emb_model_provider.batch_api.store import BatchRecord, BatchStore, FileRecord
from emb_model_provider.core import tracing
from emb_model_provider.core.errors import (
    InvalidRequest,
    ModelNotFound,
    NotReady,
    Overloaded,
    ProviderError,
)
from emb_model_provider.protocol import EmbeddingRequest, RerankRequest
from emb_model_provider.registry import Registry
from emb_model_provider.services.embedding_service import EmbeddingService, Reply
from emb_model_provider.services.rerank_service import RerankService

logger = logging.getLogger(__name__)

#: (message, param) for a body that failed validation; main passes the function the route's
#: error handler uses (``api/exceptions.validation_message``), so a line reads the same error.
DescribeInvalid = Callable[[Sequence[dict[str, Any]]], tuple[str, str | None]]

_READ_LINES = 256
#: Most entries of a failed batch's ``errors.data``.
_MAX_VALIDATION_ERRORS = 100
_RETRY_S = (0.05, 0.1, 0.25, 0.5, 1.0)
_UNRUN = {
    "expired": (
        "batch_expired",
        "This request could not be executed before the completion window expired.",
    ),
    "cancelled": ("batch_cancelled", "This request was not executed: the batch was cancelled."),
}


def read_lines(handle: BinaryIO, count: int) -> list[bytes]:
    lines: list[bytes] = []
    for line in handle:
        lines.append(line)
        if len(lines) >= count:
            break
    return lines


class BatchRunner:
    def __init__(
        self,
        jobs: BatchJobs,
        service: EmbeddingService,
        registry: Registry,
        *,
        describe_invalid: DescribeInvalid,
        max_concurrent_jobs: int,
        line_concurrency: int,
        housekeeping_interval_s: float = 30.0,
        tracer: tracing.AppTracer | None = None,
        rerank: RerankService | None = None,
    ) -> None:
        self._jobs = jobs
        self._service = service
        self._rerank = rerank
        self._registry = registry
        self._describe_invalid = describe_invalid
        self._max_jobs = max_concurrent_jobs
        self._line_concurrency = line_concurrency
        self._interval_s = housekeeping_interval_s
        self._running: dict[str, asyncio.Task[None]] = {}
        self._lock_warned = False
        self._tracer = tracer

    async def run(self) -> None:
        """Until cancelled: start the jobs there is room for, expire old files, wait for news."""
        tracing.activate(self._tracer)  # this task's context; the job and line tasks copy it
        try:
            while True:
                self._jobs.wake.clear()
                try:
                    await self._schedule()
                except Exception:
                    logger.exception("batch runner: scheduling failed; retrying later")
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._interval_s):
                        await self._jobs.wake.wait()
        finally:
            tasks = list(self._running.values())
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _schedule(self) -> None:
        store = await asyncio.to_thread(self._jobs.existing_store)
        if store is None:
            return
        if not await asyncio.to_thread(self._jobs.try_runner_lock):
            if not self._lock_warned:
                logger.warning(
                    "another process runs the batch jobs of %s; this one serves the API only",
                    self._jobs.data_dir,
                )
                self._lock_warned = True
            return
        now = now_s()
        for owner, file_id in await asyncio.to_thread(store.expired_files, now):
            await asyncio.to_thread(store.delete_file, owner, file_id)
            logger.info("file %s expired and was deleted", file_id)
        for batch in await asyncio.to_thread(store.active_batches):
            if batch.id in self._running:
                continue
            quick = batch.status == "cancelling" or batch.expires_at <= now  # only finishing
            if not quick and len(self._running) >= self._max_jobs:
                continue
            task = asyncio.create_task(self._job(store, batch.id), name=f"batch-{batch.id}")
            self._running[batch.id] = task
            task.add_done_callback(functools.partial(self._done, batch.id))

    def _done(self, batch_id: str, _: asyncio.Task[None]) -> None:
        self._running.pop(batch_id, None)
        self._jobs.forget_stop_signal(batch_id)
        self._jobs.wake.set()

    # -- one job --------------------------------------------------------------------------------

    async def _job(self, store: BatchStore, batch_id: str) -> None:
        try:
            batch = await asyncio.to_thread(store.get_batch, batch_id)
            if batch is None:
                return
            if batch.status == "validating":
                batch = await self._validate(store, batch)
            finished = False
            if batch.status == "in_progress":
                finished = await self._execute(store, batch)
                batch = await asyncio.to_thread(store.get_batch, batch_id) or batch
            if batch.status in TERMINAL_STATUSES:  # failed validation
                await asyncio.to_thread(store.job_path(batch_id).unlink, missing_ok=True)
                return
            if batch.status == "cancelling":
                final = "cancelled"
            elif finished or batch.status == "finalizing":
                final = "completed"
            else:  # stopped by its window
                final = "expired"
            await asyncio.to_thread(self._finish, store, batch, final)
        except asyncio.CancelledError:
            raise  # shutdown: the batch keeps its status and resumes at the next start
        except Exception as exc:
            logger.exception("batch %s failed", batch_id)
            errors = [{"code": "internal_error", "message": f"The batch failed: {exc}"}]
            await asyncio.to_thread(
                store.update_batch,
                batch_id,
                status="failed",
                failed_at=now_s(),
                errors=json.dumps(errors),
            )
            await asyncio.to_thread(store.job_path(batch_id).unlink, missing_ok=True)

    async def _validate(self, store: BatchStore, batch: BatchRecord) -> BatchRecord:
        path = store.job_path(batch.id)
        total, model, errors = await asyncio.to_thread(_check_input, path, batch.endpoint)
        if errors:
            logger.info("batch %s failed validation: %d errors", batch.id, len(errors))
            updated = await asyncio.to_thread(
                store.update_batch,
                batch.id,
                when_status=("validating",),
                status="failed",
                failed_at=now_s(),
                errors=json.dumps(errors),
            )
        else:
            updated = await asyncio.to_thread(
                store.update_batch,
                batch.id,
                when_status=("validating",),
                status="in_progress",
                in_progress_at=now_s(),
                total=total,
                model=model,
            )
        # None: the batch was cancelled meanwhile.
        return updated or await asyncio.to_thread(store.get_batch, batch.id) or batch

    async def _execute(self, store: BatchStore, batch: BatchRecord) -> bool:
        """Run the lines not recorded yet, until done (True), cancelled or past the window."""
        stop = self._jobs.stop_signal(batch.id)
        work = asyncio.create_task(self._lines(store, batch))
        stopped = asyncio.create_task(stop.wait())
        try:
            remaining_s = max(0.0, batch.expires_at - time.time())
            done, _ = await asyncio.wait(
                {work, stopped}, timeout=remaining_s, return_when=asyncio.FIRST_COMPLETED
            )
            if work in done:
                work.result()
                return True
            return False
        finally:
            for task in (work, stopped):
                task.cancel()
            await asyncio.gather(work, stopped, return_exceptions=True)

    async def _lines(self, store: BatchStore, batch: BatchRecord) -> None:
        done = await asyncio.to_thread(store.done_lines, batch.id)
        allowed = frozenset(json.loads(batch.allowed_models)) if batch.allowed_models else None
        slots = asyncio.Semaphore(self._line_concurrency)
        in_flight: set[asyncio.Task[None]] = set()

        async def one(index: int, raw: bytes) -> None:
            try:
                await self._line(store, batch, allowed, index, raw)
            finally:
                slots.release()

        handle = await asyncio.to_thread(store.job_path(batch.id).open, "rb")
        try:
            index = 0
            while chunk := await asyncio.to_thread(read_lines, handle, _READ_LINES):
                for raw in chunk:
                    line, index = index, index + 1
                    if line in done or not raw.strip():
                        continue
                    await slots.acquire()
                    task = asyncio.create_task(one(line, raw))
                    in_flight.add(task)
                    task.add_done_callback(in_flight.discard)
            if in_flight:
                await asyncio.gather(*in_flight)
        finally:
            for task in in_flight:
                task.cancel()
            await asyncio.gather(*in_flight, return_exceptions=True)
            await asyncio.to_thread(handle.close)

    async def _line(
        self,
        store: BatchStore,
        batch: BatchRecord,
        allowed: frozenset[str] | None,
        index: int,
        raw: bytes,
    ) -> None:
        item = orjson.loads(raw)  # validated already: an object with custom_id and body
        attributes = {"emb.batch.id": batch.id, "emb.batch.custom_id": str(item["custom_id"])}
        with tracing.span("batch.line", attributes) as current:
            status_code, body = await self._call(item["body"], allowed, batch.endpoint)
            if current is not None:
                current.set_attribute("emb.batch.line.status_code", status_code)
        payload = render_output_line(
            new_id("batch_req_"),
            item["custom_id"],
            status_code=status_code,
            request_id=uuid.uuid4().hex,
            body=body,
        )
        await asyncio.to_thread(
            store.record_result, batch.id, index, ok=status_code == 200, payload=payload
        )

    async def _call(
        self, body: object, allowed: frozenset[str] | None, endpoint: str = BATCH_ENDPOINT
    ) -> tuple[int, bytes]:
        """The status and body ``endpoint`` (/v1/embeddings or /v1/rerank) would have answered
        for ``body``."""
        request: EmbeddingRequest | RerankRequest
        try:
            if endpoint == RERANK_ENDPOINT:
                request = RerankRequest.model_validate(body)
            else:
                request = EmbeddingRequest.model_validate(body)
        except ValidationError as exc:
            message, param = self._describe_invalid(
                [dict(error) for error in exc.errors(include_url=False)]
            )
            return 400, render_error_body(
                message, type_="invalid_request_error", param=param, code=None
            )
        try:
            if isinstance(request, RerankRequest):
                if self._rerank is None:
                    raise InvalidRequest("This server runs no rerank batches.", param="url")
                name = self._rerank.model_for(request.model).name
            else:
                name = request.model
            if allowed is not None and allowed.isdisjoint(self._registry.get(name).names):
                raise ModelNotFound(name)
            attempt = 0
            while True:
                try:
                    reply: Reply
                    if isinstance(request, RerankRequest):
                        assert self._rerank is not None
                        reply = await self._rerank.create(request, background=True)
                    else:
                        reply = await self._service.create(request, background=True)
                    return 200, reply.body
                except (Overloaded, NotReady):
                    # A full queue or a model being reloaded: wait and retry, never fail the line.
                    await asyncio.sleep(_RETRY_S[min(attempt, len(_RETRY_S) - 1)])
                    attempt += 1
        except ProviderError as exc:
            return exc.status_code, render_error_body(
                exc.message, type_=exc.type, param=exc.param, code=exc.code
            )
        except Exception:
            request_id = uuid.uuid4().hex
            logger.exception("batch line failed (request %s)", request_id)
            return 500, render_error_body(
                f"The server had an error while processing your request (request id {request_id}).",
                type_="server_error",
                param=None,
                code="internal_error",
            )

    # -- finishing ------------------------------------------------------------------------------

    def _finish(self, store: BatchStore, batch: BatchRecord, final: str) -> None:
        """Write the output and error files and move the batch to ``final`` (blocking)."""
        now = now_s()
        if final == "completed":
            batch = (
                store.update_batch(
                    batch.id, when_status=("in_progress",), status="finalizing", finalizing_at=now
                )
                or batch
            )
        done = store.done_lines(batch.id)
        output = self._write(
            store, batch, f"batch_{batch.id}_output.jsonl", store.results(batch.id, ok=True)
        )
        errors: Iterator[bytes] = store.results(batch.id, ok=False)
        if final in _UNRUN:
            code, message = _UNRUN[final]
            errors = _chain(errors, _unrun_lines(store.job_path(batch.id), done, code, message))
        error = self._write(store, batch, f"batch_{batch.id}_error.jsonl", errors)
        files = [record for record in (output, error) if record is not None]
        store.finish_batch(
            batch,
            files,
            status=final,
            output_file_id=output.id if output else None,
            error_file_id=error.id if error else None,
            **{f"{final}_at": now_s()},
        )
        logger.info("batch %s %s", batch.id, final)

    @staticmethod
    def _write(
        store: BatchStore, batch: BatchRecord, filename: str, lines: Iterator[bytes]
    ) -> FileRecord | None:
        file_id = new_id("file-")
        partial = store.partial_path(file_id)
        count = size = 0
        with partial.open("wb") as out:
            for line in lines:
                out.write(line)
                out.write(b"\n")
                count += 1
                size += len(line) + 1
            out.flush()
            os.fsync(out.fileno())
        if count == 0:
            partial.unlink()
            return None
        partial.replace(store.file_path(file_id))
        created = now_s()
        return FileRecord(
            id=file_id,
            owner=batch.owner,
            purpose="batch_output",
            filename=filename,
            bytes=size,
            lines=count,
            created_at=created,
            expires_at=created + batch.output_ttl_s,
        )


def _chain(*parts: Iterator[bytes]) -> Iterator[bytes]:
    for part in parts:
        yield from part


def _unrun_lines(path: Path, done: set[int], code: str, message: str) -> Iterator[bytes]:
    """Error lines for the requests of ``path`` that never ran."""
    if not path.is_file():
        return
    with path.open("rb") as handle:
        for index, raw in enumerate(handle):
            if index in done or not raw.strip():
                continue
            try:
                custom_id = orjson.loads(raw)["custom_id"]
            except (orjson.JSONDecodeError, TypeError, KeyError):
                continue  # a batch cancelled before validation may hold anything
            if isinstance(custom_id, str):
                yield render_unrun_line(new_id("batch_req_"), custom_id, code=code, message=message)


def _check_input(
    path: Path, endpoint: str = BATCH_ENDPOINT
) -> tuple[int, str | None, list[dict[str, object]]]:
    """Check every line's shape as OpenAI does before a batch runs: the number of requests, the
    model when they all name one, and ``errors.data`` (empty when the file is good)."""
    errors: list[dict[str, object]] = []
    seen: set[str] = set()
    models: set[object] = set()
    total = 0

    def error(code: str, message: str, line: int, param: str | None = None) -> None:
        if len(errors) < _MAX_VALIDATION_ERRORS:
            errors.append({"code": code, "message": message, "param": param, "line": line})

    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            total += 1
            try:
                item = orjson.loads(raw)
            except orjson.JSONDecodeError:
                error("invalid_json_line", "This line is not parseable as valid JSON.", number)
                continue
            if not isinstance(item, dict):
                error("invalid_request", "Each line must be a JSON object.", number)
                continue
            custom_id = item.get("custom_id")
            if not isinstance(custom_id, str) or not custom_id:
                error(
                    "missing_required_parameter",
                    "Each request needs a 'custom_id' string.",
                    number,
                    "custom_id",
                )
            elif custom_id in seen:
                error(
                    "duplicate_custom_id",
                    f"The custom_id {custom_id!r} is used by an earlier line; each must be "
                    "unique in the batch.",
                    number,
                    "custom_id",
                )
            else:
                seen.add(custom_id)
            if item.get("method") != "POST":
                error(
                    "invalid_method",
                    "The method of each request must be 'POST'.",
                    number,
                    "method",
                )
            if item.get("url") != endpoint:
                error(
                    "invalid_url",
                    f"The URL of each request must be the batch's endpoint, {endpoint!r}.",
                    number,
                    "url",
                )
            body = item.get("body")
            if not isinstance(body, dict):
                error(
                    "missing_required_parameter",
                    f"Each request needs a 'body' object: the {endpoint} request.",
                    number,
                    "body",
                )
            else:
                models.add(body.get("model"))
    if total == 0:
        errors.append(
            {"code": "empty_file", "message": "The input file has no requests.", "line": None}
        )
    model = next(iter(models)) if len(models) == 1 else None
    return total, model if isinstance(model, str) else None, errors
