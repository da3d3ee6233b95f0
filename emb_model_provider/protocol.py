"""OpenAI wire models for /v1/embeddings and /v1/models (pydantic only; the floor api and services
share). Field names and shapes follow OpenAI's OpenAPI specification (CreateEmbeddingRequest,
CreateEmbeddingResponse, Model, ErrorResponse).
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Sequence
from typing import Annotated, Any, Literal, cast

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, model_validator

from emb_model_provider.core.kinds import Modality
from emb_model_provider.core.vectors import Vectors

logger = logging.getLogger(__name__)

NonEmptyStr = Annotated[StrictStr, Field(min_length=1)]
TokenIds = Annotated[list[StrictInt], Field(min_length=1)]


class ImageObject(BaseModel):
    """``{"image": "<http(s) URL | data:image/...;base64,... | bare base64>"}``: an image input."""

    model_config = ConfigDict(extra="forbid")
    image: NonEmptyStr


EmbeddingInput = (
    NonEmptyStr
    | Annotated[list[NonEmptyStr], Field(min_length=1)]
    | TokenIds
    | Annotated[list[TokenIds], Field(min_length=1)]
    | Annotated[list[ImageObject], Field(min_length=1)]
    # Texts and images in any order, for multimodal models (CLIP, SigLIP).
    | Annotated[list[NonEmptyStr | ImageObject], Field(min_length=1)]
)
#: ``input`` as a list: texts, token arrays, image objects, or texts and image objects.
Inputs = list[str] | list[list[int]] | list[ImageObject] | list[str | ImageObject]


class EmbeddingRequest(BaseModel):
    # OpenAI's SDK users send fields we do not know (extra_body, newer SDK options): accept them,
    # as vLLM's protocol does, and log their names at debug level.
    model_config = ConfigDict(extra="allow")

    input: EmbeddingInput
    model: StrictStr
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: Annotated[StrictInt, Field(ge=1)] | None = None
    user: StrictStr | None = None
    #: Extension (the OpenAI SDK sends it through ``extra_body``): the model's prompt to
    #: prepend, e.g. "query"; without it the model's default prompt, if any.
    prompt_name: NonEmptyStr | None = None

    @model_validator(mode="after")
    def _log_extra(self) -> EmbeddingRequest:
        if self.model_extra:
            logger.debug("ignoring unknown request fields: %s", sorted(self.model_extra))
        return self

    def inputs(self) -> Inputs:
        """The input as a list: strings, token arrays, image objects, or strings and images."""
        value = self.input
        if isinstance(value, str):
            return [value]
        if value and isinstance(value[0], int):
            return [value]
        return cast(Inputs, value)


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


class ModelCard(BaseModel):
    """OpenAI's Model object plus the fields a multi-model gateway needs."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    # Extensions (OpenAI clients ignore unknown fields).
    modality: Modality
    dimensions: int | None
    max_input_tokens: int | None
    loaded: bool
    aliases: list[str]
    #: Text models: what serves the name (known once loaded).
    architecture: str | None = None
    pooling: str | None = None
    prompts: dict[str, str] | None = None
    default_prompt_name: str | None = None
    #: A prompt-pinned name: the model it shares.
    base: str | None = None
    #: Text models: ``exact`` or ``fast``, what serves and its measured accuracy.
    precision: PrecisionCard | None = None


class PrecisionCard(BaseModel):
    """What ``precision`` chose for a model and the accuracy it measured (encoders/fast.py)."""

    requested: Literal["exact", "fast"]
    #: What serves, e.g. ``torch-float32`` or ``openvino-bfloat16``; None until loaded.
    path: str | None = None
    #: Least and mean cosine to float32 over the calibration texts (``fast`` only).
    min_cosine: float | None = None
    mean_cosine: float | None = None
    #: The least cosine the fast path had to reach (the entry's ``min_cosine``).
    gate: float | None = None
    #: Why float32 serves although ``fast`` was asked for.
    reason: str | None = None
    cpu_features: list[str] | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ImageItem(BaseModel):
    """One image of the batch-first image API: a URL or base64 data, and the caller's id."""

    model_config = ConfigDict(extra="forbid")
    id: StrictStr | StrictInt | None = None
    image_url: NonEmptyStr | None = None
    image_base64: NonEmptyStr | None = None

    @model_validator(mode="after")
    def _one_source(self) -> ImageItem:
        if (self.image_url is None) == (self.image_base64 is None):
            raise ValueError("give exactly one of image_url and image_base64")
        return self


class ImageEmbeddingsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    images: Annotated[list[ImageItem], Field(min_length=1)]
    model: NonEmptyStr
    normalize: bool = True


class ImageEmbeddingsResponse(BaseModel):
    embeddings: list[list[float]]
    dim: int
    model_id: str
    ids: list[str | int | None]
    latency_ms: float
    usage: Usage


def render_image_embeddings(
    vectors: Vectors,
    *,
    model: str,
    ids: Sequence[str | int | None],
    latency_ms: float,
    prompt_tokens: int,
) -> bytes:
    body = {
        "embeddings": np.ascontiguousarray(vectors, dtype=np.float32),
        "dim": int(vectors.shape[1]),
        "model_id": model,
        "ids": list(ids),
        "latency_ms": round(latency_ms, 3),
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorInfo


def render_embeddings(
    vectors: Vectors,
    *,
    model: str,
    encoding_format: Literal["float", "base64"],
    prompt_tokens: int,
) -> bytes:
    """The CreateEmbeddingResponse body, serialised without a pydantic round trip (hot path).

    base64 is standard base64 of little-endian float32, what the OpenAI SDK asks for by default and
    decodes with ``np.frombuffer(..., dtype="float32")``.
    """
    rows = np.ascontiguousarray(vectors, dtype="<f4")
    embeddings: Sequence[Any]
    if encoding_format == "base64":
        embeddings = [base64.b64encode(row.tobytes()).decode("ascii") for row in rows]
    else:
        embeddings = list(rows)  # orjson writes float32 as the shortest exact decimal
    body = {
        "object": "list",
        "data": [
            {"object": "embedding", "index": index, "embedding": embedding}
            for index, embedding in enumerate(embeddings)
        ],
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
