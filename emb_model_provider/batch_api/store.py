"""The Batch API's embedded store: SQLite (WAL) for files, batches and finished lines, plain files
on disk for the file contents. Everything a job needs to resume after a restart or a SIGKILL is
here; nothing is kept only in memory.

Layout under the data directory::

    batches.sqlite3      files, batches, and one row per finished line (results)
    files/<file id>      the bytes of each uploaded or produced file
    jobs/<batch id>      a hard link to a running batch's input file, so that deleting the input
                         file (as OpenAI allows) does not pull it from under the job

A finished line is one ``INSERT OR IGNORE`` keyed by (batch, line) in the same transaction as its
counter update, so a line recorded twice (a retry after a restart) is counted and written once.
WAL with ``synchronous=NORMAL``: a commit survives the process being killed (it is in the OS's
page cache); a power cut may lose the last commits, which are then run again.

Every method blocks (disk, SQLite): callers on the event loop use ``asyncio.to_thread``. One
connection, serialised by a lock, serves all threads.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    owner TEXT NOT NULL,
    purpose TEXT NOT NULL,
    filename TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    lines INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER
);
CREATE INDEX IF NOT EXISTS files_owner ON files (owner, seq);
CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    owner TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    input_file_id TEXT NOT NULL,
    completion_window TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    in_progress_at INTEGER,
    finalizing_at INTEGER,
    completed_at INTEGER,
    failed_at INTEGER,
    expired_at INTEGER,
    cancelling_at INTEGER,
    cancelled_at INTEGER,
    output_file_id TEXT,
    error_file_id TEXT,
    total INTEGER NOT NULL DEFAULT 0,
    completed INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    errors TEXT,
    metadata TEXT,
    model TEXT,
    allowed_models TEXT,
    output_ttl_s INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS batches_owner ON batches (owner, seq);
CREATE TABLE IF NOT EXISTS results (
    batch_id TEXT NOT NULL,
    line INTEGER NOT NULL,
    ok INTEGER NOT NULL,
    payload BLOB NOT NULL,
    PRIMARY KEY (batch_id, line)
) WITHOUT ROWID;
"""

ACTIVE_STATUSES = ("validating", "in_progress", "finalizing", "cancelling")


@dataclass(frozen=True)
class FileRecord:
    id: str
    owner: str
    purpose: str
    filename: str
    bytes: int
    lines: int
    created_at: int
    expires_at: int | None


@dataclass(frozen=True)
class BatchRecord:
    id: str
    owner: str
    endpoint: str
    input_file_id: str
    completion_window: str
    status: str
    created_at: int
    expires_at: int
    output_ttl_s: int
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    total: int = 0
    completed: int = 0
    failed: int = 0
    #: JSON of the ``errors.data`` list when validation failed.
    errors: str | None = None
    #: JSON of the caller's metadata object.
    metadata: str | None = None
    model: str | None = None
    #: JSON list of the model names the uploader's key may use; None: every model.
    allowed_models: str | None = None


_FILE_COLUMNS = tuple(field.name for field in fields(FileRecord))
_BATCH_COLUMNS = tuple(field.name for field in fields(BatchRecord))


class BatchStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.files_dir = root / "files"
        self.jobs_dir = root / "jobs"
        root.mkdir(parents=True, exist_ok=True, mode=0o700)  # users' data: the owner's only
        self.files_dir.mkdir(exist_ok=True)
        self.jobs_dir.mkdir(exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(
            root / "batches.sqlite3", check_same_thread=False, isolation_level=None
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return list(self._db.execute(sql, params).fetchall())

    def sweep(self, min_age_s: float = 600) -> None:
        """Remove what a crash left behind: half-written files, and files written for a batch
        whose finishing transaction never committed (it is finished again). Only the process
        that runs the jobs calls it, before it runs any; files younger than ``min_age_s`` are
        left alone, as an upload may be writing one right now."""
        known = {row[0] for row in self._query("SELECT id FROM files")}
        active = {row[0] for row in self._query(
            f"SELECT id FROM batches WHERE status IN {ACTIVE_STATUSES}"
        )}  # fmt: skip
        oldest = time.time() - min_age_s
        for folder, keep in ((self.files_dir, known), (self.jobs_dir, active)):
            for path in folder.iterdir():
                with contextlib.suppress(FileNotFoundError):
                    # ctime: a new hard link (a job's input) changes it, not the mtime.
                    if path.name not in keep and path.stat().st_ctime < oldest:
                        path.unlink()

    # -- paths ----------------------------------------------------------------------------------

    def file_path(self, file_id: str) -> Path:
        return self.files_dir / file_id

    def partial_path(self, file_id: str) -> Path:
        """Where a file is written before it is complete (``sweep`` removes leftovers)."""
        return self.files_dir / f"{file_id}.part"

    def job_path(self, batch_id: str) -> Path:
        return self.jobs_dir / batch_id

    # -- files ----------------------------------------------------------------------------------

    def add_file(self, record: FileRecord) -> None:
        columns = ", ".join(_FILE_COLUMNS)
        marks = ", ".join("?" for _ in _FILE_COLUMNS)
        with self._transaction() as db:
            db.execute(
                f"INSERT INTO files ({columns}) VALUES ({marks})",
                tuple(getattr(record, name) for name in _FILE_COLUMNS),
            )

    def get_file(self, owner: str, file_id: str) -> FileRecord | None:
        rows = self._query(
            f"SELECT {', '.join(_FILE_COLUMNS)} FROM files WHERE id = ? AND owner = ?",
            (file_id, owner),
        )
        return FileRecord(*rows[0]) if rows else None

    def list_files(
        self,
        owner: str,
        *,
        purpose: str | None,
        limit: int,
        order: Literal["asc", "desc"],
        after: str | None,
    ) -> tuple[list[FileRecord], bool]:
        """A page of the owner's files and whether more follow it."""
        sql = f"SELECT {', '.join(_FILE_COLUMNS)} FROM files WHERE owner = ?"
        params: list[Any] = [owner]
        if purpose is not None:
            sql += " AND purpose = ?"
            params.append(purpose)
        if after is not None:
            sql += f" AND seq {'<' if order == 'desc' else '>'} "
            sql += "COALESCE((SELECT seq FROM files WHERE id = ? AND owner = ?), -1)"
            params += [after, owner]
        sql += f" ORDER BY seq {'DESC' if order == 'desc' else 'ASC'} LIMIT ?"
        params.append(limit + 1)
        rows = [FileRecord(*row) for row in self._query(sql, tuple(params))]
        return rows[:limit], len(rows) > limit

    def delete_file(self, owner: str, file_id: str) -> bool:
        with self._transaction() as db:
            deleted = db.execute(
                "DELETE FROM files WHERE id = ? AND owner = ?", (file_id, owner)
            ).rowcount
        if deleted:
            self.file_path(file_id).unlink(missing_ok=True)
        return bool(deleted)

    def expired_files(self, now: int) -> list[tuple[str, str]]:
        """(owner, id) of files past their expiry."""
        rows = self._query(
            "SELECT owner, id FROM files WHERE expires_at IS NOT NULL AND expires_at <= ?", (now,)
        )
        return [(str(owner), str(file_id)) for owner, file_id in rows]

    # -- batches --------------------------------------------------------------------------------

    def add_batch(self, record: BatchRecord) -> None:
        columns = ", ".join(_BATCH_COLUMNS)
        marks = ", ".join("?" for _ in _BATCH_COLUMNS)
        with self._transaction() as db:
            db.execute(
                f"INSERT INTO batches ({columns}) VALUES ({marks})",
                tuple(getattr(record, name) for name in _BATCH_COLUMNS),
            )

    def get_batch(self, batch_id: str, owner: str | None = None) -> BatchRecord | None:
        """The batch; with ``owner``, only when it is theirs."""
        sql = f"SELECT {', '.join(_BATCH_COLUMNS)} FROM batches WHERE id = ?"
        params: tuple[Any, ...] = (batch_id,)
        if owner is not None:
            sql += " AND owner = ?"
            params = (batch_id, owner)
        rows = self._query(sql, params)
        return BatchRecord(*rows[0]) if rows else None

    def list_batches(
        self, owner: str, *, limit: int, after: str | None
    ) -> tuple[list[BatchRecord], bool]:
        """A page of the owner's batches, newest first, and whether more follow it."""
        sql = f"SELECT {', '.join(_BATCH_COLUMNS)} FROM batches WHERE owner = ?"
        params: list[Any] = [owner]
        if after is not None:
            sql += " AND seq < COALESCE((SELECT seq FROM batches WHERE id = ? AND owner = ?), -1)"
            params += [after, owner]
        sql += " ORDER BY seq DESC LIMIT ?"
        params.append(limit + 1)
        rows = [BatchRecord(*row) for row in self._query(sql, tuple(params))]
        return rows[:limit], len(rows) > limit

    def active_batches(self) -> list[BatchRecord]:
        """Batches that still have work, oldest first."""
        rows = self._query(
            f"SELECT {', '.join(_BATCH_COLUMNS)} FROM batches "
            f"WHERE status IN {ACTIVE_STATUSES} ORDER BY seq"
        )
        return [BatchRecord(*row) for row in rows]

    def update_batch(
        self, batch_id: str, *, when_status: tuple[str, ...] | None = None, **values: Any
    ) -> BatchRecord | None:
        """Set columns of a batch; with ``when_status``, only while its status is one of them.
        Returns the batch as it now is, or None when the condition did not hold."""
        unknown = set(values) - set(_BATCH_COLUMNS)
        if unknown:
            raise ValueError(f"unknown batch columns: {sorted(unknown)}")
        assignments = ", ".join(f"{name} = ?" for name in values)
        sql = f"UPDATE batches SET {assignments} WHERE id = ?"
        params: list[Any] = [*values.values(), batch_id]
        if when_status is not None:
            sql += f" AND status IN ({', '.join('?' for _ in when_status)})"
            params += list(when_status)
        with self._transaction() as db:
            if db.execute(sql, tuple(params)).rowcount == 0:
                return None
        return self.get_batch(batch_id)

    # -- finished lines -------------------------------------------------------------------------

    def record_result(self, batch_id: str, line: int, *, ok: bool, payload: bytes) -> bool:
        """Record one finished line and count it, unless it was recorded already."""
        with self._transaction() as db:
            inserted = db.execute(
                "INSERT OR IGNORE INTO results (batch_id, line, ok, payload) VALUES (?, ?, ?, ?)",
                (batch_id, line, int(ok), payload),
            ).rowcount
            if inserted:
                column = "completed" if ok else "failed"
                db.execute(f"UPDATE batches SET {column} = {column} + 1 WHERE id = ?", (batch_id,))
        return bool(inserted)

    def done_lines(self, batch_id: str) -> set[int]:
        return {row[0] for row in self._query(
            "SELECT line FROM results WHERE batch_id = ?", (batch_id,)
        )}  # fmt: skip

    def results(self, batch_id: str, *, ok: bool, page: int = 512) -> Iterator[bytes]:
        """The recorded lines of one kind in line order, read a page at a time."""
        last = -1
        while True:
            rows = self._query(
                "SELECT line, payload FROM results WHERE batch_id = ? AND ok = ? AND line > ? "
                "ORDER BY line LIMIT ?",
                (batch_id, int(ok), last, page),
            )
            if not rows:
                return
            for line, payload in rows:
                yield bytes(payload)
                last = line

    def finish_batch(
        self, batch: BatchRecord, new_files: list[FileRecord], **values: Any
    ) -> BatchRecord:
        """One transaction: the output and error files, the batch's final state, and its
        finished lines dropped (the files hold them now)."""
        final = replace(batch, **values)
        file_columns = ", ".join(_FILE_COLUMNS)
        marks = ", ".join("?" for _ in _FILE_COLUMNS)
        assignments = ", ".join(f"{name} = ?" for name in values)
        with self._transaction() as db:
            for record in new_files:
                db.execute(
                    f"INSERT INTO files ({file_columns}) VALUES ({marks})",
                    tuple(getattr(record, name) for name in _FILE_COLUMNS),
                )
            db.execute(
                f"UPDATE batches SET {assignments} WHERE id = ?", (*values.values(), batch.id)
            )
            db.execute("DELETE FROM results WHERE batch_id = ?", (batch.id,))
        self.job_path(batch.id).unlink(missing_ok=True)
        return self.get_batch(batch.id) or final
