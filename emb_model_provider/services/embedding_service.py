"""POST /v1/embeddings without HTTP or torch: registry lookup, input checks, token counts,
batching, ``dimensions``, and the response body.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import cast

import numpy as np

from emb_model_provider.core.errors import ContextLengthExceeded, InvalidRequest
from emb_model_provider.encoders.base import PreparedInput, Vectors
from emb_model_provider.protocol import EmbeddingRequest, render_embeddings
from emb_model_provider.services.models import LoadedModel, ModelManager
from emb_model_provider.services.token_arrays import decode_token_arrays

#: Token arrays up to this many ids in total are decoded on the event loop (microseconds);
#: longer ones go to a worker thread.
_INLINE_DECODE_TOKENS = 4096


@dataclass(frozen=True)
class RequestLimits:
    max_inputs_per_request: int
    max_tokens_per_request: int
    truncate: bool


class EmbeddingService:
    def __init__(self, models: ModelManager, limits: RequestLimits) -> None:
        self._models = models
        self._limits = limits

    async def create(self, request: EmbeddingRequest) -> bytes:
        spec = self._models.registry.get(request.model)
        inputs = request.inputs()
        if len(inputs) > self._limits.max_inputs_per_request:
            raise InvalidRequest(
                f"Too many inputs: {len(inputs)} were sent, at most "
                f"{self._limits.max_inputs_per_request} are allowed in one request.",
                param="input",
            )
        if spec.modality != "text":
            raise InvalidRequest(
                f"The model `{spec.name}` takes {spec.modality} inputs, not text.", param="input"
            )
        if spec.dimensions is not None:
            self._check_dimensions(request.dimensions, spec.dimensions)
        texts = await self._texts(inputs)
        model = await self._models.get(spec)
        self._check_dimensions(request.dimensions, model.encoder.dimensions)
        prepared = await asyncio.to_thread(
            model.encoder.prepare, texts, truncate=self._limits.truncate
        )
        prompt_tokens = self._check_tokens(prepared, model)
        vectors = _stack(await model.batcher.embed(prepared))
        if request.dimensions is not None and request.dimensions < vectors.shape[1]:
            vectors = _shorten(vectors, request.dimensions, renormalize=spec.normalize)
        return render_embeddings(
            vectors,
            model=spec.name,
            encoding_format=request.encoding_format or "float",
            prompt_tokens=prompt_tokens,
        )

    async def _texts(self, inputs: list[str] | list[list[int]]) -> list[str]:
        if not inputs or isinstance(inputs[0], str):
            return cast(list[str], inputs)
        arrays = inputs
        if sum(len(tokens) for tokens in arrays) <= _INLINE_DECODE_TOKENS:
            return decode_token_arrays(arrays)
        return await asyncio.to_thread(decode_token_arrays, arrays)

    @staticmethod
    def _check_dimensions(dimensions: int | None, native: int) -> None:
        if dimensions is not None and not 1 <= dimensions <= native:
            raise InvalidRequest(
                f"Invalid value for 'dimensions': {dimensions}. This model's embeddings have "
                f"{native} dimensions; ask for 1 to {native}.",
                param="dimensions",
            )

    def _check_tokens(self, prepared: list[PreparedInput], model: LoadedModel) -> int:
        limit = model.encoder.max_input_tokens
        for item in prepared:
            if item.n_tokens > limit:  # only possible when truncation is off
                raise ContextLengthExceeded(
                    f"This model's maximum context length is {limit} tokens, however you "
                    f"requested {item.n_tokens} tokens ({item.n_tokens} in your prompt; 0 for the "
                    "completion). Please reduce your prompt; or completion length.",
                    param="input",
                )
        total = sum(item.n_tokens for item in prepared)
        if total > self._limits.max_tokens_per_request:
            raise InvalidRequest(
                f"Requested {total} tokens, max {self._limits.max_tokens_per_request} tokens "
                "per request.",
                param="input",
                code="max_tokens_per_request",
            )
        return total


def _stack(rows: list[Vectors]) -> Vectors:
    stacked: Vectors = np.stack(rows).astype(np.float32, copy=False)
    return stacked


def _shorten(vectors: Vectors, dimensions: int, *, renormalize: bool) -> Vectors:
    """The first ``dimensions`` components, scaled back to unit length (Matryoshka-style)."""
    head = vectors[:, :dimensions]
    if not renormalize:
        return np.ascontiguousarray(head)
    norms = np.linalg.norm(head, axis=1, keepdims=True)
    unit: Vectors = (head / np.maximum(norms, 1e-12)).astype(np.float32)
    return unit
