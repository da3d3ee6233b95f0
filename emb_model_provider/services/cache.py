"""The embedding result cache: per input, in front of the batcher.

- The key is a SHA-256 of everything that decides a vector: the model's name, a fingerprint of
  its weights (hub commit, package version or a digest of the files, taken at load), modality,
  the truncation length, flag and side (when ``left``), a request's token cap (when set),
  pooling, the dtype it runs in, and the exact input (text after token-array decoding, image
  bytes after fetching). A changed model gets new keys, so it never answers with the old
  vectors.
- The value is the model's raw pooled vector (float32, full length) and the input's token count:
  ``dimensions``, L2 normalisation and ``encoding_format`` are applied after the cache, so one
  entry serves every variant, both image paths (normalised or raw) stay bit-identical to an
  uncached answer, and ``usage`` counts every input without tokenising the cached ones.
- Backends: ``memory`` (an LRU bounded by bytes and optionally entries, with honest accounting
  of keys, values and per-entry overhead) and ``redis`` (shared by replicas: binary values with a
  TTL under a per-deployment prefix, one MGET and one pipelined SET per request). A Redis that
  fails or is slow never fails a request: the error is counted, logged once per outage, and the
  backend is skipped with growing back-off (a circuit breaker) until it answers again.
- Identical inputs that are being computed are computed once per process: a later request waits
  for the first one (``resolve``). When the first one fails or is cancelled, the waiter computes
  its inputs itself, so a request never inherits another request's error.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.metadata
import json
import logging
import re
import struct
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, TypeVar

import numpy as np

from emb_model_provider.core import tracing
from emb_model_provider.core.vectors import Vectors
from emb_model_provider.encoders.base import EncoderInput
from emb_model_provider.encoders.sources import PACKAGE_SOURCE_PREFIX, resolve_source
from emb_model_provider.registry import ModelSpec

logger = logging.getLogger(__name__)

CacheBackendName = Literal["memory", "redis", "off"]
_T = TypeVar("_T")

#: Bumped when the key or value layout changes, so old entries are never misread.
_KEY_VERSION = b"emb-cache-v1"
#: Value layout: token count (uint32, little-endian), then the float32 vector, little-endian.
_HEADER = struct.Struct("<I")
#: Per entry, beyond the key, value and entry objects: the dict slot and the LRU list node of an
#: OrderedDict (measured with tracemalloc on CPython 3.11: ~100 bytes).
_SLOT_BYTES = 112
#: Inputs hashed on the event loop up to this many bytes in total; more go to a worker thread.
_INLINE_HASH_BYTES = 1 << 20
#: Files hashed whole up to this size; larger ones by their size and 64 evenly spread 64 KiB
#: samples (a 28 GB checkpoint must not take half a minute to fingerprint on every load).
_FULL_HASH_BYTES = 64 << 20
_SAMPLES = 64
_SAMPLE_BYTES = 64 << 10


@dataclass(frozen=True, slots=True)
class CachedVector:
    """A model's raw pooled vector (float32 little-endian bytes) and the input's token count."""

    vector: bytes
    n_tokens: int

    @classmethod
    def of(cls, row: Vectors, n_tokens: int) -> CachedVector:
        return cls(np.ascontiguousarray(row, dtype="<f4").tobytes(), n_tokens)

    def array(self) -> Vectors:
        return np.frombuffer(self.vector, dtype="<f4")

    def encode(self) -> bytes:
        return _HEADER.pack(self.n_tokens) + self.vector

    @classmethod
    def decode(cls, raw: bytes, dimensions: int) -> CachedVector | None:
        """None when ``raw`` is not a value of this layout and length (a foreign or torn value)."""
        if len(raw) != _HEADER.size + 4 * dimensions:
            return None
        (n_tokens,) = _HEADER.unpack_from(raw)
        return cls(raw[_HEADER.size :], n_tokens)


# -- backends ------------------------------------------------------------------------------------


class CacheBackend(Protocol):
    name: CacheBackendName
    stats: BackendStats

    async def get_many(self, keys: Sequence[bytes], dimensions: int) -> list[CachedVector | None]:
        """One entry or None per key; never raises (a failing store reads as misses)."""
        ...

    async def set_many(self, items: Sequence[tuple[bytes, CachedVector]]) -> None:
        """Store the entries; never raises."""
        ...

    def status(self) -> dict[str, object]: ...

    async def aclose(self) -> None: ...


@dataclass
class BackendStats:
    evictions: int = 0
    errors: int = 0
    #: Lookups and stores not sent because the breaker was open (Redis down).
    skipped: int = 0


class MemoryBackend:
    """An LRU in this process, bounded by bytes (keys, values and their overhead) and optionally
    by entries. An entry larger than the whole budget is not stored."""

    name: CacheBackendName = "memory"

    def __init__(self, *, max_bytes: int, max_entries: int = 0) -> None:
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self.stats = BackendStats()
        self._entries: OrderedDict[bytes, CachedVector] = OrderedDict()
        self._bytes = 0

    @property
    def bytes_held(self) -> int:
        return self._bytes

    @property
    def entries(self) -> int:
        return len(self._entries)

    @staticmethod
    def entry_bytes(key: bytes, entry: CachedVector) -> int:
        return (
            sys.getsizeof(key)
            + sys.getsizeof(entry.vector)
            + sys.getsizeof(entry)
            + sys.getsizeof(entry.n_tokens)
            + _SLOT_BYTES
        )

    async def get_many(self, keys: Sequence[bytes], dimensions: int) -> list[CachedVector | None]:
        found: list[CachedVector | None] = []
        for key in keys:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            found.append(entry)
        return found

    async def set_many(self, items: Sequence[tuple[bytes, CachedVector]]) -> None:
        for key, entry in items:
            size = self.entry_bytes(key, entry)
            if size > self.max_bytes:
                continue
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= self.entry_bytes(key, old)
            self._entries[key] = entry
            self._bytes += size
            while self._bytes > self.max_bytes or (
                self.max_entries and len(self._entries) > self.max_entries
            ):
                victim, dropped = self._entries.popitem(last=False)
                self._bytes -= self.entry_bytes(victim, dropped)
                self.stats.evictions += 1

    def status(self) -> dict[str, object]:
        return {
            "entries": len(self._entries),
            "bytes": self._bytes,
            "max_bytes": self.max_bytes,
            "max_entries": self.max_entries or None,
            "evictions": self.stats.evictions,
        }

    async def aclose(self) -> None:
        self._entries.clear()
        self._bytes = 0


@dataclass
class _Breaker:
    """Closed while Redis answers; after a failure, open for a back-off that doubles per failed
    retry (``base_s`` to ``max_s``), then one call tries again."""

    base_s: float
    max_s: float
    down_since: float | None = None
    retry_at: float = 0.0
    backoff_s: float = 0.0

    def allows(self, now: float) -> bool:
        return self.down_since is None or now >= self.retry_at

    def failed(self, now: float) -> bool:
        """Record a failure; True when it starts an outage (the one to log)."""
        starts = self.down_since is None
        if starts:
            self.down_since = now
            self.backoff_s = self.base_s
        else:
            self.backoff_s = min(self.max_s, self.backoff_s * 2)
        self.retry_at = now + self.backoff_s
        return starts

    def succeeded(self) -> float | None:
        """Record a success; the outage's length in seconds when one ends."""
        if self.down_since is None:
            return None
        lasted = time.monotonic() - self.down_since
        self.down_since = None
        self.backoff_s = 0.0
        return lasted


class RedisBackend:
    """Entries in Redis under ``prefix`` + hex key, with a TTL, shared by every replica."""

    name: CacheBackendName = "redis"

    def __init__(
        self,
        url: str,
        *,
        prefix: str,
        ttl_s: int,
        timeout_s: float,
        backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
    ) -> None:
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self.stats = BackendStats()
        self._prefix = prefix.encode()
        self._ttl_s = ttl_s
        self._timeout_s = timeout_s
        self._display_url = _redact(url)
        # No retries inside the client: a failure goes to the breaker at once, and the request
        # computes its vectors instead of waiting on retries.
        self._client = Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
        )
        self._breaker = _Breaker(base_s=backoff_s, max_s=max_backoff_s)

    def _key(self, key: bytes) -> bytes:
        return self._prefix + key.hex().encode()

    async def get_many(self, keys: Sequence[bytes], dimensions: int) -> list[CachedVector | None]:
        if not keys:
            return []
        raw = await self._call("get", self._mget, [self._key(key) for key in keys])
        if raw is None:
            return [None] * len(keys)
        found: list[CachedVector | None] = []
        for value in raw:
            entry = CachedVector.decode(value, dimensions) if isinstance(value, bytes) else None
            if entry is None and value is not None:
                self.stats.errors += 1  # a value of another layout under our prefix
            found.append(entry)
        return found

    async def set_many(self, items: Sequence[tuple[bytes, CachedVector]]) -> None:
        if items:
            await self._call(
                "set", self._pipelined_set, [(self._key(k), e.encode()) for k, e in items]
            )

    async def _mget(self, keys: list[bytes]) -> list[object]:
        values = await self._client.mget(keys)
        return list(values)

    async def _pipelined_set(self, items: list[tuple[bytes, bytes]]) -> list[object]:
        async with self._client.pipeline(transaction=False) as pipe:
            for key, value in items:
                pipe.set(key, value, ex=self._ttl_s or None)
            results: list[object] = await pipe.execute()
            return results

    async def _call(
        self, what: str, operation: Callable[[_T], Awaitable[list[object]]], argument: _T
    ) -> list[object] | None:
        if not self._breaker.allows(time.monotonic()):
            self.stats.skipped += 1
            return None
        try:
            # The socket timeouts bound each read; this bounds the whole call (pool, connect).
            async with asyncio.timeout(self._timeout_s * 2):
                result = await operation(argument)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001  # any failure of the store: count it, go on
            self.stats.errors += 1
            if self._breaker.failed(time.monotonic()):
                logger.warning(
                    "result cache: Redis at %s failed (%s: %s); computing vectors without it, "
                    "retrying with back-off",
                    self._display_url,
                    type(exc).__name__,
                    exc or "timed out",
                )
            else:
                logger.debug("result cache: Redis %s failed again: %r", what, exc)
            return None
        lasted = self._breaker.succeeded()
        if lasted is not None:
            logger.info(
                "result cache: Redis at %s answers again after %.1f s", self._display_url, lasted
            )
        return result

    @property
    def up(self) -> bool:
        return self._breaker.down_since is None

    def status(self) -> dict[str, object]:
        return {
            "url": self._display_url,
            "prefix": self._prefix.decode(),
            "ttl_s": self._ttl_s or None,
            "state": "up" if self.up else "down",
            "skipped": self.stats.skipped,
        }

    async def aclose(self) -> None:
        try:
            await self._client.aclose()
        except Exception:  # closing a client whose server is gone
            logger.debug("result cache: closing the Redis client failed", exc_info=True)


def _redact(url: str) -> str:
    """The URL without its password, for logs and /api/status."""
    return re.sub(r"//([^:/@]*):[^@/]*@", r"//\1:***@", url)


# -- the cache -----------------------------------------------------------------------------------


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    #: Inputs answered by another computation of the same input: a duplicate in the request, or
    #: a concurrent request computing it already.
    coalesced: int = 0


@dataclass(frozen=True)
class CacheScope:
    """One loaded model's part of the key space."""

    #: SHA-256 of the model's key context (name, weights, options).
    context: bytes
    dimensions: int

    def keys(self, data: Sequence[EncoderInput]) -> list[bytes]:
        keys: list[bytes] = []
        for item in data:
            hasher = hashlib.sha256(self.context)
            if isinstance(item, str):
                hasher.update(b"t")
                # Lone surrogates can arrive through JSON escapes; they must hash, not raise.
                hasher.update(item.encode("utf-8", "surrogatepass"))
            elif isinstance(item, tuple):  # a reranker's (query, document): length-prefixed
                hasher.update(b"p")
                for text in item:
                    encoded = text.encode("utf-8", "surrogatepass")
                    hasher.update(struct.pack("<Q", len(encoded)))
                    hasher.update(encoded)
            else:
                hasher.update(b"b")
                hasher.update(item)
            keys.append(hasher.digest())
        return keys


Compute = Callable[[list[int], int], Awaitable[list[CachedVector]]]


class _Abandoned(Exception):
    """The request computing an input failed or went away; waiters compute it themselves."""


class ResultCache:
    def __init__(self, backend: CacheBackend | None) -> None:
        self.backend = backend
        self.stats = CacheStats()
        #: In-process computations under way, by key.
        self._flights: dict[bytes, asyncio.Future[CachedVector]] = {}

    @property
    def enabled(self) -> bool:
        return self.backend is not None

    @staticmethod
    def scope(
        spec: ModelSpec,
        *,
        fingerprint: str,
        modality: str,
        dimensions: int,
        max_input_tokens: int,
        truncate: bool,
        placement: str,
        prompt: str | None = None,
        route: str | None = None,
        truncation_side: str | None = None,
        max_tokens: int | None = None,
    ) -> CacheScope:
        context = {
            "model": spec.name,
            "weights": fingerprint,
            "modality": modality,
            "max_input_tokens": max_input_tokens,
            "truncate": truncate,
            "pooling": spec.pooling,
            # The text the model saw begins with the prompt.
            "prompt": prompt,
            # Vectors differ in their last bits between dtypes (float16 on CUDA, float32 on
            # CPU); the device index does not matter.
            "dtype": re.sub(r":\d+", "", placement),
        }
        if route is not None:  # a Router's routes run different modules on the same text
            context["route"] = route
        if truncation_side == "left":
            # Cut from the start: other tokens than the default side's. Only this side adds to
            # the key, so that keys from before sides were chosen stay valid.
            context["truncation_side"] = truncation_side
        if max_tokens is not None:
            # A request's cap below the model's limit: other tokens, or refusals (truncation
            # off). Only a cap adds to the key, so that uncapped keys stay valid.
            context["max_tokens"] = max_tokens
        digest = hashlib.sha256(_KEY_VERSION)
        digest.update(json.dumps(context, sort_keys=True).encode())
        return CacheScope(digest.digest(), dimensions)

    async def keys(self, scope: CacheScope, data: Sequence[EncoderInput]) -> list[bytes]:
        size = sum(
            len(item) if not isinstance(item, tuple) else len(item[0]) + len(item[1])
            for item in data
        )
        if size <= _INLINE_HASH_BYTES:
            return scope.keys(data)
        return await asyncio.to_thread(scope.keys, data)

    async def resolve(
        self, scope: CacheScope, keys: Sequence[bytes], compute: Compute
    ) -> list[CachedVector]:
        """An entry per key: from the backend, from a computation under way, or from
        ``compute(indices, tokens_known)``, which embeds ``data[indices]`` (the first input of
        each distinct missing key) knowing the tokens of the inputs already found."""
        assert self.backend is not None
        results: list[CachedVector | None] = [None] * len(keys)
        positions: dict[bytes, list[int]] = {}
        for index, key in enumerate(keys):
            positions.setdefault(key, []).append(index)
        distinct = list(positions)
        with tracing.leaf("cache.lookup", {"emb.inputs": len(keys)}) as current:
            found = await self.backend.get_many(distinct, scope.dimensions)
            known_tokens = 0
            hits = 0
            lead: list[bytes] = []
            wait: dict[bytes, asyncio.Future[CachedVector]] = {}
            for key, entry in zip(distinct, found, strict=True):
                if entry is not None:
                    for index in positions[key]:
                        results[index] = entry
                    hits += len(positions[key])
                    known_tokens += entry.n_tokens * len(positions[key])
                elif (future := self._flights.get(key)) is not None:
                    wait[key] = future
                    self.stats.coalesced += len(positions[key])
                else:
                    lead.append(key)
                    self.stats.misses += 1
                    self.stats.coalesced += len(positions[key]) - 1
            self.stats.hits += hits
            if current is not None:
                # Inputs found, inputs not found, and of these the distinct ones this request
                # computes (the others repeat one of them or wait on another request's).
                current.set_attributes(
                    {
                        "emb.cache.hits": hits,
                        "emb.cache.misses": len(keys) - hits,
                        "emb.cache.computed": len(lead),
                    }
                )
        if lead:
            await self._lead(lead, positions, results, known_tokens, compute)
        if wait:
            await self._follow(wait, positions, results, compute)
        entries = [entry for entry in results if entry is not None]
        assert len(entries) == len(keys)
        return entries

    async def _lead(
        self,
        lead: list[bytes],
        positions: dict[bytes, list[int]],
        results: list[CachedVector | None],
        known_tokens: int,
        compute: Compute,
    ) -> None:
        loop = asyncio.get_running_loop()
        mine: dict[bytes, asyncio.Future[CachedVector]] = {}
        for key in lead:
            mine[key] = self._flights[key] = loop.create_future()
        try:
            computed = await compute([positions[key][0] for key in lead], known_tokens)
            for key, entry in zip(lead, computed, strict=True):
                mine[key].set_result(entry)
                for index in positions[key]:
                    results[index] = entry
            # Until the store has them, later requests find the finished flights instead.
            assert self.backend is not None
            await self.backend.set_many(list(zip(lead, computed, strict=True)))
        finally:
            for key, future in mine.items():
                if not future.done():
                    future.set_exception(_Abandoned())
                    future.exception()  # retrieved: no "never retrieved" warning without waiters
                if self._flights.get(key) is future:
                    del self._flights[key]

    async def _follow(
        self,
        wait: dict[bytes, asyncio.Future[CachedVector]],
        positions: dict[bytes, list[int]],
        results: list[CachedVector | None],
        compute: Compute,
    ) -> None:
        # asyncio.wait, not await: a waiter that is cancelled must not cancel the shared future.
        await asyncio.wait(set(wait.values()))
        again: list[bytes] = []
        for key, future in wait.items():
            if future.exception() is not None:
                again.append(key)
                continue
            for index in positions[key]:
                results[index] = future.result()
        if again:
            # Only the tokens of this request's inputs count against its limit; those found so
            # far are summed by the caller afterwards, so pass none here.
            computed = await compute([positions[key][0] for key in again], 0)
            for key, entry in zip(again, computed, strict=True):
                for index in positions[key]:
                    results[index] = entry
            assert self.backend is not None
            await self.backend.set_many(list(zip(again, computed, strict=True)))

    def status(self) -> dict[str, object]:
        if self.backend is None:
            return {"backend": "off"}
        return {
            "backend": self.backend.name,
            "hits": self.stats.hits,
            "misses": self.stats.misses,
            "coalesced": self.stats.coalesced,
            "computing": len(self._flights),
            "errors": self.backend_stats().errors,
            **self.backend.status(),
        }

    def backend_stats(self) -> BackendStats:
        return self.backend.stats if self.backend is not None else BackendStats()

    async def aclose(self) -> None:
        if self.backend is not None:
            await self.backend.aclose()


def build_backend(
    kind: CacheBackendName,
    *,
    max_bytes: int,
    max_entries: int,
    url: str | None,
    prefix: str,
    ttl_s: int,
    timeout_s: float,
) -> CacheBackend | None:
    if kind == "off":
        return None
    if kind == "memory":
        return MemoryBackend(max_bytes=max_bytes, max_entries=max_entries)
    if not url:
        raise ValueError("the redis cache needs a URL")
    return RedisBackend(url, prefix=prefix, ttl_s=ttl_s, timeout_s=timeout_s)


# -- weights fingerprints ------------------------------------------------------------------------

_file_digests: dict[tuple[str, int, int, int], str] = {}
_file_digests_lock = threading.Lock()


def weights_fingerprint(
    spec: ModelSpec, *, revision: str | None, token: str | None, cache_dir: str | None
) -> str:
    """What identifies the weights ``spec`` loads, the same on every replica that has the same
    files: the package's version, the hub commit, or a digest of a local folder's files
    (blocking: call it off the event loop)."""
    if spec.source.startswith(PACKAGE_SOURCE_PREFIX):
        top = spec.source.removeprefix(PACKAGE_SOURCE_PREFIX).split(".")[0]
        # The usual distribution name first; scanning every installed distribution takes ~0.5 s.
        guess = top.replace("_", "-")
        try:
            return f"package:{guess}=={importlib.metadata.version(guess)}"
        except importlib.metadata.PackageNotFoundError:
            pass
        for dist in importlib.metadata.packages_distributions().get(top, []):
            return f"package:{dist}=={importlib.metadata.version(dist)}"
    folder = resolve_source(spec.source, revision=revision, token=token, cache_dir=cache_dir)
    if folder.parent.name == "snapshots":  # the hub cache names a snapshot by its commit
        return f"hub:{spec.source}@{folder.name}"
    return f"files:{folder_digest(folder)}"


def folder_digest(folder: Path) -> str:
    """SHA-256 over the relative name, size and content digest of every file in ``folder``
    (hidden folders such as ``.cache`` left out)."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts) or not path.is_file():
            continue
        digest.update(f"{relative.as_posix()}\0".encode())
        digest.update(_file_digest(path).encode())
    return digest.hexdigest()


def _file_digest(path: Path) -> str:
    stat = path.stat()
    memo = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino)
    with _file_digests_lock:
        known = _file_digests.get(memo)
    if known is not None:
        return known
    hasher = hashlib.sha256(str(stat.st_size).encode() + b"\0")
    with path.open("rb") as handle:
        if stat.st_size <= _FULL_HASH_BYTES:
            while chunk := handle.read(1 << 20):
                hasher.update(chunk)
        else:
            step = (stat.st_size - _SAMPLE_BYTES) // (_SAMPLES - 1)
            for sample in range(_SAMPLES):
                handle.seek(sample * step)
                hasher.update(handle.read(_SAMPLE_BYTES))
    value = hasher.hexdigest()
    with _file_digests_lock:
        _file_digests[memo] = value
    return value
