"""POST /embed, POST / and POST /embed_sparse: text-embeddings-inference's embed routes
(``services/tei.py``), for TEI clients such as huggingface_hub's ``InferenceClient``; errors in
TEI's shape (``api/error_shapes.py``)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import APIRouter, Request, Response

from emb_model_provider.api.auth import check_model_access
from emb_model_provider.api.deps import ReadinessDep, ServiceDep
from emb_model_provider.api.embeddings import drop_if_disconnected, record_usage
from emb_model_provider.services import tei
from emb_model_provider.services.embedding_service import Embedded
from emb_model_provider.services.sparse import SparseResult
from emb_model_provider.services.tei import TeiEmbedRequest, TeiEmbedSparseRequest

router = APIRouter(tags=["tei"])


async def _answer(
    request: Request,
    model: str,
    work: Callable[[], Awaitable[tuple[bytes, Embedded | SparseResult]]],
) -> Response:
    """What both TEI routes do around their service call: access to ``model`` checked before
    ``work`` starts, the work dropped if the client has gone, usage recorded, the body as it
    is."""
    check_model_access(request, model)
    reply = await drop_if_disconnected(request, work())
    if reply is None:  # nobody is listening; 499 is nginx's "client closed request"
        return Response(status_code=499)
    content, result = reply
    record_usage(
        request, model=result.model, inputs=len(result.vectors), tokens=result.prompt_tokens
    )
    return Response(content=content, media_type="application/json")


# One handler on both paths: TEI serves /embed, and huggingface_hub's
# ``InferenceClient(base_url=...).feature_extraction`` posts to the base URL itself.
@router.post("/embed", summary="TEI's embed route: a bare array of vectors.")
@router.post("/", summary="TEI's root route (huggingface_hub InferenceClient(base_url=...)).")
async def embed(
    body: TeiEmbedRequest, request: Request, service: ServiceDep, readiness: ReadinessDep
) -> Response:
    default = readiness.default_model
    return await _answer(
        request, body.model or default, lambda: tei.embed(service, body, default_model=default)
    )


@router.post("/embed_sparse", summary="TEI's sparse route: [[{index, value}]] per input.")
async def embed_sparse(
    body: TeiEmbedSparseRequest, request: Request, service: ServiceDep, readiness: ReadinessDep
) -> Response:
    default = readiness.default_model
    return await _answer(
        request,
        body.model or default,
        lambda: tei.embed_sparse(service, body, default_model=default),
    )
