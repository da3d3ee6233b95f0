"""Typed dependencies: routes take the serving objects that ``main.create_app`` put on app.state.

``async`` although they do not await: FastAPI runs a plain ``def`` dependency in its thread pool,
one thread hop per request for an attribute read.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from emb_model_provider.services.embedding_service import EmbeddingService
from emb_model_provider.services.models import ModelManager
from emb_model_provider.services.readiness import Readiness
from emb_model_provider.services.rerank_service import RerankService


async def _service(request: Request) -> EmbeddingService:
    service: EmbeddingService = request.app.state.embedding_service
    return service


async def _models(request: Request) -> ModelManager:
    models: ModelManager = request.app.state.models
    return models


async def _readiness(request: Request) -> Readiness:
    readiness: Readiness = request.app.state.readiness
    return readiness


async def _rerank(request: Request) -> RerankService:
    service: RerankService = request.app.state.rerank_service
    return service


ServiceDep = Annotated[EmbeddingService, Depends(_service)]
ModelsDep = Annotated[ModelManager, Depends(_models)]
ReadinessDep = Annotated[Readiness, Depends(_readiness)]
RerankDep = Annotated[RerankService, Depends(_rerank)]
