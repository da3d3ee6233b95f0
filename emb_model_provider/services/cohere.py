"""Cohere's embed API (``POST /v2/embed``, ``POST /v1/embed``): its wire models and the adapter
onto the embedding service. Shapes follow the ``cohere`` SDK's types (``EmbedByTypeResponse``,
``EmbeddingsFloatsEmbedResponse``, ``EmbedInputType``, ``EmbeddingType``).

- ``texts`` or ``images`` (data URIs), ``model``, ``input_type``, ``embedding_types`` (several at
  once), ``truncate`` (``NONE`` refuses over-long texts, ``END`` cuts their end, ``START`` their
  start), ``max_tokens`` (the tokens kept of each text, cut as ``truncate`` says; above the
  model's limit: the model's limit), ``output_dimension`` (our ``dimensions``).
- ``input_type`` ``search_query`` / ``search_document`` select the model's ``query`` / ``document``
  prompt, ``classification`` / ``clustering`` the prompt of that name, when the model has it;
  otherwise the model's default prompt applies, as on /v1/embeddings.
"""

from __future__ import annotations

import base64
import uuid
from typing import Annotated, Any, Literal

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, model_validator

from emb_model_provider.core.kinds import TruncationSide
from emb_model_provider.protocol import EmbeddingRequest, ImageObject
from emb_model_provider.services.embedding_service import EmbeddingService, TokenCap

CohereInputType = Literal[
    "search_document", "search_query", "classification", "clustering", "image"
]
CohereEmbeddingType = Literal["float", "int8", "uint8", "binary", "ubinary", "base64"]

#: input_type -> the prompt name it selects when the model has that prompt.
PROMPT_OF_INPUT_TYPE: dict[str, str] = {
    "search_query": "query",
    "search_document": "document",
    "classification": "classification",
    "clustering": "clustering",
}

#: ``truncate`` -> the end over-long texts lose: START keeps their end, END their start.
_SIDE_OF_TRUNCATE: dict[str, TruncationSide] = {"START": "left", "END": "right"}

_Text = Annotated[StrictStr, Field(min_length=1)]


class CohereEmbedRequest(BaseModel):
    # Newer SDKs send fields we do not know (priority...): accept them, as Cohere does.
    model_config = ConfigDict(extra="allow")

    model: StrictStr
    texts: Annotated[list[_Text], Field(min_length=1)] | None = None
    images: Annotated[list[_Text], Field(min_length=1)] | None = None
    inputs: list[Any] | None = None
    input_type: CohereInputType | None = None
    embedding_types: Annotated[list[CohereEmbeddingType], Field(min_length=1)] | None = None
    truncate: Literal["NONE", "START", "END"] | None = None
    output_dimension: Annotated[StrictInt, Field(ge=1)] | None = None
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None

    @model_validator(mode="after")
    def _texts_or_images(self) -> CohereEmbedRequest:
        if self.inputs is not None:
            raise ValueError(
                "`inputs` (mixed text and image content) is not supported: send `texts` or `images`"
            )
        if (self.texts is None) == (self.images is None):
            raise ValueError("give exactly one of `texts` and `images`")
        return self


async def embed(
    service: EmbeddingService, request: CohereEmbedRequest, *, version: Literal[1, 2]
) -> tuple[bytes, str, int, int]:
    """The response body of a Cohere embed request and what it cost: (body, model, inputs,
    tokens)."""
    values: list[str | ImageObject]
    if request.images is not None:
        values = [ImageObject(image=image) for image in request.images]
    else:
        values = list(request.texts or [])
    # The OpenAI-shaped request lets the service run its usual checks (count, modality, images).
    inner = EmbeddingRequest.model_validate(
        {"input": values, "model": request.model, "dimensions": request.output_dimension}
    )
    spec, data = await service.request_data(inner)
    prompt_name = PROMPT_OF_INPUT_TYPE.get(request.input_type or "")
    result = await service.embed(
        spec,
        data,
        dimensions=request.output_dimension,
        normalize=spec.normalize,
        prompt_name=prompt_name,
        prompt_if_known=True,
        truncate=None if request.truncate is None else request.truncate != "NONE",
        truncation_side=_SIDE_OF_TRUNCATE.get(request.truncate or ""),
        max_tokens=None
        if request.max_tokens is None
        else TokenCap(request.max_tokens, "max_tokens"),
    )
    types = request.embedding_types or ["float"]
    embeddings: dict[str, Any] = {}
    for kind in dict.fromkeys(types):
        if kind == "float":
            embeddings["float"] = result.vectors
        elif kind == "base64":
            rows = np.ascontiguousarray(result.vectors, dtype="<f4")
            embeddings["base64"] = [base64.b64encode(row.tobytes()).decode() for row in rows]
        else:
            embeddings[kind] = await service.quantized(spec, result.vectors, kind)
    billed: dict[str, int] = {"input_tokens": result.prompt_tokens}
    if request.images is not None:
        billed["images"] = len(request.images)
    body: dict[str, Any] = {"id": uuid.uuid4().hex}
    if version == 1:
        by_type = request.embedding_types is not None
        body["response_type"] = "embeddings_by_type" if by_type else "embeddings_floats"
        body["embeddings"] = embeddings if by_type else embeddings["float"]
    else:
        body["embeddings"] = embeddings
    body["texts"] = request.texts or []
    body["meta"] = {"api_version": {"version": str(version)}, "billed_units": billed}
    rendered = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
    return rendered, result.model, len(result.vectors), result.prompt_tokens
