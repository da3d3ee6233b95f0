"""/health (the process answers), /ready (the default model is loaded and warm), / (about)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from emb_model_provider import __version__
from emb_model_provider.api.deps import ReadinessDep

router = APIRouter()


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready")
async def ready(readiness: ReadinessDep) -> JSONResponse:
    if readiness.ready:
        return JSONResponse({"status": "ready", "default_model": readiness.default_model})
    return JSONResponse(
        {
            "status": "not_ready",
            "default_model": readiness.default_model,
            "detail": readiness.detail,
        },
        status_code=503,
        headers={"Retry-After": "1"},
    )


@router.get("/")
async def about() -> dict[str, object]:
    return {
        "name": "emb-model-provider",
        "version": __version__,
        "description": "OpenAI-compatible embeddings server",
        "links": {
            "embeddings": "/v1/embeddings",
            "models": "/v1/models",
            "health": "/health",
            "ready": "/ready",
            "docs": "/docs",
            "openapi": "/openapi.json",
        },
    }
