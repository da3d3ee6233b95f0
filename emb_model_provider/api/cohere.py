"""POST /v2/embed and /v1/embed: Cohere's embed API (``services/cohere.py``), for the ``cohere``
SDK and the RAG frameworks that call it; errors in Cohere's shape (``api/error_shapes.py``)."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request, Response

from emb_model_provider.api.auth import check_model_access
from emb_model_provider.api.deps import ServiceDep
from emb_model_provider.api.embeddings import drop_if_disconnected, record_usage
from emb_model_provider.services import cohere
from emb_model_provider.services.cohere import CohereEmbedRequest

router = APIRouter(tags=["cohere"])


async def _embed(
    body: CohereEmbedRequest, request: Request, service: ServiceDep, version: Literal[1, 2]
) -> Response:
    check_model_access(request, body.model)
    reply = await drop_if_disconnected(request, cohere.embed(service, body, version=version))
    if reply is None:  # nobody is listening; 499 is nginx's "client closed request"
        return Response(status_code=499)
    content, model, inputs, tokens = reply
    record_usage(request, model=model, inputs=inputs, tokens=tokens)
    return Response(content=content, media_type="application/json")


@router.post("/v2/embed", summary="Cohere's embed API (v2): embeddings by type.")
async def embed_v2(body: CohereEmbedRequest, request: Request, service: ServiceDep) -> Response:
    return await _embed(body, request, service, 2)


@router.post("/v1/embed", summary="Cohere's embed API (v1).")
async def embed_v1(body: CohereEmbedRequest, request: Request, service: ServiceDep) -> Response:
    return await _embed(body, request, service, 1)
