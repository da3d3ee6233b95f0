"""``create_app(settings)``: the only wiring. Everything a request needs is built here and put on
``app.state``; the default model loads in the background so /health answers at once and /ready
turns 200 when the model is warm.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from emb_model_provider import __version__
from emb_model_provider.api import embeddings, health, images, models
from emb_model_provider.api.exceptions import install_error_handlers
from emb_model_provider.core.config import Settings
from emb_model_provider.core.device import resolve_placement
from emb_model_provider.core.errors import ConfigError, ProviderError
from emb_model_provider.encoders.base import LoadOptions
from emb_model_provider.registry import Registry
from emb_model_provider.security.fetch import FetchPolicy, ImageFetcher
from emb_model_provider.services.embedding_service import EmbeddingService, RequestLimits
from emb_model_provider.services.image_inputs import ImageLoader
from emb_model_provider.services.models import BatchLimits, ModelManager
from emb_model_provider.services.readiness import Readiness

logger = logging.getLogger(__name__)


def create_app(settings: Settings) -> FastAPI:
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
    options = LoadOptions(
        device=str(placement.device),
        dtype=str(placement.dtype).removeprefix("torch."),
        hf_token=settings.hf_token_value(),
        cache_dir=str(settings.cache_dir) if settings.cache_dir else None,
        num_threads=settings.num_threads,
        max_image_pixels=settings.max_image_pixels,
    )
    manager = ModelManager(
        registry,
        options,
        BatchLimits(
            max_batch_size=settings.max_batch_size,
            max_batch_tokens=settings.max_batch_tokens,
            max_queue_inputs=settings.max_queue_inputs,
        ),
        warmup=settings.warmup,
    )
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
    image_loader = ImageLoader(ImageFetcher(fetch_policy), max_bytes=settings.max_image_bytes)
    service = EmbeddingService(
        manager,
        RequestLimits(
            max_inputs_per_request=settings.max_inputs_per_request,
            max_tokens_per_request=settings.max_tokens_per_request,
            truncate=settings.truncate,
        ),
        image_loader,
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
        try:
            yield
        finally:
            loader.cancel()
            await asyncio.gather(loader, return_exceptions=True)
            await asyncio.to_thread(manager.close)
            await image_loader.aclose()

    app = FastAPI(
        title="emb-model-provider",
        version=__version__,
        description="OpenAI-compatible embeddings server",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.models = manager
    app.state.embedding_service = service
    app.state.readiness = readiness
    install_error_handlers(app)
    app.include_router(embeddings.router)
    app.include_router(images.router)
    app.include_router(models.router)
    app.include_router(health.router)
    return app
