"""POST /v1/embeddings without HTTP or torch: registry lookup, input checks, token counts,
batching, ``dimensions``, and the response body.

Traced requests get a span for the input checks, one for tokenisation (or image preprocessing)
and one for the model's use; the cache, the image loader and the batcher add theirs
(``core/tracing.py``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, cast

import numpy as np

from emb_model_provider.core import model_thread, tracing
from emb_model_provider.core.errors import BadInput, ContextLengthExceeded, InvalidRequest
from emb_model_provider.encoders.base import Encoder, PreparedInput, Vectors
from emb_model_provider.protocol import EmbeddingRequest, ImageObject, render_embeddings
from emb_model_provider.registry import ModelSpec
from emb_model_provider.services.cache import CachedVector, ResultCache
from emb_model_provider.services.image_inputs import ImageLoader
from emb_model_provider.services.models import LoadedModel, ModelManager
from emb_model_provider.services.token_arrays import decode_token_arrays

#: Token arrays up to this many ids in total are decoded on the event loop (microseconds);
#: longer ones go to a worker thread.
_INLINE_DECODE_TOKENS = 4096
_IMAGE_SCHEMES = ("http://", "https://", "data:")


@dataclass(frozen=True)
class RequestLimits:
    max_inputs_per_request: int
    max_tokens_per_request: int
    truncate: bool


@dataclass(frozen=True)
class Embedded:
    """Vectors in input order and the tokens the model processed for them."""

    vectors: Vectors
    prompt_tokens: int
    model: str


@dataclass(frozen=True)
class Reply:
    """A response body and what it cost: access logs, metrics and token rate limits read this."""

    body: bytes
    model: str
    inputs: int
    prompt_tokens: int


class EmbeddingService:
    def __init__(
        self,
        models: ModelManager,
        limits: RequestLimits,
        images: ImageLoader,
        cache: ResultCache | None = None,
    ) -> None:
        self._models = models
        self._limits = limits
        self._images = images
        self.cache = cache or ResultCache(None)

    async def create(self, request: EmbeddingRequest, *, background: bool = False) -> Reply:
        """The response to one /v1/embeddings request. ``background`` (Batch API jobs) yields
        the model to interactive requests."""
        with tracing.span("embeddings.check_inputs"):
            spec = self._models.registry.get(request.model)
            inputs = request.inputs()
            self._check_count(len(inputs))
            if spec.dimensions is not None:
                self._check_dimensions(request.dimensions, spec.dimensions)
            if spec.modality == "image":
                values = _image_values(spec, inputs)
            else:
                texts = await self._texts(spec, inputs)
        if spec.modality == "image":
            data: Sequence[str | bytes] = await self._images.load(
                values, [f"input[{index}]" for index in range(len(values))]
            )
        else:
            data = texts
        result = await self.embed(
            spec,
            data,
            dimensions=request.dimensions,
            normalize=spec.normalize,
            background=background,
        )
        body = render_embeddings(
            result.vectors,
            model=result.model,
            encoding_format=request.encoding_format or "float",
            prompt_tokens=result.prompt_tokens,
        )
        return Reply(body, result.model, len(result.vectors), result.prompt_tokens)

    async def embed_images(
        self, model: str, values: Sequence[str | bytes], labels: Sequence[str], *, normalize: bool
    ) -> Embedded:
        """For the batch-first image API: images as URLs, data URIs, base64 or uploaded bytes,
        named by label in errors. ``normalize=False`` returns the raw pooled vectors."""
        with tracing.span("embeddings.check_inputs"):
            spec = self._models.registry.get(model)
            if spec.modality != "image":
                raise InvalidRequest(
                    f"The model `{spec.name}` takes {spec.modality} inputs, not images.",
                    param="model",
                )
            self._check_count(len(values))
        data = await self._images.load(values, labels)
        try:
            return await self.embed(spec, data, dimensions=None, normalize=normalize)
        except BadInput as exc:  # name the image the way the caller did
            raise InvalidRequest(
                f"{labels[exc.index]}: {exc.reason}", param="input", code=exc.code
            ) from exc

    async def embed(
        self,
        spec: ModelSpec,
        data: Sequence[str | bytes],
        *,
        dimensions: int | None,
        normalize: bool,
        background: bool = False,
    ) -> Embedded:
        """Vectors for ``data``: the first ``dimensions`` components, L2-normalised when asked
        (Matryoshka-style: a prefix of a unit vector is scaled back to unit length)."""
        with tracing.span("embeddings.embed", {"emb.model": spec.name, "emb.inputs": len(data)}):
            async with self._models.use(spec) as model:
                self._check_dimensions(dimensions, model.encoder.dimensions)
                if self.cache.enabled and model.fingerprint is not None:
                    vectors, prompt_tokens = await self._embed_cached(model, data, background)
                else:
                    prepared = await self._prepare(model.encoder, data)
                    prompt_tokens = self._check_tokens(prepared, model)
                    vectors = _stack(await model.batcher.embed(prepared, background=background))
        if dimensions is not None:
            vectors = vectors[:, :dimensions]
        if normalize:
            vectors = _l2(vectors)
        return Embedded(np.ascontiguousarray(vectors), prompt_tokens, spec.name)

    async def _embed_cached(
        self, model: LoadedModel, data: Sequence[str | bytes], background: bool
    ) -> tuple[Vectors, int]:
        """Raw vectors and tokens through the result cache: only the inputs it does not hold
        (and nobody is computing) go to the model; usage counts every input."""
        assert model.fingerprint is not None
        encoder = model.encoder
        scope = self.cache.scope(
            model.spec,
            fingerprint=model.fingerprint,
            modality=encoder.modality,
            dimensions=encoder.dimensions,
            max_input_tokens=encoder.max_input_tokens,
            truncate=self._limits.truncate,
            placement=encoder.placement,
        )

        async def compute(indices: list[int], tokens_known: int) -> list[CachedVector]:
            subset = [data[index] for index in indices]
            try:
                prepared = await self._prepare(encoder, subset)
            except BadInput as exc:  # name the input by its place in the request
                raise BadInput(indices[exc.index], exc.reason, code=exc.code) from exc
            self._check_tokens(prepared, model, tokens_known=tokens_known)
            rows = await model.batcher.embed(prepared, background=background)
            return [
                CachedVector.of(row, item.n_tokens)
                for row, item in zip(rows, prepared, strict=True)
            ]

        keys = await self.cache.keys(scope, data)
        entries = await self.cache.resolve(scope, keys, compute)
        prompt_tokens = self._check_total(sum(entry.n_tokens for entry in entries))
        return _stack([entry.array() for entry in entries]), prompt_tokens

    async def _prepare(self, encoder: Encoder, data: Sequence[str | bytes]) -> list[PreparedInput]:
        """Tokenise (a thread of the pool: tokenizers is Rust, no torch) or decode and preprocess
        images (the model thread: the image processors run torch kernels, see
        ``core/model_thread.py``)."""
        image = encoder.modality == "image"
        name = "embeddings.preprocess_images" if image else "embeddings.tokenize"
        with tracing.span(name, {"emb.inputs": len(data)}) as current:
            if image:
                prepared = await model_thread.run(
                    encoder.prepare, data, truncate=self._limits.truncate
                )
            else:
                prepared = await asyncio.to_thread(
                    encoder.prepare, data, truncate=self._limits.truncate
                )
            if current is not None:
                current.set_attribute("emb.tokens", sum(item.n_tokens for item in prepared))
            return prepared

    def _check_count(self, count: int) -> None:
        if count > self._limits.max_inputs_per_request:
            raise InvalidRequest(
                f"Too many inputs: {count} were sent, at most "
                f"{self._limits.max_inputs_per_request} are allowed in one request.",
                param="input",
            )

    async def _texts(
        self, spec: ModelSpec, inputs: list[str] | list[list[int]] | list[ImageObject]
    ) -> list[str]:
        if inputs and isinstance(inputs[0], ImageObject):
            raise _wrong_modality(spec, "images")
        if not inputs or isinstance(inputs[0], str):
            texts = cast(list[str], inputs)
            if any(text.startswith("data:image/") for text in texts):
                raise _wrong_modality(spec, "images")
            return texts
        arrays = cast(list[list[int]], inputs)
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

    def _check_tokens(
        self, prepared: list[PreparedInput], model: LoadedModel, *, tokens_known: int = 0
    ) -> int:
        """Tokens of ``prepared``, checked against the model's context and (with the
        ``tokens_known`` of the request's other inputs) the per-request limit."""
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
        self._check_total(tokens_known + total)
        return total

    def _check_total(self, total: int) -> int:
        if total > self._limits.max_tokens_per_request:
            raise InvalidRequest(
                f"Requested {total} tokens, max {self._limits.max_tokens_per_request} tokens "
                "per request.",
                param="input",
                code="max_tokens_per_request",
            )
        return total


def _wrong_modality(
    spec: ModelSpec, sent: Literal["text", "images", "token arrays"]
) -> InvalidRequest:
    takes = (
        "text (strings or token arrays)"
        if spec.modality == "text"
        else 'images (http(s) URLs, data:image/...;base64 URIs, or {"image": ...} objects)'
    )
    return InvalidRequest(
        f"The model `{spec.name}` takes {takes}; the request sent {sent}.", param="input"
    )


def _image_values(
    spec: ModelSpec, inputs: list[str] | list[list[int]] | list[ImageObject]
) -> list[str]:
    if inputs and isinstance(inputs[0], ImageObject):
        # Objects may also carry bare base64.
        return [item.image for item in inputs]
    if inputs and not isinstance(inputs[0], str):
        raise _wrong_modality(spec, "token arrays")
    values = cast(list[str], inputs)
    if not all(value.lstrip().lower().startswith(_IMAGE_SCHEMES) for value in values):
        raise _wrong_modality(spec, "text")
    return values


def _stack(rows: list[Vectors]) -> Vectors:
    stacked: Vectors = np.stack(rows).astype(np.float32, copy=False)
    return stacked


def _l2(vectors: Vectors) -> Vectors:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    unit: Vectors = (vectors / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)
    return unit
