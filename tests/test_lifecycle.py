"""Model lifecycle: admin listing, load, unload, pinning, LRU eviction, idle unloading, and
/api/status, through live servers serving the bundled model under several names."""

from __future__ import annotations

import asyncio
import gc
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import thread as futures_thread
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch

from emb_model_provider.encoders.base import LoadOptions
from emb_model_provider.encoders.runtime import weight_bytes
from emb_model_provider.encoders.text import TextEncoder
from emb_model_provider.registry import ModelSpec, Registry
from emb_model_provider.security.keys import hash_key
from emb_model_provider.services.models import BatchLimits, ModelManager
from tests.conftest import BUNDLED_DIR, DEFAULT_MODEL
from tests.live import live_server, test_settings

DEADLINE_S = 60
ADMIN_KEY = "sk-admin-lifecycle-test"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def _models_file(folder: Path, *names: str) -> Path:
    path = folder / "models.yaml"
    entries = "".join(f"  - name: {name}\n    source: {BUNDLED_DIR}\n" for name in names)
    path.write_text(f"models:\n{entries}", encoding="utf-8")
    return path


def _poll(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)  # polling interval under a deadline
    raise TimeoutError(what)


def _states(http: httpx.Client) -> dict[str, dict[str, object]]:
    response = http.get("/api/models")
    assert response.status_code == 200, response.text
    return {entry["name"]: entry for entry in response.json()["data"]}


def _bundled_manager(name: str) -> tuple[ModelSpec, ModelManager]:
    """A manager (no server, no warm-up) whose one entry, ``name``, is the bundled model."""
    spec = ModelSpec(name=name, source=str(BUNDLED_DIR), modality="text")
    manager = ModelManager(
        Registry([spec]),
        LoadOptions(device="cpu", dtype="float32"),
        BatchLimits(max_batch_size=8, max_batch_tokens=4096, max_queue_inputs=64),
        warmup=False,
    )
    return spec, manager


def _embed(url: str, model: str) -> None:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0)
    assert len(client.embeddings.create(model=model, input="lifecycle").data) == 1


@pytest.fixture(scope="module")
def lru_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    models_file = _models_file(tmp_path_factory.mktemp("lru"), "second", "third")
    settings = test_settings(
        models_file=models_file, max_loaded_models=2, admin_key_hashes=hash_key(ADMIN_KEY)
    )
    with live_server(settings) as url:
        yield url


def test_admin_lists_loads_and_unloads(lru_server: str) -> None:
    with httpx.Client(base_url=lru_server, timeout=60, headers=ADMIN) as http:
        states = _states(http)
        assert states[DEFAULT_MODEL]["state"] == "loaded"
        assert states[DEFAULT_MODEL]["pinned"] is True
        assert states[DEFAULT_MODEL]["memory_bytes"] > 80_000_000  # 22.7 M float32 parameters
        assert states["second"]["state"] in ("not_loaded", "loaded")

        loaded = http.post("/api/models/second/load").json()
        assert loaded["state"] == "loaded"
        assert loaded["memory_bytes"] == states[DEFAULT_MODEL]["memory_bytes"]
        cards = {card["id"]: card for card in http.get("/v1/models").json()["data"]}
        assert cards["second"]["loaded"] is True

        unloaded = http.post("/api/models/second/unload").json()
        assert unloaded["unloaded"] is True
        assert unloaded["state"] == "not_loaded"
        assert http.get("/v1/models/second").json()["loaded"] is False
        again = http.post("/api/models/second/unload").json()
        assert again["unloaded"] is False
        # The next request loads it again, transparently.
        _embed(lru_server, "second")
        assert _states(http)["second"]["state"] == "loaded"


def test_the_pinned_default_needs_force(lru_server: str) -> None:
    with httpx.Client(base_url=lru_server, timeout=60, headers=ADMIN) as http:
        refused = http.post(f"/api/models/{DEFAULT_MODEL}/unload")
        assert refused.status_code == 400
        assert refused.json()["error"]["code"] == "model_pinned"
        assert _states(http)[DEFAULT_MODEL]["state"] == "loaded"
        forced = http.post(f"/api/models/{DEFAULT_MODEL}/unload", params={"force": "true"})
        assert forced.json()["unloaded"] is True
        _embed(lru_server, DEFAULT_MODEL)  # comes back on the next request
        assert _states(http)[DEFAULT_MODEL]["state"] == "loaded"


def test_least_recently_used_is_evicted_never_the_pinned_default(lru_server: str) -> None:
    with httpx.Client(base_url=lru_server, timeout=60, headers=ADMIN) as http:
        _embed(lru_server, "second")
        _embed(lru_server, "third")  # a third model over max_loaded_models=2
        states = _states(http)
        assert states["third"]["state"] == "loaded"
        assert states["second"]["state"] == "not_loaded"
        assert states[DEFAULT_MODEL]["state"] == "loaded"  # pinned, although used least recently
        _embed(lru_server, "second")
        states = _states(http)
        assert states["third"]["state"] == "not_loaded"
        assert [name for name, entry in states.items() if entry["state"] == "loaded"] == [
            DEFAULT_MODEL,
            "second",
        ]


def test_admin_routes_need_the_admin_key(lru_server: str) -> None:
    for headers in ({}, {"Authorization": "Bearer sk-not-the-admin"}):
        for method, path in (("GET", "/api/models"), ("POST", "/api/models/second/unload")):
            response = httpx.request(method, f"{lru_server}{path}", headers=headers, timeout=30)
            assert response.status_code == 401, response.text
            assert response.json()["error"]["code"] == "invalid_api_key"


def test_admin_routes_are_off_without_an_admin_key(server_url: str) -> None:
    response = httpx.get(f"{server_url}/api/models", headers=ADMIN, timeout=30)
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "admin_disabled"


def test_unknown_model_and_failed_load(lru_server: str) -> None:
    with httpx.Client(base_url=lru_server, timeout=60, headers=ADMIN) as http:
        missing = http.post("/api/models/nope/load")
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "model_not_found"


def test_status_reports_device_memory_uptime_and_queues(lru_server: str) -> None:
    with httpx.Client(base_url=lru_server, timeout=60, headers=ADMIN) as http:
        _embed(lru_server, DEFAULT_MODEL)
        status = http.get("/api/status").json()
    assert status["device"] == "cpu (float32)"
    assert status["uptime_s"] > 0
    assert status["memory"]["process_rss_bytes"] > status["memory"]["model_weights_bytes"] > 0
    assert status["memory"]["accelerator"] is None
    assert status["ready"] is True
    default = status["models"][DEFAULT_MODEL]
    assert default["queued_inputs"] == 0
    assert default["encoded_inputs"] >= 1


def test_idle_models_are_unloaded_but_not_the_pinned_default(tmp_path: Path) -> None:
    models_file = _models_file(tmp_path, "second")
    settings = test_settings(
        models_file=models_file, model_idle_unload_s=0.5, admin_key_hashes=hash_key(ADMIN_KEY)
    )
    with (
        live_server(settings) as url,
        httpx.Client(base_url=url, timeout=60, headers=ADMIN) as http,
    ):
        _embed(url, "second")
        _poll(lambda: _states(http)["second"]["state"] == "not_loaded", "never unloaded")
        assert _states(http)[DEFAULT_MODEL]["state"] == "loaded"


def test_unload_waits_for_the_requests_using_the_model() -> None:
    """An unload that arrives while a request holds the model lets that request finish."""
    spec, manager = _bundled_manager("busy")

    async def run() -> tuple[int, bool]:
        async with manager.use(spec) as model:
            unload = asyncio.ensure_future(manager.unload("busy"))
            await asyncio.sleep(0)  # let the unload start and wait for this request
            assert not unload.done()
            prepared = model.encoder.prepare(["still served"], truncate=True)
            vectors = await model.batcher.embed(prepared)
        return len(vectors), await unload

    try:
        count, unloaded = asyncio.run(run())
    finally:
        manager.close()
    assert (count, unloaded) == (1, True)
    assert manager.loaded("busy") is None


def test_a_loaded_model_is_frozen_out_of_the_collector_and_an_unloaded_one_freed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After a load, what the model brought in sits in the permanent generation (the collector's
    full collections no longer walk it); an unloaded model's objects, reference cycles included,
    are still freed.

    A ``concurrent.futures`` worker drops a call's function and arguments only after handing back
    its result; here each worker lingers 0.1 s in between, so that a release whose threads still
    hold the model when the unload collects fails every time, not once in many runs."""
    spec, manager = _bundled_manager("frozen")
    gc.unfreeze()

    class Cycle:
        def __init__(self) -> None:
            self.me = self

    run_item = futures_thread._WorkItem.run

    def run_and_linger(item: Any, *args: Any) -> None:
        run_item(item, *args)
        time.sleep(0.1)  # the worker still holds the item, as it does for a moment after a call

    async def load_and_unload() -> weakref.ref[Cycle]:
        model = await manager.get(spec)
        assert gc.get_freeze_count() > 10_000  # torch, transformers and the model's modules
        cycle = Cycle()  # a reference cycle hung on the model, frozen with it
        model.encoder.__dict__["cycle"] = cycle
        gc.freeze()
        watched = weakref.ref(cycle)
        del model, cycle
        monkeypatch.setattr(futures_thread._WorkItem, "run", run_and_linger)
        assert await manager.unload("frozen")
        return watched

    try:
        cycle = asyncio.run(load_and_unload())
    finally:
        manager.close()
    assert cycle() is None  # collected although it was frozen
    assert gc.get_freeze_count() > 10_000  # the rest frozen again


def test_the_unpadded_forwards_fused_copies_are_counted_and_freed_on_unload() -> None:
    """The BERT forward without padding keeps query, key and value fused, a copy beside the
    model's weights: the memory the manager evicts by counts it, and an unload frees it even
    while something still holds the encoder (as a thread-pool worker may for a moment)."""
    spec, manager = _bundled_manager("fused")

    held: list[object] = []

    async def load_and_unload() -> tuple[int, int, int, list[weakref.ref[torch.Tensor]]]:
        model = await manager.get(spec)
        encoder = model.encoder
        assert isinstance(encoder, TextEncoder) and encoder._unpadded is not None
        fused = [tensor for pair in encoder._unpadded._qkv for tensor in pair]
        weights = weight_bytes(encoder._model)
        status = manager.status(spec).memory_bytes
        assert status is not None
        watched = [weakref.ref(tensor) for tensor in fused]
        copies = sum(tensor.numel() * tensor.element_size() for tensor in fused)
        held.append(encoder)
        del model, encoder, fused
        assert await manager.unload("fused")
        return status, weights, copies, watched

    try:
        status, weights, copies, watched = asyncio.run(load_and_unload())
    finally:
        manager.close()
    # all-MiniLM-L6-v2: 6 layers of 384 x 1152 fused weights and 1152 biases, float32.
    assert copies == 6 * (384 * 1152 + 1152) * 4
    assert status == weights + copies
    assert held
    assert all(ref() is None for ref in watched)
