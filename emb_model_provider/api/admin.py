"""Model lifecycle for operators: list models with their state and memory, load, unload.

``main.py`` mounts ``router`` behind the admin key; ``status_router`` (/api/status: device,
memory, uptime, queue depths) is readable with an ordinary API key.
"""

from __future__ import annotations

import dataclasses
import resource
import sys
import time

from fastapi import APIRouter, Request

from emb_model_provider.api.auth import admin_endpoints_enabled
from emb_model_provider.api.deps import ModelsDep
from emb_model_provider.services.models import ModelManager

router = APIRouter(prefix="/api/models", tags=["admin"])
status_router = APIRouter(tags=["admin"])


def _model_entry(models: ModelManager, name: str) -> dict[str, object]:
    spec = models.registry.get(name)
    status = dataclasses.asdict(models.status(spec))
    return {**status, "modality": spec.modality, "aliases": list(spec.aliases)}


@router.get("")
async def list_models(models: ModelsDep) -> dict[str, object]:
    return {
        "object": "list",
        "data": [_model_entry(models, spec.name) for spec in models.registry],
    }


@router.post("/{model:path}/load")
async def load_model(model: str, models: ModelsDep) -> dict[str, object]:
    await models.get(models.registry.get(model))
    return _model_entry(models, model)


@router.post("/{model:path}/unload")
async def unload_model(model: str, models: ModelsDep, force: bool = False) -> dict[str, object]:
    was_loaded = await models.unload(model, force=force)
    return {**_model_entry(models, model), "unloaded": was_loaded}


def _rss_bytes() -> int:
    """Resident memory of this process now (Linux), else its peak (other platforms)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


@status_router.get("/api/status")
async def server_status(request: Request, models: ModelsDep) -> dict[str, object]:
    state = request.app.state
    loaded = models.loaded_models()
    return {
        "version": request.app.version,
        "device": state.placement,
        "uptime_s": round(time.monotonic() - state.started_monotonic, 3),
        "memory": {
            "process_rss_bytes": _rss_bytes(),
            "model_weights_bytes": sum(model.encoder.memory_bytes for model in loaded),
            "accelerator": state.accelerator_memory(),
        },
        "cache": state.embedding_service.cache.status(),
        "default_model": state.readiness.default_model,
        "ready": state.readiness.ready,
        "admin_endpoints": admin_endpoints_enabled(request),
        "models": {
            model.spec.name: {
                "queued_inputs": model.batcher.queued_inputs,
                "in_flight_requests": model.in_flight,
                "batches": model.batcher.stats.batches,
                "encoded_inputs": model.batcher.stats.encoded_inputs,
            }
            for model in loaded
        },
    }
