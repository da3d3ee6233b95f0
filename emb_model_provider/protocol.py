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
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    field_validator,
    model_validator,
)

from emb_model_provider.core.kinds import EncodingFormat, Modality, Task, TruncationSide
from emb_model_provider.core.quantization import IntVectors
from emb_model_provider.core.vectors import Vectors

logger = logging.getLogger(__name__)

NonEmptyStr = Annotated[StrictStr, Field(min_length=1)]
#: A text that may be empty. A length constraint makes pydantic check that the string is Unicode
#: (``string_unicode``), as ``NonEmptyStr`` does: a lone surrogate (JSON's ``"\ud800"``, which
#: Python's parser accepts) is refused with a 400 here, never met by a tokenizer or a hash.
Text = Annotated[StrictStr, Field(min_length=0)]
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


def _not_zero_tokens(value: int | None) -> int | None:
    """vLLM's ``truncate_prompt_tokens``: -1 or a positive count (0 would embed nothing)."""
    if value == 0:
        raise ValueError("must be -1 (the model's limit) or at least 1")
    return value


class EmbeddingRequest(BaseModel):
    # OpenAI's SDK users send fields we do not know (extra_body, newer SDK options): accept them,
    # as vLLM's protocol does, and log their names at debug level.
    model_config = ConfigDict(extra="allow")

    input: EmbeddingInput
    model: StrictStr
    #: float and base64 as OpenAI's; int8, uint8, binary, ubinary (extensions): integers, as
    #: sentence-transformers' ``quantize_embeddings``.
    encoding_format: EncodingFormat | None = None
    dimensions: Annotated[StrictInt, Field(ge=1)] | None = None
    user: StrictStr | None = None
    #: Extension (the OpenAI SDK sends it through ``extra_body``): the model's prompt to
    #: prepend, e.g. "query"; without it the model's default prompt, if any.
    prompt_name: NonEmptyStr | None = None
    #: Extension (vLLM's): keep at most this many tokens of each text, special tokens included,
    #: cutting from the model's truncation side; -1: the model's limit. Truncates even where the
    #: server refuses over-long texts.
    truncate_prompt_tokens: Annotated[StrictInt, Field(ge=-1)] | None = None

    @field_validator("truncate_prompt_tokens")
    @classmethod
    def _not_zero(cls, value: int | None) -> int | None:
        return _not_zero_tokens(value)

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
    embedding: list[float] | list[int] | str


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
    #: The size of the vectors a request gets without ``dimensions`` (Matryoshka default).
    dimensions: int | None
    #: The model's full size: the most ``dimensions`` may ask for (known once loaded).
    max_dimensions: int | None = None
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
    #: What the model serves: ``embed`` (/v1/embeddings) or ``rerank`` (/v1/rerank); None until
    #: a hub model that states none is loaded and its files are read.
    task: Task | None = None
    #: Where the int8/uint8 ranges come from (image models: none, binary only).
    quantization_ranges: str | None = None
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
    vectors: Vectors | IntVectors,
    *,
    model: str,
    encoding_format: EncodingFormat,
    prompt_tokens: int,
) -> bytes:
    """The CreateEmbeddingResponse body, serialised without a pydantic round trip (hot path).

    base64 is standard base64 of little-endian float32, what the OpenAI SDK asks for by default and
    decodes with ``np.frombuffer(..., dtype="float32")``. Quantised ``vectors`` (int8, uint8)
    are written as integer arrays.
    """
    embeddings: Sequence[Any]
    if vectors.dtype in (np.int8, np.uint8):
        embeddings = list(vectors)  # orjson writes them as integers
    elif encoding_format == "base64":
        rows = np.ascontiguousarray(vectors, dtype="<f4")
        embeddings = [base64.b64encode(row.tobytes()).decode("ascii") for row in rows]
    else:
        # orjson writes float32 as the shortest exact decimal
        embeddings = list(np.ascontiguousarray(vectors, dtype="<f4"))
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


# -- rerank: the bodies Cohere (v1, v2), Jina, vLLM and TEI clients send -------------------------

#: TEI's ``truncation_direction`` as its router accepts it (serde aliases of both cases).
TruncationDirection = Literal["left", "right", "Left", "Right"]


def side_of(direction: TruncationDirection | None) -> TruncationSide | None:
    """The truncation side TEI's ``truncation_direction`` names (None: the model's own)."""
    return None if direction is None else ("left" if direction.lower() == "left" else "right")


class RerankDocument(BaseModel):
    """A document as an object (Cohere v1, Jina): its ``text``; other fields are ignored."""

    model_config = ConfigDict(extra="allow")
    text: Text


class RerankRequest(BaseModel):
    """POST /v1/rerank, /v2/rerank and /rerank. Cohere, Jina and vLLM send ``documents``; TEI
    sends ``texts`` (and no model) and gets TEI's bare array back. Unknown fields (Cohere's
    ``rank_fields``, ``max_chunks_per_doc``) are ignored, as on /v1/embeddings."""

    model_config = ConfigDict(extra="allow")

    #: None: the server's reranker (``EMB_PROVIDER_RERANK_MODEL``, else the first one).
    model: NonEmptyStr | None = None
    query: NonEmptyStr
    documents: Annotated[list[Text | RerankDocument], Field(min_length=1)] | None = None
    #: TEI's name for the documents.
    texts: Annotated[list[Text], Field(min_length=1)] | None = None
    #: The best ``top_n`` results only; None: every document.
    top_n: Annotated[StrictInt, Field(ge=1)] | None = None
    #: Each result carries its document's text (Cohere, Jina, vLLM); TEI's name is return_text.
    return_documents: bool | None = None
    return_text: bool | None = None
    #: TEI: the logits, before the model's activation.
    raw_scores: bool = False
    #: TEI: False refuses an over-long pair (400) instead of truncating it; None: the server's.
    truncate: bool | None = None
    #: TEI: the end each member of an over-long pair is cut from (longest first).
    truncation_direction: TruncationDirection | None = None
    #: vLLM's: keep at most this many tokens of each pair (special tokens included), cut
    #: longest first from the model's side; -1: the model's limit. Truncates even where the
    #: server refuses over-long pairs.
    truncate_prompt_tokens: Annotated[StrictInt, Field(ge=-1)] | None = None

    @field_validator("truncate_prompt_tokens")
    @classmethod
    def _not_zero(cls, value: int | None) -> int | None:
        return _not_zero_tokens(value)

    @model_validator(mode="after")
    def _documents_or_texts(self) -> RerankRequest:
        if (self.documents is None) == (self.texts is None):
            raise ValueError("give the documents to rank as `documents` (or TEI's `texts`)")
        if self.model_extra:
            logger.debug("ignoring unknown request fields: %s", sorted(self.model_extra))
        return self

    @property
    def tei(self) -> bool:
        """The body is TEI's: the answer is TEI's bare array."""
        return self.texts is not None

    def document_texts(self) -> list[str]:
        if self.texts is not None:
            return self.texts
        return [doc if isinstance(doc, str) else doc.text for doc in self.documents or []]

    def truncation_side(self) -> TruncationSide | None:
        return side_of(self.truncation_direction)

    def wants_documents(self) -> bool:
        return bool(self.return_text if self.tei else self.return_documents)


class RerankResultDocument(BaseModel):
    text: str


class RerankResult(BaseModel):
    index: int
    relevance_score: float
    #: Only when ``return_documents`` asked for it: LiteLLM refuses ``"document": null``.
    document: RerankResultDocument | None = None


class RerankResponse(BaseModel):
    """Cohere's RerankResponse (``id``, ``results``, ``meta``) with Jina's and vLLM's
    ``model`` and ``usage``."""

    id: str
    model: str
    results: list[RerankResult]
    usage: Usage
    meta: dict[str, Any]


class TeiRank(BaseModel):
    """One element of TEI's /rerank answer (a bare JSON array)."""

    index: int
    score: float
    text: str | None = None


def render_rerank(
    ranked: Sequence[tuple[int, float]],
    *,
    request_id: str,
    model: str,
    documents: Sequence[str] | None,
    prompt_tokens: int,
    n_documents: int,
    tei: bool,
) -> bytes:
    """The answer body: ``ranked`` (index, score) best first; ``documents`` when the request
    asked for the texts back (never ``"document": null``)."""
    results: list[dict[str, Any]] = []
    for index, score in ranked:
        if tei:
            item: dict[str, Any] = {"index": index, "score": score}
            if documents is not None:
                item["text"] = documents[index]
        else:
            item = {"index": index, "relevance_score": score}
            if documents is not None:
                item["document"] = {"text": documents[index]}
        results.append(item)
    if tei:
        return orjson.dumps(results)
    body = {
        "id": request_id,
        "model": model,
        "results": results,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        # Cohere's clients read the billed units: a search unit per query of up to 100
        # documents, as Cohere bills.
        "meta": {
            "api_version": {"version": "2"},
            "billed_units": {
                "search_units": -(-n_documents // 100),
                "input_tokens": prompt_tokens,
            },
        },
    }
    return orjson.dumps(body)
