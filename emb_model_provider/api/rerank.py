"""POST /v1/rerank, /v2/rerank and /rerank: one route for the rerank bodies of Cohere (v1, v2),
Jina, vLLM and TEI; the service ranks, the route parses and answers."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from emb_model_provider.api.auth import check_model_access
from emb_model_provider.api.deps import RerankDep
from emb_model_provider.api.embeddings import drop_if_disconnected, record_usage
from emb_model_provider.protocol import ErrorResponse, RerankRequest, RerankResponse

router = APIRouter()

_ERRORS: dict[int | str, dict[str, object]] = {
    status: {"model": ErrorResponse} for status in (400, 404, 429, 500, 503)
}


@router.post(
    "/v1/rerank",
    response_model=RerankResponse,
    responses=_ERRORS,
    summary="Ranks documents by relevance to a query (Cohere, Jina and vLLM clients).",
)
@router.post(
    "/v2/rerank",
    response_model=RerankResponse,
    responses=_ERRORS,
    summary="Ranks documents by relevance to a query (Cohere v2 clients).",
)
@router.post(
    "/rerank",
    response_model=RerankResponse,
    responses=_ERRORS,
    summary="Ranks documents by relevance to a query (vLLM, Infinity; TEI's body and answer).",
)
async def rerank(body: RerankRequest, request: Request, service: RerankDep) -> Response:
    spec = service.model_for(body.model)
    check_model_access(request, spec.name)
    reply = await drop_if_disconnected(request, service.create(body))
    if reply is None:  # nobody is listening; 499 is nginx's "client closed request"
        return Response(status_code=499)
    record_usage(request, model=reply.model, inputs=reply.inputs, tokens=reply.prompt_tokens)
    request.state.task = "rerank"
    return Response(content=reply.body, media_type="application/json")
