"""text-embeddings-inference's embed API (``POST /embed``, and ``POST /``, where huggingface_hub's
``InferenceClient(base_url=...).feature_extraction`` posts): its wire model and the adapter onto
the embedding service. The answer is a bare array of float vectors, as TEI's.

TEI serves one model; here ``model`` (an extension) picks one, else the server's default model.
"""

from __future__ import annotations

from typing import Annotated, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from emb_model_provider.protocol import EmbeddingRequest, TruncationDirection, side_of
from emb_model_provider.services import sparse
from emb_model_provider.services.embedding_service import Embedded, EmbeddingService

_Text = Annotated[StrictStr, Field(min_length=1)]


class TeiEmbedRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    inputs: _Text | Annotated[list[_Text], Field(min_length=1)]
    normalize: bool = True
    #: None: the server's EMB_PROVIDER_TRUNCATE; false refuses over-long texts.
    truncate: bool | None = None
    truncation_direction: TruncationDirection | None = None
    prompt_name: _Text | None = None
    dimensions: Annotated[StrictInt, Field(ge=1)] | None = None
    #: huggingface_hub sends it when asked; only float vectors are served on this route.
    encoding_format: Literal["float"] | None = None
    #: Extension: the model to use; TEI serves one, so its clients send none.
    model: _Text | None = None


async def embed(
    service: EmbeddingService, request: TeiEmbedRequest, *, default_model: str
) -> tuple[bytes, Embedded]:
    """The body of a TEI embed request, and the vectors (for usage)."""
    texts = [request.inputs] if isinstance(request.inputs, str) else request.inputs
    inner = EmbeddingRequest.model_validate(
        {"input": texts, "model": request.model or default_model}
    )
    spec, data = await service.request_data(inner)
    result = await service.embed(
        spec,
        data,
        dimensions=request.dimensions,
        normalize=request.normalize,
        prompt_name=request.prompt_name,
        truncate=request.truncate,
        truncation_side=side_of(request.truncation_direction),
    )
    return orjson.dumps(result.vectors, option=orjson.OPT_SERIALIZE_NUMPY), result


class TeiEmbedSparseRequest(BaseModel):
    """TEI's /embed_sparse body: texts of a SPLADE model, ``truncate`` and ``prompt_name``."""

    model_config = ConfigDict(extra="allow")

    inputs: _Text | Annotated[list[_Text], Field(min_length=1)]
    #: None: the server's EMB_PROVIDER_TRUNCATE; false refuses over-long texts.
    truncate: bool | None = None
    truncation_direction: TruncationDirection | None = None
    prompt_name: _Text | None = None
    #: Extension: the model to use; TEI serves one, so its clients send none.
    model: _Text | None = None


async def embed_sparse(
    service: EmbeddingService, request: TeiEmbedSparseRequest, *, default_model: str
) -> tuple[bytes, sparse.SparseResult]:
    """The body of a TEI embed_sparse request (``[[{"index", "value"}, ...], ...]``), and the
    result (for usage)."""
    texts = [request.inputs] if isinstance(request.inputs, str) else request.inputs
    inner = EmbeddingRequest.model_validate(
        {"input": texts, "model": request.model or default_model}
    )
    spec, data = await service.request_data(inner)
    result = await sparse.sparse_vectors(
        service,
        spec,
        data,
        top_k=spec.dimensions,  # the models file's default top-k, as on /v1/embeddings
        prompt_name=request.prompt_name,
        truncate=request.truncate,
        truncation_side=side_of(request.truncation_direction),
    )
    return sparse.render_tei(result), result
