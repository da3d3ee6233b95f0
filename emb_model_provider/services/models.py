"""Loaded models and their lifecycle.

- A model loads on first use, once, however many requests ask at the same time. A model that
  cannot be loaded answers with an error naming the model and the reason; the server keeps
  serving the others, and a later request tries the load again.
- ``use()`` marks a model busy for the length of a request, so that it is never unloaded under
  a request that is using it.
- Models unused for ``idle_unload_s`` are unloaded by ``housekeeping()``; loading one model more
  than ``max_loaded_models`` (or past ``max_loaded_bytes`` of weights) unloads the least recently
  used idle ones first. Pinned models (the default model, unless configured otherwise) stay.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Literal

from emb_model_provider.core import heap, model_thread
from emb_model_provider.core.errors import InvalidRequest, ModelLoadFailed
from emb_model_provider.core.kinds import Precision
from emb_model_provider.encoders.base import EXACT_PATH, Encoder, LoadOptions, PrecisionReport
from emb_model_provider.encoders.sources import SourceError
from emb_model_provider.registry import ModelSpec, Registry, build_encoder, default_dimensions
from emb_model_provider.scheduler import DynamicBatcher
from emb_model_provider.services.cache import weights_fingerprint

logger = logging.getLogger(__name__)

#: How long an unload waits for the requests still using a model.
_UNLOAD_GRACE_S = 60.0

ModelState = Literal["loaded", "loading", "failed", "not_loaded"]


@dataclass(frozen=True)
class BatchLimits:
    max_batch_size: int
    max_batch_tokens: int
    max_queue_inputs: int
    background_batch_size: int = 8


@dataclass(frozen=True)
class Lifecycle:
    #: Unload a model unused for this long; 0 keeps models loaded.
    idle_unload_s: float = 0.0
    #: Most models loaded at once; 0 means no limit.
    max_loaded_models: int = 0
    #: Most bytes of weights loaded at once; 0 means no limit.
    max_loaded_bytes: int = 0
    #: Models never unloaded by eviction or idleness (an explicit unload with force still does).
    pinned: frozenset[str] = frozenset()


@dataclass(eq=False)
class LoadedModel:
    spec: ModelSpec
    encoder: Encoder
    batcher: DynamicBatcher
    load_time_s: float
    loaded_at: float = field(default_factory=time.time)
    #: Identifies the loaded weights in result-cache keys (``services/cache.py``); None when
    #: the cache is off or the weights could not be fingerprinted (then nothing is cached).
    fingerprint: str | None = None
    #: The size of the vectors a request gets when it names no ``dimensions`` (at most
    #: ``encoder.dimensions``; ``registry.default_dimensions``).
    dimensions: int = 0
    #: ``time.monotonic()`` of the last request that used the model.
    last_used: float = field(default_factory=time.monotonic)
    in_flight: int = 0
    _idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self._idle.set()


@dataclass(frozen=True)
class ModelStatus:
    name: str
    state: ModelState
    pinned: bool
    memory_bytes: int | None
    load_time_s: float | None
    loaded_at: float | None
    idle_s: float | None
    in_flight: int
    queued_inputs: int
    device: str | None
    error: str | None


class ModelManager:
    def __init__(
        self,
        registry: Registry,
        options: LoadOptions,
        limits: BatchLimits,
        *,
        warmup: bool = True,
        lifecycle: Lifecycle | None = None,
        fingerprints: bool = False,
    ) -> None:
        self.registry = registry
        self._options = options
        self._limits = limits
        self._warmup = warmup
        #: Fingerprint the weights at each load, for the result cache.
        self._fingerprints = fingerprints
        self.lifecycle = lifecycle or Lifecycle()
        self._loaded: dict[str, LoadedModel] = {}
        self._loading: dict[str, asyncio.Task[LoadedModel]] = {}
        self._failures: dict[str, str] = {}

    def requested_precision(self, spec: ModelSpec) -> Precision:
        """The precision ``spec`` asks for: its entry's, or the server's."""
        return spec.precision or self._options.precision

    def loaded(self, name: str) -> LoadedModel | None:
        return self._loaded.get(name)

    def loaded_models(self) -> list[LoadedModel]:
        return list(self._loaded.values())

    async def get(self, spec: ModelSpec) -> LoadedModel:
        # A prompt-pinned name shares its base's model: loaded once, under the base's name.
        spec = self.registry.weights(spec)
        model = self._loaded.get(spec.name)
        if model is not None:
            return model
        task = self._loading.get(spec.name)
        if task is None:
            task = asyncio.create_task(self._load(spec), name=f"load-{spec.name}")
            self._loading[spec.name] = task
            task.add_done_callback(lambda done: self._load_done(spec.name, done))
        # shield: a client that goes away must not cancel a load other requests wait for.
        return await asyncio.shield(task)

    def _load_done(self, name: str, task: asyncio.Task[LoadedModel]) -> None:
        self._loading.pop(name, None)
        if not task.cancelled() and task.exception() is not None:  # retrieved: no warning
            self._failures[name] = str(task.exception())

    @asynccontextmanager
    async def use(self, spec: ModelSpec) -> AsyncIterator[LoadedModel]:
        """The loaded model, marked busy until the block ends."""
        model = await self.get(spec)
        model.in_flight += 1
        model._idle.clear()
        try:
            yield model
        finally:
            model.in_flight -= 1
            model.last_used = time.monotonic()
            if model.in_flight == 0:
                model._idle.set()

    async def _load(self, spec: ModelSpec) -> LoadedModel:
        started = time.perf_counter()
        logger.info("loading model %s from %s", spec.name, spec.source)
        try:
            encoder = await model_thread.run_apart(build_encoder, spec, self._options)
            try:
                dimensions = default_dimensions(spec, encoder)
            except SourceError:
                await model_thread.run(encoder.close)
                raise
            if self._warmup:
                await model_thread.run(encoder.warmup)
        except SourceError as exc:
            logger.error("model %s cannot be loaded: %s", spec.name, exc)
            raise ModelLoadFailed(
                f"The model `{spec.name}` could not be loaded: {exc}", param="model"
            ) from exc
        except Exception as exc:
            logger.exception("model %s failed to load", spec.name)
            raise ModelLoadFailed(
                f"The model `{spec.name}` could not be loaded: {type(exc).__name__}: {exc}",
                param="model",
            ) from exc
        # After the load, so that a hub model is in the hub cache (no second download).
        fingerprint = await self._fingerprint(spec)
        report = getattr(encoder, "precision", None)
        # A fast path's vectors differ from float32's: cached apart. A refused fast path serves
        # float32, whose vectors (and keys) are exact's.
        fast_path = isinstance(report, PrecisionReport) and report.path != EXACT_PATH
        if fingerprint is not None and fast_path:
            assert isinstance(report, PrecisionReport)
            fingerprint = f"{fingerprint}+{report.path}"
        batcher = DynamicBatcher(
            spec.name,
            model_thread.bound(encoder.encode),
            max_batch_size=self._limits.max_batch_size,
            max_batch_tokens=self._limits.max_batch_tokens,
            max_queue_inputs=self._limits.max_queue_inputs,
            background_batch_size=self._limits.background_batch_size,
        )
        model = LoadedModel(
            spec, encoder, batcher, time.perf_counter() - started, dimensions=dimensions
        )
        model.fingerprint = fingerprint
        self._loaded[spec.name] = model
        self._failures.pop(spec.name, None)
        logger.info(
            "model %s ready on %s in %.1f s (%.0f MB of weights)",
            spec.name,
            encoder.placement,
            model.load_time_s,
            encoder.memory_bytes / 1e6,
        )
        await self._evict_over_limits(keep=spec.name)
        await asyncio.to_thread(heap.settle)  # the model's objects out of the collector's walks
        return model

    async def _fingerprint(self, spec: ModelSpec) -> str | None:
        if not self._fingerprints:
            return None
        try:
            return await asyncio.to_thread(
                weights_fingerprint,
                spec,
                revision=spec.revision,
                token=self._options.hf_token,
                cache_dir=self._options.cache_dir,
            )
        except Exception:  # not fatal: the model serves, uncached
            logger.warning("model %s: no weights fingerprint, not cached", spec.name, exc_info=True)
            return None

    # -- unloading ------------------------------------------------------------------------------

    async def unload(self, name: str, *, force: bool = False) -> bool:
        """Unload ``name`` once the requests using it are done; False when it was not loaded."""
        spec = self.registry.weights(self.registry.get(name))
        if spec.name in self.lifecycle.pinned and not force:
            raise InvalidRequest(
                f"The model `{spec.name}` is pinned; unload it with force=true.",
                param="model",
                code="model_pinned",
            )
        model = self._loaded.pop(spec.name, None)
        if model is None:
            return False
        logger.info("unloading model %s", spec.name)
        try:
            await asyncio.wait_for(model._idle.wait(), _UNLOAD_GRACE_S)
        except TimeoutError:
            logger.warning("unloading %s under %d requests", spec.name, model.in_flight)
        heap.thaw()  # so that the released model's reference cycles can be collected
        held = [model]
        del model  # the release drops the last reference, before the collector looks
        encoder = await asyncio.to_thread(_release_last, held)
        await asyncio.to_thread(heap.settle)
        if encoder() is not None:
            logger.warning("model %s: its encoder is still referenced after the unload", spec.name)
        return True

    async def run_housekeeping(self) -> None:
        """Check a few times per idle period (at least once a minute) until cancelled."""
        idle_s = self.lifecycle.idle_unload_s
        if idle_s <= 0:
            return
        while True:
            await asyncio.sleep(min(60.0, max(0.05, idle_s / 4)))
            try:
                await self.housekeeping()
            except Exception:
                logger.exception("model housekeeping failed")

    async def housekeeping(self) -> None:
        """Unload models idle for longer than ``idle_unload_s``."""
        limit = self.lifecycle.idle_unload_s
        if limit <= 0:
            return
        now = time.monotonic()
        for model in list(self._loaded.values()):
            if self._evictable(model) and now - model.last_used >= limit:
                logger.info("model %s unused for %.0f s: unloading", model.spec.name, limit)
                await self.unload(model.spec.name)

    async def _evict_over_limits(self, *, keep: str) -> None:
        while self._over_limits():
            candidates = [
                model
                for model in self._loaded.values()
                if model.spec.name != keep and self._evictable(model)
            ]
            if not candidates:
                logger.warning("over the loaded-model limits; every other model is busy or pinned")
                return
            victim = min(candidates, key=lambda model: model.last_used)
            logger.info("evicting least recently used model %s", victim.spec.name)
            await self.unload(victim.spec.name)

    def _over_limits(self) -> bool:
        lifecycle = self.lifecycle
        if lifecycle.max_loaded_models and len(self._loaded) > lifecycle.max_loaded_models:
            return True
        loaded_bytes = sum(model.encoder.memory_bytes for model in self._loaded.values())
        return bool(lifecycle.max_loaded_bytes and loaded_bytes > lifecycle.max_loaded_bytes)

    def _evictable(self, model: LoadedModel) -> bool:
        return model.spec.name not in self.lifecycle.pinned and model.in_flight == 0

    # -- status ---------------------------------------------------------------------------------

    def status(self, spec: ModelSpec) -> ModelStatus:
        """The state of the model that serves ``spec`` (its base's, for a prompt-pinned name)."""
        name = spec.name
        spec = self.registry.weights(spec)
        model = self._loaded.get(spec.name)
        pinned = spec.name in self.lifecycle.pinned
        if model is not None:
            return ModelStatus(
                name=name,
                state="loaded",
                pinned=pinned,
                memory_bytes=model.encoder.memory_bytes,
                load_time_s=round(model.load_time_s, 3),
                loaded_at=model.loaded_at,
                idle_s=round(time.monotonic() - model.last_used, 3),
                in_flight=model.in_flight,
                queued_inputs=model.batcher.queued_inputs,
                device=model.encoder.placement,
                error=None,
            )
        state: ModelState = "not_loaded"
        if spec.name in self._loading:
            state = "loading"
        elif spec.name in self._failures:
            state = "failed"
        return ModelStatus(
            name=name,
            state=state,
            pinned=pinned,
            memory_bytes=None,
            load_time_s=None,
            loaded_at=None,
            idle_s=None,
            in_flight=0,
            queued_inputs=0,
            device=None,
            error=self._failures.get(spec.name) if state == "failed" else None,
        )

    def close(self) -> None:
        for task in self._loading.values():
            task.cancel()
        for model in self._loaded.values():
            _release(model)
        self._loaded.clear()


def _release(model: LoadedModel) -> None:
    """Finish the accepted inputs, end the worker, free the weights (blocking; not on the model
    thread, which the batcher's last batches need)."""
    model.batcher.stop()
    model_thread.call(model.encoder.close)


def _release_last(held: list[LoadedModel]) -> weakref.ref[Encoder]:
    """``_release`` the model in ``held``, the last reference to it, and drop it before returning:
    neither this thread's executor (which keeps a call's arguments until after it has handed back
    the result) nor the model thread still holds it when the caller collects."""
    model = held.pop()
    _release(model)
    model_thread.drain()
    encoder = weakref.ref(model.encoder)
    del model
    return encoder
