"""POST /v1/embeddings: parse, hand to the service, return its body."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import APIRouter, Request, Response

from emb_model_provider.api.auth import check_model_access
from emb_model_provider.api.deps import ServiceDep
from emb_model_provider.protocol import EmbeddingRequest, EmbeddingResponse, ErrorResponse

router = APIRouter()

T = TypeVar("T")

_ERRORS: dict[int | str, dict[str, object]] = {
    status: {"model": ErrorResponse} for status in (400, 404, 429, 500, 503)
}


async def drop_if_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """Run ``work``, or cancel it and return None when the client goes away first, so that its
    queued inputs are skipped by the batcher.

    The body has been read already, so the next ``receive()`` only returns when the client
    disconnects (or the response is done); uvicorn reports ``http.disconnect`` then. When this
    coroutine is cancelled itself (the request timed out), ``work`` is cancelled with it.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return None
    finally:
        watcher.cancel()
        task.cancel()  # a no-op once done; else our caller was cancelled and nobody will read it


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


@router.post(
    "/v1/embeddings",
    response_model=EmbeddingResponse,
    responses=_ERRORS,
    summary="Creates an embedding vector representing the input text.",
)
async def create_embeddings(
    body: EmbeddingRequest, request: Request, service: ServiceDep
) -> Response:
    check_model_access(request, body.model)
    reply = await drop_if_disconnected(request, service.create(body))
    if reply is None:  # nobody is listening; 499 is nginx's "client closed request"
        return Response(status_code=499)
    record_usage(request, model=reply.model, inputs=reply.inputs, tokens=reply.prompt_tokens)
    return Response(content=reply.body, media_type="application/json")


def record_usage(request: Request, *, model: str, inputs: int, tokens: int) -> None:
    """What a request cost, on ``request.state`` for the access log, metrics and rate limits."""
    request.state.model = model
    request.state.inputs = inputs
    request.state.tokens = tokens
