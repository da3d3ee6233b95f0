"""``create_app(settings)``: the only wiring. Everything a request needs is built here and put on
``app.state``; the default model loads in the background so /health answers at once and /ready
turns 200 when the model is warm.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from starlette.applications import Starlette

from emb_model_provider import __version__
from emb_model_provider.api import (
    admin,
    cohere,
    embeddings,
    health,
    images,
    models,
    rerank,
    tei,
    ui,
)
from emb_model_provider.api.auth import install_access_control, require_admin
from emb_model_provider.api.batches import install_batch_api
from emb_model_provider.api.exceptions import install_error_handlers
from emb_model_provider.api.metrics import install_observability
from emb_model_provider.core.config import Settings
from emb_model_provider.core.device import Placement, accelerator_memory, resolve_placement
from emb_model_provider.core.errors import ConfigError, ProviderError
from emb_model_provider.core.tracing import AppTracer, start_tracing
from emb_model_provider.encoders.base import LoadOptions
from emb_model_provider.registry import ModelSpec, Registry
from emb_model_provider.security.fetch import FetchPolicy, ImageFetcher
from emb_model_provider.services.cache import ResultCache, build_backend
from emb_model_provider.services.embedding_service import EmbeddingService, RequestLimits
from emb_model_provider.services.image_inputs import ImageLoader
from emb_model_provider.services.models import BatchLimits, Lifecycle, ModelManager
from emb_model_provider.services.readiness import Readiness
from emb_model_provider.services.rerank_service import RerankLimits, RerankService

logger = logging.getLogger(__name__)


def _model_manager(
    settings: Settings, registry: Registry, default_spec: ModelSpec, placement: Placement
) -> ModelManager:
    options = LoadOptions(
        device=str(placement.device),
        dtype=str(placement.dtype).removeprefix("torch."),
        hf_token=settings.hf_token_value(),
        cache_dir=str(settings.cache_dir) if settings.cache_dir else None,
        num_threads=settings.num_threads,
        max_image_pixels=settings.max_image_pixels,
        trust_remote_code=settings.trust_remote_code,
        precision=settings.precision,
    )
    return ModelManager(
        registry,
        options,
        BatchLimits(
            max_batch_size=settings.max_batch_size,
            max_batch_tokens=settings.max_batch_tokens,
            max_queue_inputs=settings.max_queue_inputs,
            background_batch_size=settings.background_batch_size,
        ),
        warmup=settings.warmup,
        fingerprints=settings.cache != "off",
        lifecycle=Lifecycle(
            idle_unload_s=settings.model_idle_unload_s,
            max_loaded_models=settings.max_loaded_models,
            max_loaded_bytes=settings.max_loaded_memory_mb * 1_000_000,
            pinned=frozenset({default_spec.name}) if settings.pin_default_model else frozenset(),
        ),
    )


def _image_loader(settings: Settings) -> ImageLoader:
    try:
        fetch_policy = FetchPolicy(
            allow_urls=settings.allow_image_urls,
            allowlist=settings.url_allowlist_entries(),
            max_bytes=settings.max_image_bytes,
            connect_timeout_s=min(5.0, settings.max_url_timeout),
            total_timeout_s=settings.max_url_timeout,
            max_redirects=settings.max_url_redirects,
        )
    except ValueError as exc:
        raise ConfigError("EMB_PROVIDER_URL_ALLOWLIST", str(exc)) from exc
    return ImageLoader(ImageFetcher(fetch_policy), max_bytes=settings.max_image_bytes)


def _result_cache(settings: Settings) -> ResultCache:
    url = settings.cache_url.get_secret_value() if settings.cache_url else None
    try:
        backend = build_backend(
            settings.cache,
            max_bytes=settings.cache_max_bytes,
            max_entries=settings.cache_max_entries,
            url=url,
            prefix=settings.cache_prefix,
            ttl_s=settings.cache_ttl_s,
            timeout_s=settings.cache_timeout_s,
        )
    except ValueError as exc:  # redis-py refuses the URL
        raise ConfigError("EMB_PROVIDER_CACHE_URL", str(exc)) from exc
    return ResultCache(backend)


def _install_tracing(app: FastAPI, settings: Settings) -> AppTracer | None:
    """The app's tracer when tracing is on (``app.state.tracing``), flushed and stopped after
    everything else at shutdown. Off: no SDK import, no provider, no exporter."""
    if not settings.tracing_enabled():
        app.state.tracing = None
        return None
    tracing = start_tracing(__version__)
    app.state.tracing = tracing
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app_: Starlette) -> AsyncIterator[None]:
        try:
            async with inner(app_):
                yield
        finally:  # export what is still buffered, within OTEL_EXPORTER_OTLP_TIMEOUT
            await asyncio.to_thread(tracing.shutdown)

    app.router.lifespan_context = lifespan
    return tracing.tracer


def create_app(settings: Settings) -> FastAPI:  # noqa: PLR0915 (the one wiring function)
    """Build the app; raises ``ConfigError`` for settings that cannot work."""
    registry = Registry.from_settings(settings.models_file)
    if settings.default_model not in registry:
        known = ", ".join(spec.name for spec in registry)
        raise ConfigError(
            "EMB_PROVIDER_DEFAULT_MODEL",
            f"unknown model {settings.default_model!r} (known: {known})",
        )
    default_spec = registry.get(settings.default_model)
    placement = resolve_placement(settings.device, settings.dtype)
    manager = _model_manager(settings, registry, default_spec, placement)
    image_loader = _image_loader(settings)
    service = EmbeddingService(
        manager,
        RequestLimits(
            max_inputs_per_request=settings.max_inputs_per_request,
            max_tokens_per_request=settings.max_tokens_per_request,
            truncate=settings.truncate,
        ),
        image_loader,
        _result_cache(settings),
    )
    if settings.rerank_model is not None and settings.rerank_model not in registry:
        raise ConfigError("EMB_PROVIDER_RERANK_MODEL", f"unknown model {settings.rerank_model!r}")
    reranker = RerankService(
        service,
        registry,
        RerankLimits(
            max_documents_per_request=settings.max_documents_per_request,
            default_model=settings.rerank_model,
        ),
    )
    readiness = Readiness(default_model=default_spec.name)

    async def load_default() -> None:
        try:
            await manager.get(default_spec)
        except ProviderError as exc:
            readiness.detail = exc.message
            return
        readiness.ready = True
        readiness.detail = "ready"

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        logger.info(
            "serving %d models on %s; default %s",
            len(list(registry)),
            placement.describe(),
            default_spec.name,
        )
        loader = asyncio.create_task(load_default(), name="load-default-model")
        housekeeper = asyncio.create_task(manager.run_housekeeping(), name="housekeeping")
        try:
            yield
        finally:
            loader.cancel()
            housekeeper.cancel()
            await asyncio.gather(loader, housekeeper, return_exceptions=True)
            await asyncio.to_thread(manager.close)
            await asyncio.gather(image_loader.aclose(), service.cache.aclose())

    app = FastAPI(
        title="emb-model-provider",
        version=__version__,
        description="OpenAI-compatible embeddings server",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.models = manager
    app.state.embedding_service = service
    app.state.rerank_service = reranker
    app.state.readiness = readiness
    app.state.placement = placement.describe()
    app.state.started_monotonic = time.monotonic()
    app.state.accelerator_memory = lambda: accelerator_memory(placement.device)
    tracer = _install_tracing(app, settings)
    install_error_handlers(app)
    install_access_control(app, settings)
    # After access control, so that its refusals also carry a request id and are logged.
    install_observability(
        app, settings, manager, app.state.accelerator_memory, service.cache, tracer=tracer
    )
    app.include_router(embeddings.router)
    app.include_router(rerank.router)
    app.include_router(cohere.router)
    app.include_router(tei.router)
    install_batch_api(app, settings, service, registry, tracer, rerank=reranker)
    app.include_router(images.router)
    app.include_router(models.router)
    app.include_router(admin.router, dependencies=[Depends(require_admin)])
    app.include_router(admin.status_router)
    app.include_router(health.router)
    app.include_router(ui.router)
    return app
