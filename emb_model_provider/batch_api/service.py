"""The Files and Batch APIs without HTTP: upload, list, read and delete files; create, read,
list and cancel batches. The work itself is ``batch_api/runner.py``'s.

Every object belongs to an owner (a stable id of the API key that made it, or ``""`` when the
API is open), and another owner gets 404 for it, as OpenAI answers for objects of another
organisation. The store is opened on first use, so a server that never sees the Batch API
writes nothing to its data directory.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import secrets
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal, cast

from emb_model_provider.batch_api.protocol import (
    BATCH_ENDPOINTS,
    COMPLETION_WINDOW,
    COMPLETION_WINDOW_S,
    DEFAULT_FILE_TTL_S,
    MAX_FILE_TTL_S,
    MIN_FILE_TTL_S,
    BatchError,
    BatchErrors,
    BatchList,
    BatchObject,
    BatchStatus,
    CreateBatchRequest,
    FileDeleted,
    FileList,
    FileObject,
    FilePurpose,
    RequestCounts,
)
from emb_model_provider.batch_api.store import BatchRecord, BatchStore, FileRecord
from emb_model_provider.core.errors import InvalidRequest, ProviderError

logger = logging.getLogger(__name__)

_COPY_CHUNK = 1 << 20


class ObjectNotFound(ProviderError):
    """An unknown id, or one that belongs to another API key (OpenAI: 404)."""

    status_code = 404
    type = "invalid_request_error"


class Conflict(ProviderError):
    """The object's state does not allow this (cancelling a finished batch; OpenAI: 409)."""

    status_code = 409
    type = "invalid_request_error"


@dataclass(frozen=True)
class Owner:
    """Who is asking: a stable id of their API key and the models that key may use."""

    id: str
    models: frozenset[str] | None = None


@dataclass(frozen=True)
class FileLimits:
    max_file_bytes: int
    max_lines: int


def new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


def now_s() -> int:
    return int(time.time())


class BatchJobs:
    def __init__(self, data_dir: Path, limits: FileLimits) -> None:
        self.data_dir = data_dir
        self.limits = limits
        self._store: BatchStore | None = None
        self._open_lock = threading.Lock()
        self._runner_lock: int | None = None
        #: Set when there is new work or a cancellation; the runner waits on it.
        self.wake = asyncio.Event()
        #: One event per running batch, set to stop it (cancel).
        self._stops: dict[str, asyncio.Event] = {}

    # -- the store ------------------------------------------------------------------------------

    def store(self) -> BatchStore:
        """The store, opened (and created) on first use. Blocks: call it off the event loop."""
        with self._open_lock:
            if self._store is None:
                self._store = BatchStore(self.data_dir)
                logger.info("batch store opened in %s", self.data_dir)
            return self._store

    def existing_store(self) -> BatchStore | None:
        """The store when one exists on disk (there is work to resume), else None."""
        if self._store is None and not (self.data_dir / "batches.sqlite3").is_file():
            return None
        return self.store()

    def try_runner_lock(self) -> bool:
        """Whether this process runs the jobs: one process per data directory does (an
        advisory lock), so two servers on one directory never run a line twice at once."""
        if self._runner_lock is not None:
            return True
        self.data_dir.mkdir(parents=True, exist_ok=True)
        handle = os.open(self.data_dir / "runner.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(handle)
            return False
        self._runner_lock = handle
        self.store().sweep()
        return True

    def close(self) -> None:
        with self._open_lock:
            if self._store is not None:
                self._store.close()
                self._store = None
        if self._runner_lock is not None:
            os.close(self._runner_lock)  # releases the lock
            self._runner_lock = None

    def stop_signal(self, batch_id: str) -> asyncio.Event:
        return self._stops.setdefault(batch_id, asyncio.Event())

    def forget_stop_signal(self, batch_id: str) -> None:
        self._stops.pop(batch_id, None)

    # -- files ----------------------------------------------------------------------------------

    async def upload(
        self,
        owner: Owner,
        *,
        filename: str,
        purpose: str,
        source: BinaryIO,
        expires_after_s: int | None,
    ) -> FileObject:
        if purpose != "batch":
            raise InvalidRequest(
                f"Invalid value for 'purpose': {purpose!r}. This server accepts files for the "
                "Batch API only: use purpose 'batch'.",
                param="purpose",
            )
        if expires_after_s is not None and not MIN_FILE_TTL_S <= expires_after_s <= MAX_FILE_TTL_S:
            raise InvalidRequest(
                f"Invalid value for 'expires_after[seconds]': {expires_after_s}. It must be "
                f"between {MIN_FILE_TTL_S} and {MAX_FILE_TTL_S}.",
                param="expires_after",
            )
        ttl_s = expires_after_s if expires_after_s is not None else DEFAULT_FILE_TTL_S
        record = await asyncio.to_thread(self._save, owner, filename, source, ttl_s)
        logger.info("file %s uploaded: %d bytes, %d lines", record.id, record.bytes, record.lines)
        return file_object(record)

    def _save(self, owner: Owner, filename: str, source: BinaryIO, ttl_s: int) -> FileRecord:
        store = self.store()
        file_id = new_id("file-")
        partial = store.partial_path(file_id)
        size = lines = 0
        try:
            with partial.open("wb") as out:
                for line in source:  # a line at most the whole (bounded) upload
                    size += len(line)
                    if size > self.limits.max_file_bytes:
                        raise InvalidRequest(
                            f"The file is too large: more than {self.limits.max_file_bytes} "
                            "bytes were sent, the limit for a batch input file.",
                            param="file",
                            code="file_too_large",
                        )
                    if line.strip():
                        lines += 1
                        if lines > self.limits.max_lines:
                            raise InvalidRequest(
                                f"The file has more than {self.limits.max_lines} requests, the "
                                "limit for one batch input file. Split it into several batches.",
                                param="file",
                                code="too_many_lines",
                            )
                    out.write(line)
                out.flush()
                os.fsync(out.fileno())
            partial.replace(store.file_path(file_id))
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        created = now_s()
        record = FileRecord(
            id=file_id,
            owner=owner.id,
            purpose="batch",
            filename=filename,
            bytes=size,
            lines=lines,
            created_at=created,
            expires_at=created + ttl_s,
        )
        store.add_file(record)
        return record

    async def retrieve_file(self, owner: Owner, file_id: str) -> FileObject:
        return file_object(await self._file(owner, file_id))

    async def file_content(self, owner: Owner, file_id: str) -> Path:
        record = await self._file(owner, file_id)
        store = await asyncio.to_thread(self.store)
        return store.file_path(record.id)

    async def list_files(
        self,
        owner: Owner,
        *,
        purpose: str | None,
        limit: int,
        order: str,
        after: str | None,
    ) -> FileList:
        _check_limit(limit, 10_000)
        if order not in ("asc", "desc"):
            raise InvalidRequest(
                f"Invalid value for 'order': {order!r}; use 'asc' or 'desc'.", param="order"
            )
        store = await asyncio.to_thread(self.existing_store)
        if store is None:
            return FileList(data=[], first_id=None, last_id=None, has_more=False)
        records, more = await asyncio.to_thread(
            store.list_files,
            owner.id,
            purpose=purpose,
            limit=limit,
            order=cast(Literal["asc", "desc"], order),
            after=after,
        )
        data = [file_object(record) for record in records]
        return FileList(
            data=data,
            first_id=data[0].id if data else None,
            last_id=data[-1].id if data else None,
            has_more=more,
        )

    async def delete_file(self, owner: Owner, file_id: str) -> FileDeleted:
        store = await asyncio.to_thread(self.existing_store)
        if store is None or not await asyncio.to_thread(store.delete_file, owner.id, file_id):
            raise _no_file(file_id)
        return FileDeleted(id=file_id, deleted=True)

    async def _file(self, owner: Owner, file_id: str) -> FileRecord:
        store = await asyncio.to_thread(self.existing_store)
        record = None
        if store is not None:
            record = await asyncio.to_thread(store.get_file, owner.id, file_id)
        if record is None:
            raise _no_file(file_id)
        return record

    # -- batches --------------------------------------------------------------------------------

    async def create_batch(self, owner: Owner, request: CreateBatchRequest) -> BatchObject:
        if request.endpoint not in BATCH_ENDPOINTS:
            raise InvalidRequest(
                f"Invalid value for 'endpoint': {request.endpoint!r}. This server runs batches "
                f"of {' and '.join(repr(endpoint) for endpoint in BATCH_ENDPOINTS)} only.",
                param="endpoint",
            )
        if request.completion_window != COMPLETION_WINDOW:
            raise InvalidRequest(
                f"Invalid value for 'completion_window': {request.completion_window!r}. "
                f"Supported values are: {COMPLETION_WINDOW!r}.",
                param="completion_window",
            )
        source = await self._file(owner, request.input_file_id)
        if source.purpose != "batch":
            raise InvalidRequest(
                f"The file {source.id} has purpose {source.purpose!r}; a batch's input file "
                "must be uploaded with purpose 'batch'.",
                param="input_file_id",
            )
        if source.lines > self.limits.max_lines:
            raise InvalidRequest(
                f"The file {source.id} has {source.lines} requests; at most "
                f"{self.limits.max_lines} are allowed in one batch.",
                param="input_file_id",
                code="too_many_lines",
            )
        created = now_s()
        ttl = request.output_expires_after.seconds if request.output_expires_after else None
        record = BatchRecord(
            id=new_id("batch_"),
            owner=owner.id,
            endpoint=request.endpoint,
            input_file_id=source.id,
            completion_window=request.completion_window,
            status="validating",
            created_at=created,
            expires_at=created + COMPLETION_WINDOW_S,
            output_ttl_s=ttl or DEFAULT_FILE_TTL_S,
            total=source.lines,
            metadata=json.dumps(request.metadata) if request.metadata is not None else None,
            allowed_models=json.dumps(sorted(owner.models)) if owner.models is not None else None,
        )
        await asyncio.to_thread(self._add_batch, record)
        logger.info("batch %s created from %s (%d lines)", record.id, source.id, source.lines)
        self.wake.set()
        return batch_object(record)

    def _add_batch(self, record: BatchRecord) -> None:
        store = self.store()
        job = store.job_path(record.id)
        try:  # a hard link: the job keeps its input even when the file is deleted
            os.link(store.file_path(record.input_file_id), job)
        except OSError:
            shutil.copyfile(store.file_path(record.input_file_id), job)
        store.add_batch(record)

    async def retrieve_batch(self, owner: Owner, batch_id: str) -> BatchObject:
        return batch_object(await self._batch(owner, batch_id))

    async def list_batches(self, owner: Owner, *, limit: int, after: str | None) -> BatchList:
        _check_limit(limit, 100)
        store = await asyncio.to_thread(self.existing_store)
        if store is None:
            return BatchList(data=[], has_more=False)
        records, more = await asyncio.to_thread(
            store.list_batches, owner.id, limit=limit, after=after
        )
        data = [batch_object(record) for record in records]
        return BatchList(
            data=data,
            first_id=data[0].id if data else None,
            last_id=data[-1].id if data else None,
            has_more=more,
        )

    async def cancel_batch(self, owner: Owner, batch_id: str) -> BatchObject:
        record = await self._batch(owner, batch_id)
        if record.status == "cancelling":
            return batch_object(record)
        store = await asyncio.to_thread(self.store)
        updated = await asyncio.to_thread(
            store.update_batch,
            record.id,
            when_status=("validating", "in_progress"),
            status="cancelling",
            cancelling_at=now_s(),
        )
        if updated is None:
            current = await self._batch(owner, batch_id)
            if current.status == "cancelling":
                return batch_object(current)
            raise Conflict(
                f"Cannot cancel a batch with status '{current.status}'.", param="batch_id"
            )
        logger.info("batch %s cancelling", record.id)
        # The running job's stop signal; set before the job takes it, it stops the job at once.
        self.stop_signal(record.id).set()
        self.wake.set()
        return batch_object(updated)

    async def _batch(self, owner: Owner, batch_id: str) -> BatchRecord:
        store = await asyncio.to_thread(self.existing_store)
        record = None if store is None else await asyncio.to_thread(
            store.get_batch, batch_id, owner.id
        )  # fmt: skip
        if record is None:
            raise ObjectNotFound(f"No batch found with id '{batch_id}'.", param="batch_id")
        return record


def _no_file(file_id: str) -> ObjectNotFound:
    return ObjectNotFound(f"No such File object: {file_id}", param="file_id")


def _check_limit(limit: int, most: int) -> None:
    if not 1 <= limit <= most:
        raise InvalidRequest(
            f"Invalid value for 'limit': {limit}. It must be between 1 and {most}.", param="limit"
        )


def file_object(record: FileRecord) -> FileObject:
    return FileObject(
        id=record.id,
        bytes=record.bytes,
        created_at=record.created_at,
        expires_at=record.expires_at,
        filename=record.filename,
        purpose=cast(FilePurpose, record.purpose),
    )


def batch_object(record: BatchRecord) -> BatchObject:
    errors = (
        BatchErrors(data=[BatchError(**item) for item in json.loads(record.errors)])
        if record.errors
        else None
    )
    return BatchObject(
        id=record.id,
        endpoint=record.endpoint,
        model=record.model,
        errors=errors,
        input_file_id=record.input_file_id,
        completion_window=record.completion_window,
        status=cast(BatchStatus, record.status),
        output_file_id=record.output_file_id,
        error_file_id=record.error_file_id,
        created_at=record.created_at,
        in_progress_at=record.in_progress_at,
        expires_at=record.expires_at,
        finalizing_at=record.finalizing_at,
        completed_at=record.completed_at,
        failed_at=record.failed_at,
        expired_at=record.expired_at,
        cancelling_at=record.cancelling_at,
        cancelled_at=record.cancelled_at,
        request_counts=RequestCounts(
            total=record.total, completed=record.completed, failed=record.failed
        ),
        metadata=json.loads(record.metadata) if record.metadata else None,
    )
