"""GET /metrics: Prometheus exposition of the app's own registry (``services/metrics.py``), and
the one call that installs the observability and limits middleware."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Request, Response

from emb_model_provider.api.middleware import install_middleware
from emb_model_provider.core import tracing
from emb_model_provider.core.config import Settings
from emb_model_provider.services.cache import ResultCache
from emb_model_provider.services.metrics import MemoryReader, Metrics
from emb_model_provider.services.models import ModelManager

router = APIRouter()


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    registry: Metrics = request.app.state.metrics
    body, content_type = registry.render()
    return Response(content=body, media_type=content_type)


def install_observability(
    app: FastAPI,
    settings: Settings,
    models: ModelManager,
    accelerator_memory: MemoryReader | None,
    cache: ResultCache | None = None,
    *,
    tracer: tracing.AppTracer | None = None,
) -> None:
    """Metrics (when on), /metrics, and the middleware stack of ``api/middleware.py`` (with the
    request spans when ``tracer`` is given)."""
    registry = Metrics(models, accelerator_memory=accelerator_memory) if settings.metrics else None
    if registry is not None and cache is not None:
        registry.watch_cache(cache)
    app.state.metrics = registry
    install_middleware(app, settings, registry, tracer=tracer)
    if registry is not None:
        app.include_router(router)
