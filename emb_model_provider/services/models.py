"""Loaded models: load on first use (once, however many requests ask at the same time).

A model that cannot be loaded answers with an error naming the model and the reason; the server
keeps serving the others, and a later request tries the load again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from emb_model_provider.batching import DynamicBatcher
from emb_model_provider.core.errors import ModelLoadFailed
from emb_model_provider.encoders.base import Encoder, LoadOptions
from emb_model_provider.encoders.sources import SourceError
from emb_model_provider.registry import ModelSpec, Registry, build_encoder

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchLimits:
    max_batch_size: int
    max_batch_tokens: int
    max_queue_inputs: int


@dataclass(frozen=True)
class LoadedModel:
    spec: ModelSpec
    encoder: Encoder
    batcher: DynamicBatcher
    load_time_s: float


class ModelManager:
    def __init__(
        self,
        registry: Registry,
        options: LoadOptions,
        limits: BatchLimits,
        *,
        warmup: bool = True,
    ) -> None:
        self.registry = registry
        self._options = options
        self._limits = limits
        self._warmup = warmup
        self._loaded: dict[str, LoadedModel] = {}
        self._loading: dict[str, asyncio.Task[LoadedModel]] = {}

    def loaded(self, name: str) -> LoadedModel | None:
        return self._loaded.get(name)

    async def get(self, spec: ModelSpec) -> LoadedModel:
        model = self._loaded.get(spec.name)
        if model is not None:
            return model
        task = self._loading.get(spec.name)
        if task is None:
            task = asyncio.create_task(self._load(spec), name=f"load-{spec.name}")
            self._loading[spec.name] = task
            task.add_done_callback(lambda _: self._loading.pop(spec.name, None))
        # shield: a client that goes away must not cancel a load other requests wait for.
        return await asyncio.shield(task)

    async def _load(self, spec: ModelSpec) -> LoadedModel:
        started = time.perf_counter()
        logger.info("loading model %s from %s", spec.name, spec.source)
        try:
            encoder = await asyncio.to_thread(build_encoder, spec, self._options)
            if self._warmup:
                await asyncio.to_thread(encoder.warmup)
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
        batcher = DynamicBatcher(
            spec.name,
            encoder.encode,
            max_batch_size=self._limits.max_batch_size,
            max_batch_tokens=self._limits.max_batch_tokens,
            max_queue_inputs=self._limits.max_queue_inputs,
        )
        model = LoadedModel(spec, encoder, batcher, time.perf_counter() - started)
        self._loaded[spec.name] = model
        logger.info(
            "model %s ready on %s in %.1f s", spec.name, encoder.placement, model.load_time_s
        )
        return model

    def close(self) -> None:
        for task in self._loading.values():
            task.cancel()
        for model in self._loaded.values():
            model.batcher.stop()
        self._loaded.clear()
