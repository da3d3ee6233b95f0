"""/health (the process answers), /ready (the default model is loaded and warm), / (about; a
browser is redirected to the web console at /ui/)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, RedirectResponse

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


@router.get("/", response_model=None)
async def about(request: Request, response: Response) -> dict[str, object] | RedirectResponse:
    # A browser (it asks for HTML) is sent to the web console; API clients get this JSON.
    response.headers["Vary"] = "Accept"
    if "text/html" in request.headers.get("accept", ""):
        return RedirectResponse("/ui/", status_code=307, headers={"Vary": "Accept"})
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
            "console": "/ui/",
        },
    }
