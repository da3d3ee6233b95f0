"""Every call into torch runs on the one model thread (core/model_thread.py): warm-up, image
preprocessing, forward and release, whichever thread or task asks for them; loading runs on a
thread of its own that is gone once the model is loaded."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from typing import Any

import pytest

from emb_model_provider.core import model_thread
from emb_model_provider.encoders.base import Encoder, LoadOptions, PreparedInput, Vectors
from emb_model_provider.registry import ModelSpec, Registry
from emb_model_provider.services import models as models_module
from emb_model_provider.services.embedding_service import EmbeddingService, RequestLimits
from emb_model_provider.services.models import BatchLimits, ModelManager
from tests.conftest import BUNDLED_DIR


class Recording:
    """Wraps a real encoder and notes the thread of every call that reaches torch."""

    def __init__(self, inner: Encoder, threads: list[tuple[str, int]]) -> None:
        self._inner = inner
        self._threads = threads

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def warmup(self) -> None:
        self._threads.append(("warmup", threading.get_ident()))
        self._inner.warmup()

    def encode(self, batch: Sequence[PreparedInput]) -> Vectors:
        self._threads.append(("encode", threading.get_ident()))
        return self._inner.encode(batch)

    def close(self) -> None:
        self._threads.append(("close", threading.get_ident()))
        self._inner.close()


def test_warmup_forward_and_release_share_one_thread_and_the_loader_is_gone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    threads: list[tuple[str, int]] = []
    loaders: list[threading.Thread] = []
    real_build = models_module.build_encoder

    def build(spec: ModelSpec, options: LoadOptions) -> Encoder:
        threads.append(("load", threading.get_ident()))
        loaders.append(threading.current_thread())
        return Recording(real_build(spec, options), threads)  # type: ignore[return-value]

    monkeypatch.setattr(models_module, "build_encoder", build)
    spec = ModelSpec(name="threads", source=str(BUNDLED_DIR), modality="text")
    manager = ModelManager(
        Registry([spec]),
        LoadOptions(device="cpu", dtype="float32"),
        BatchLimits(max_batch_size=4, max_batch_tokens=4096, max_queue_inputs=64),
        warmup=True,
    )

    async def run() -> None:
        async with manager.use(spec) as model:
            texts = [f"sentence number {index}" for index in range(10)]
            requests = [
                model.batcher.embed(model.encoder.prepare([text], truncate=True)) for text in texts
            ]
            await asyncio.gather(*requests)
        await manager.unload("threads")

    asyncio.run(run())
    kinds = [kind for kind, _ in threads]
    assert kinds[:2] == ["load", "warmup"] and kinds[-1] == "close" and "encode" in kinds
    idents = {ident for kind, ident in threads if kind != "load"}
    assert idents == {model_thread.call(threading.get_ident)}, threads
    # The load ran on a thread of its own, which (and with it its OpenMP team) ended with it.
    assert len(loaders) == 1 and loaders[0].name == "model-load"
    loaders[0].join(30)
    assert not loaders[0].is_alive()


def test_calls_from_many_threads_run_on_the_model_thread_and_errors_come_back() -> None:
    seen: list[int] = []

    def from_worker() -> None:
        seen.append(model_thread.call(threading.get_ident))

    workers = [threading.Thread(target=from_worker) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(30)
    assert len(set(seen)) == 1 and threading.get_ident() not in seen

    def nested() -> int:  # already on the model thread: runs directly, no deadlock
        assert model_thread.on_model_thread()
        return model_thread.call(threading.get_ident)

    assert model_thread.call(nested) == seen[0]
    assert not model_thread.on_model_thread()

    def fails() -> None:
        raise ValueError("from the model thread")

    with pytest.raises(ValueError, match="from the model thread"):
        model_thread.call(fails)
    with pytest.raises(ValueError, match="from the model thread"):
        asyncio.run(model_thread.run(fails))
    with pytest.raises(ValueError, match="from the model thread"):
        asyncio.run(model_thread.run_apart(fails))


def test_a_load_does_not_hold_up_the_model_thread() -> None:
    """While a slow load runs apart, work for the models already loaded still runs."""
    release = threading.Event()

    def slow_load() -> str:
        assert release.wait(30)
        return "loaded"

    async def run() -> str:
        loading = asyncio.ensure_future(model_thread.run_apart(slow_load))
        await asyncio.sleep(0)
        served = await asyncio.wait_for(model_thread.run(lambda: "served"), 30)
        assert not loading.done()
        release.set()
        return served + " " + await loading

    assert asyncio.run(run()) == "served loaded"


class PrepareRecorder:
    """An encoder of either modality whose ``prepare`` notes the thread it ran on."""

    def __init__(self, modality: str) -> None:
        self.modality = modality
        self.task = "embed"
        self.threads: list[int] = []

    def prepare(self, inputs: Sequence[str | bytes], *, truncate: bool) -> list[PreparedInput]:
        self.threads.append(threading.get_ident())
        return [PreparedInput(payload=value, n_tokens=1) for value in inputs]


def test_images_are_preprocessed_on_the_model_thread_and_texts_are_not() -> None:
    """Image processors run torch kernels, so image inputs are prepared on the model thread;
    tokenising text (Rust, no torch) stays off it, where it does not queue behind a forward."""
    limits = RequestLimits(max_inputs_per_request=8, max_tokens_per_request=1024, truncate=True)
    service = EmbeddingService(None, limits, None)  # type: ignore[arg-type]  # only _prepare runs
    image, text = PrepareRecorder("image"), PrepareRecorder("text")

    async def run() -> None:
        await service._prepare(image, [b"png bytes"], None, True)  # type: ignore[arg-type]
        await service._prepare(text, ["a sentence"], None, True)  # type: ignore[arg-type]

    asyncio.run(run())
    model = model_thread.call(threading.get_ident)
    assert image.threads == [model]
    assert text.threads and text.threads[0] != model
