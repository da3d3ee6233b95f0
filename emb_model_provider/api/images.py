"""POST /v1/images/embeddings: the batch-first image API, as JSON or as a multipart upload.

JSON: ``{"images": [{"id": .., "image_url": ..} | {"id": .., "image_base64": ..}], "model": ..,
"normalize": true}``. Multipart (for curl): ``-F model=dinov3-vits16 -F image=@cat.jpg`` with any
number of ``image`` files (their file names become the ids). Both answer
``{"embeddings", "dim", "model_id", "ids", "latency_ms", "usage"}`` and go through the same
registry and batcher as /v1/embeddings.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from emb_model_provider.api.auth import check_model_access
from emb_model_provider.api.deps import ServiceDep
from emb_model_provider.api.embeddings import drop_if_disconnected, record_usage
from emb_model_provider.core.errors import InvalidRequest
from emb_model_provider.protocol import (
    ErrorResponse,
    ImageEmbeddingsRequest,
    ImageEmbeddingsResponse,
    render_image_embeddings,
)
from emb_model_provider.services.embedding_service import Embedded

router = APIRouter()

_ERRORS: dict[int | str, dict[str, object]] = {
    status: {"model": ErrorResponse} for status in (400, 404, 429, 502, 503)
}


@router.post(
    "/v1/images/embeddings",
    response_model=ImageEmbeddingsResponse,
    responses=_ERRORS,
    summary="Embeds a batch of images given as URLs, base64, or uploaded files.",
    openapi_extra={
        "requestBody": {
            "content": {
                "application/json": {
                    "schema": ImageEmbeddingsRequest.model_json_schema(ref_template="{model}")
                },
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "model": {"type": "string"},
                            "normalize": {"type": "boolean"},
                            "image": {
                                "type": "array",
                                "items": {"type": "string", "format": "binary"},
                            },
                        },
                        "required": ["model", "image"],
                    }
                },
            },
            "required": True,
        }
    },
)
async def embed_images(request: Request, service: ServiceDep) -> Response:
    started = time.perf_counter()
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        model, normalize, ids, values = await _from_form(request)
    else:
        body = await _json_body(request)
        model, normalize = body.model, body.normalize
        ids = [item.id for item in body.images]
        values = [item.image_url or item.image_base64 or "" for item in body.images]
    check_model_access(request, model)
    labels = [
        f"images[{index}]" + (f" (id {item_id!r})" if item_id is not None else "")
        for index, item_id in enumerate(ids)
    ]
    result: Embedded | None = await drop_if_disconnected(
        request, service.embed_images(model, values, labels, normalize=normalize)
    )
    if result is None:
        return Response(status_code=499)
    record_usage(
        request, model=result.model, inputs=len(result.vectors), tokens=result.prompt_tokens
    )
    latency_ms = (time.perf_counter() - started) * 1000
    return Response(
        content=render_image_embeddings(
            result.vectors,
            model=result.model,
            ids=ids,
            latency_ms=latency_ms,
            prompt_tokens=result.prompt_tokens,
        ),
        media_type="application/json",
    )


async def _json_body(request: Request) -> ImageEmbeddingsRequest:
    raw = await request.body()
    try:
        return ImageEmbeddingsRequest.model_validate_json(raw)
    except ValidationError as exc:
        errors = [{**error, "loc": ("body", *error["loc"])} for error in exc.errors()]
        raise RequestValidationError(errors) from exc


async def _from_form(
    request: Request,
) -> tuple[str, bool, list[str | int | None], list[str | bytes]]:
    form = await request.form()
    model = form.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("Missing required parameter: 'model'.", param="model")
    normalize_field = form.get("normalize", "true")
    normalize = not (isinstance(normalize_field, str) and normalize_field.lower() in ("false", "0"))
    files = [value for value in form.getlist("image") if isinstance(value, UploadFile)]
    if not files:
        raise InvalidRequest("Upload at least one file in the 'image' field.", param="image")
    ids: list[str | int | None] = []
    values: list[str | bytes] = []
    for upload in files:
        ids.append(upload.filename)
        values.append(await upload.read())
    return model, normalize, ids, values
