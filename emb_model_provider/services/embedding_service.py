"""POST /v1/embeddings without HTTP or torch: registry lookup, input checks, token counts,
batching, ``dimensions``, and the response body.

Traced requests get a span for the input checks and one for tokenisation (or image
preprocessing), children of the request's; the cache, the image loader and the batcher add
theirs (``core/tracing.py``).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import numpy as np

from emb_model_provider.core import model_thread, tracing
from emb_model_provider.core.errors import (
    BadInput,
    ContextLengthExceeded,
    InvalidRequest,
    ModelLoadFailed,
)
from emb_model_provider.core.kinds import QUANTIZATIONS, Quantization, Task, TruncationSide
from emb_model_provider.core.quantization import IntVectors, quantize
from emb_model_provider.encoders.base import (
    Encoder,
    EncoderInput,
    ImagePreparing,
    PreparedInput,
    PromptedEncoder,
    RoutedEncoder,
    SideTruncating,
    TokenCapping,
    Vectors,
)
from emb_model_provider.protocol import EmbeddingRequest, ImageObject, Inputs, render_embeddings
from emb_model_provider.registry import ModelSpec
from emb_model_provider.services import sparse
from emb_model_provider.services.cache import CachedVector, ResultCache
from emb_model_provider.services.image_inputs import ImageLoader
from emb_model_provider.services.models import LoadedModel, ModelManager
from emb_model_provider.services.quantize import Calibrations
from emb_model_provider.services.token_arrays import decode_token_arrays

#: Token arrays up to this many ids in total are decoded on the event loop (microseconds);
#: longer ones go to a worker thread.
_INLINE_DECODE_TOKENS = 4096
_IMAGE_SCHEMES = ("http://", "https://", "data:")
#: Calibration texts go to the batcher this many at a time.
_CALIBRATION_SLICE = 64


@dataclass(frozen=True)
class RequestLimits:
    max_inputs_per_request: int
    max_tokens_per_request: int
    truncate: bool


@dataclass(frozen=True)
class TokenCap:
    """A request's cap on the tokens of each text, below the model's limit (Cohere's
    ``max_tokens``, vLLM's ``truncate_prompt_tokens``): special tokens and the prompt count.
    Truncation cuts texts at it; with truncation off a longer text is refused."""

    tokens: int
    #: The request field, named in errors.
    param: str
    #: A cap above the model's limit: a 400 (vLLM), else the model's limit (Cohere).
    refuse_above_limit: bool = False


@dataclass(frozen=True)
class Embedded:
    """Vectors in input order and the tokens the model processed for them."""

    vectors: Vectors
    prompt_tokens: int
    model: str


@dataclass(frozen=True)
class Computed:
    """What the encoder returned for a request's inputs, in order (vectors, or a reranker's
    logits), the tokens the model processed, and the encoder (for task-specific finishing)."""

    rows: Vectors
    prompt_tokens: int
    encoder: Encoder
    #: The model's default output size (a Matryoshka default may cut the encoder's vectors).
    dimensions: int


#: Per task: what its models are called and where they are served, for the error that names the
#: route a model belongs on; and the prefix of its trace spans.
_TASK_ROUTES: dict[Task, tuple[str, str, str]] = {
    "embed": ("an embedding model", "embedding models", "/v1/embeddings"),
    "rerank": ("a reranker", "rerankers", "/v1/rerank"),
    "sparse": ("a sparse model", "sparse models", "/v1/embeddings and /embed_sparse"),
}
_SPAN_PREFIX: dict[Task, str] = {"embed": "embeddings", "rerank": "rerank", "sparse": "sparse"}


def check_task(spec: ModelSpec, serves: Task, wanted: Task) -> None:
    """Refuse a model named on the routes of a task it does not serve."""
    if serves != wanted:
        noun, _, route = _TASK_ROUTES[serves]
        raise InvalidRequest(
            f"The model `{spec.name}` is {noun} (task `{serves}`), served on {route}; "
            f"this route takes {_TASK_ROUTES[wanted][1]} (task `{wanted}`).",
            param="model",
            code="wrong_model_task",
        )


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
        self.calibrations = Calibrations(self._calibration_vectors)

    async def create(self, request: EmbeddingRequest, *, background: bool = False) -> Reply:
        """The response to one /v1/embeddings request. ``background`` (Batch API jobs) yields
        the model to interactive requests."""
        spec, data = await self.request_data(request)
        if await self.task_of(spec) == "sparse":
            return await self._create_sparse(spec, data, request, background)
        truncate, cap = vllm_token_cap(request.truncate_prompt_tokens)
        result = await self.embed(
            spec,
            data,
            dimensions=request.dimensions,
            normalize=spec.normalize,
            background=background,
            prompt_name=request.prompt_name,
            truncate=truncate,
            max_tokens=cap,
        )
        encoding_format = request.encoding_format or "float"
        vectors: Vectors | IntVectors = result.vectors
        if encoding_format in QUANTIZATIONS:
            vectors = await self.quantized(spec, result.vectors, encoding_format)
        body = render_embeddings(
            vectors,
            model=result.model,
            encoding_format=encoding_format,
            prompt_tokens=result.prompt_tokens,
        )
        return Reply(body, result.model, len(result.vectors), result.prompt_tokens)

    async def task_of(self, spec: ModelSpec) -> Task:
        """The task ``spec`` serves: known from its files, else its loaded encoder's."""
        known = self._models.registry.task(spec)
        if known is not None:
            return known
        async with self._models.use(spec) as model:
            return model.encoder.task

    async def _create_sparse(
        self,
        spec: ModelSpec,
        data: Sequence[EncoderInput],
        request: EmbeddingRequest,
        background: bool,
    ) -> Reply:
        """A sparse model on /v1/embeddings: ``{"indices", "values"}`` embeddings, and
        ``dimensions`` (the request's, else the models file's) keeps the top-k weights
        (``services/sparse.py``)."""
        sparse.refuse_encoding(spec, request.encoding_format)
        truncate, cap = vllm_token_cap(request.truncate_prompt_tokens)
        result = await sparse.sparse_vectors(
            self,
            spec,
            data,
            top_k=request.dimensions or spec.dimensions,
            prompt_name=request.prompt_name,
            background=background,
            truncate=truncate,
            max_tokens=cap,
        )
        body = sparse.render_openai(result)
        return Reply(body, result.model, len(result.vectors), result.prompt_tokens)

    async def request_data(self, request: EmbeddingRequest) -> tuple[ModelSpec, list[str | bytes]]:
        """The model of a request and its inputs checked and ready for ``embed``: texts as
        strings, images loaded as bytes (the other wire formats' adapters share this)."""
        with tracing.leaf("embeddings.check_inputs"):
            spec = self._models.registry.get(request.model)
            inputs = request.inputs()
            self._check_count(len(inputs))
            if spec.modality == "image":
                values = _image_values(spec, inputs)
            elif spec.modality == "text":
                texts = await self._texts(spec, inputs)
        if spec.modality == "image":
            data: Sequence[str | bytes] = await self._images.load(
                values, [f"input[{index}]" for index in range(len(values))]
            )
        elif spec.modality == "multimodal":
            data = await self._texts_and_images(inputs)
        else:
            data = texts
        return spec, list(data)

    async def quantized(
        self, spec: ModelSpec, vectors: Vectors, precision: Quantization
    ) -> IntVectors:
        """``vectors`` as ``embed`` returned them for ``spec`` (cut, normalised), quantised: the
        int8/uint8 ranges are the model's (``services/quantize.py``), never this batch's."""
        ranges = None
        if precision in ("int8", "uint8"):
            async with self._models.use(spec) as model:
                if model.encoder.modality == "image":
                    raise InvalidRequest(
                        f"The model `{spec.name}` has no int8/uint8 calibration (it takes images "
                        "only); ask for float, base64, binary or ubinary.",
                        param="encoding_format",
                    )
                ranges = await self.calibrations.ranges(
                    model, int(vectors.shape[1]), normalize=spec.normalize
                )
        return quantize(vectors, precision, ranges)

    async def _calibration_vectors(self, model: LoadedModel, texts: list[str]) -> Vectors:
        """Raw vectors of calibration texts (the model's default prompt, truncated to fit),
        through the batcher in slices that never fill its queue."""
        encoder = model.encoder
        prompt = encoder.prompt_text(None) if isinstance(encoder, PromptedEncoder) else None
        rows: list[Vectors] = []
        for start in range(0, len(texts), _CALIBRATION_SLICE):
            part = texts[start : start + _CALIBRATION_SLICE]
            if isinstance(encoder, PromptedEncoder):
                prepared = await asyncio.to_thread(
                    encoder.prepare, part, truncate=True, prompt=prompt
                )
            else:
                prepared = await asyncio.to_thread(encoder.prepare, part, truncate=True)
            rows.extend(await model.batcher.embed(prepared))
        return _stack(rows)

    async def embed_images(
        self, model: str, values: Sequence[str | bytes], labels: Sequence[str], *, normalize: bool
    ) -> Embedded:
        """For the batch-first image API: images as URLs, data URIs, base64 or uploaded bytes,
        named by label in errors. ``normalize=False`` returns the raw pooled vectors."""
        with tracing.leaf("embeddings.check_inputs"):
            spec = self._models.registry.get(model)
            if spec.modality not in ("image", "multimodal"):
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
        prompt_name: str | None = None,
        truncate: bool | None = None,
        prompt_if_known: bool = False,
        truncation_side: TruncationSide | None = None,
        max_tokens: TokenCap | None = None,
    ) -> Embedded:
        """Vectors for ``data``: the first ``dimensions`` components (None: the model's
        default size), L2-normalised when asked (Matryoshka-style: a prefix of a unit vector is
        scaled back to unit length). ``prompt_name`` (else the name's pinned prompt, else the
        model's default) is prepended to every text; with ``prompt_if_known`` a name the model
        lacks falls back to that default (Cohere's ``input_type``). ``truncate`` (None: the
        server's setting) cuts over-long texts, from ``truncation_side`` (None: the model's
        tokenizer's side), or refuses them; ``max_tokens`` caps each text below the model's
        limit."""
        computed = await self.run(
            spec,
            data,
            task="embed",
            background=background,
            prompt_name=prompt_name,
            prompt_if_known=prompt_if_known,
            truncate=truncate,
            truncation_side=truncation_side,
            max_tokens=max_tokens,
            check=lambda encoder: self._check_dimensions(dimensions, encoder.dimensions),
        )
        vectors = computed.rows
        if dimensions is None:
            dimensions = computed.dimensions
        if dimensions is not None:
            vectors = vectors[:, :dimensions]
        if normalize:
            vectors = _l2(vectors)
        return Embedded(np.ascontiguousarray(vectors), computed.prompt_tokens, spec.name)

    async def run(
        self,
        spec: ModelSpec,
        data: Sequence[EncoderInput],
        *,
        task: Task,
        background: bool = False,
        prompt_name: str | None = None,
        prompt_if_known: bool = False,
        truncate: bool | None = None,
        check: Callable[[Encoder], None] | None = None,
        truncation_side: TruncationSide | None = None,
        max_tokens: TokenCap | None = None,
    ) -> Computed:
        """What every task shares: the model (refused when it serves another task), ``check``
        of the loaded encoder, the prompt, the result cache, tokenisation, the context and
        per-request token limits, and the dynamic batcher. ``truncate``: the request's choice,
        else the server's; ``truncation_side``: the end over-long texts are cut from, else the
        model's; ``max_tokens``: the request's cap on each text (``TokenCap``)."""
        known = self._models.registry.task(spec)
        if known is not None:  # refused before a load
            check_task(spec, known, task)
        truncate = self._limits.truncate if truncate is None else truncate
        async with self._models.use(spec) as model:
            check_task(spec, model.encoder.task, task)
            if check is not None:
                check(model.encoder)
            encoder = model.encoder
            if prompt_if_known and not (
                isinstance(encoder, PromptedEncoder) and prompt_name in encoder.prompts
            ):
                prompt_name = None
            prompt = _prompt(spec, encoder, prompt_name)
            route = _route(spec, encoder, prompt_name)
            side = _side(encoder, truncate, truncation_side)
            cap = _cap(spec, encoder, max_tokens)
            if self.cache.enabled and model.fingerprint is not None:
                rows, prompt_tokens = await self._embed_cached(
                    model, data, background, prompt, truncate, side=side, route=route, cap=cap
                )
            else:
                prepared = await self._prepare(
                    model.encoder, data, prompt, truncate, side, route=route, cap=cap
                )
                prompt_tokens = self._check_tokens(prepared, model, cap=cap)
                rows = _stack(await model.batcher.embed(prepared, background=background))
        return Computed(rows, prompt_tokens, model.encoder, model.dimensions)

    async def _embed_cached(
        self,
        model: LoadedModel,
        data: Sequence[EncoderInput],
        background: bool,
        prompt: str | None,
        truncate: bool,
        *,
        side: TruncationSide | None,
        route: str | None = None,
        cap: TokenCap | None = None,
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
            truncate=truncate,
            placement=encoder.placement,
            prompt=prompt,
            route=route,
            truncation_side=side,
            max_tokens=None if cap is None else cap.tokens,
        )

        async def compute(indices: list[int], tokens_known: int) -> list[CachedVector]:
            subset = [data[index] for index in indices]
            try:
                prepared = await self._prepare(
                    encoder, subset, prompt, truncate, side, route=route, cap=cap
                )
            except BadInput as exc:  # name the input by its place in the request
                raise BadInput(indices[exc.index], exc.reason, code=exc.code) from exc
            self._check_tokens(prepared, model, tokens_known=tokens_known, cap=cap)
            rows = await model.batcher.embed(prepared, background=background)
            return [
                CachedVector.of(row, item.n_tokens)
                for row, item in zip(rows, prepared, strict=True)
            ]

        keys = await self.cache.keys(scope, data)
        entries = await self.cache.resolve(scope, keys, compute)
        prompt_tokens = self._check_total(sum(entry.n_tokens for entry in entries))
        return _stack([entry.array() for entry in entries]), prompt_tokens

    async def _prepare(
        self,
        encoder: Encoder,
        data: Sequence[EncoderInput],
        prompt: str | None,
        truncate: bool,
        side: TruncationSide | None = None,
        *,
        route: str | None = None,
        cap: TokenCap | None = None,
    ) -> list[PreparedInput]:
        """Tokenise (a thread of the pool: tokenizers is Rust, no torch) or decode and preprocess
        images (where the encoder says: the model thread on CPU, as the image processors run
        torch kernels, a decode worker on a GPU; see ``core/model_thread.py``); a multimodal
        model's texts and images each their way."""
        image = encoder.modality == "image"
        prefix = _SPAN_PREFIX[encoder.task]
        name = f"{prefix}.preprocess_images" if image else f"{prefix}.tokenize"
        if encoder.modality == "multimodal":
            name = f"{prefix}.prepare_inputs"  # texts tokenised, images preprocessed
        with tracing.leaf(name, {"emb.inputs": len(data)}) as current:
            if encoder.modality == "multimodal":
                prepared = await self._prepare_mixed(encoder, data, truncate, side)
            elif image:
                prepared = await _prepare_images(encoder, data, truncate=truncate)
            else:
                prepared = await asyncio.to_thread(
                    _text_prepare(encoder, truncate, side, prompt, route, cap=cap), data
                )
            if current is not None:
                current.set_attribute("emb.tokens", sum(item.n_tokens for item in prepared))
            return prepared

    async def _prepare_mixed(
        self,
        encoder: Encoder,
        data: Sequence[EncoderInput],
        truncate: bool,
        side: TruncationSide | None = None,
    ) -> list[PreparedInput]:
        text_at = [index for index, value in enumerate(data) if isinstance(value, str)]
        image_at = [index for index, value in enumerate(data) if isinstance(value, bytes)]

        async def part(indices: list[int], images: bool) -> list[PreparedInput]:
            if not indices:
                return []
            subset = [data[index] for index in indices]
            try:
                if images:
                    return await _prepare_images(encoder, subset, truncate=truncate)
                return await asyncio.to_thread(_text_prepare(encoder, truncate, side), subset)
            except BadInput as exc:  # name the input by its place in the request
                raise BadInput(indices[exc.index], exc.reason, code=exc.code) from exc

        texts, images = await asyncio.gather(
            part(text_at, images=False), part(image_at, images=True)
        )
        prepared: list[PreparedInput | None] = [None] * len(data)
        for indices, items in ((text_at, texts), (image_at, images)):
            for index, item in zip(indices, items, strict=True):
                prepared[index] = item
        return [item for item in prepared if item is not None]

    async def _texts_and_images(self, inputs: Inputs) -> list[str | bytes]:
        """A multimodal request's inputs in order: strings are texts (an http(s) URL too: a
        caption may be a URL, so only ``{"image": ...}`` objects and ``data:image/`` strings are
        images), image objects are loaded as for image models, token arrays are decoded."""
        if inputs and not isinstance(inputs[0], (str, ImageObject)):
            return list(await self._texts_from_tokens(inputs))
        items = cast(list[str | ImageObject], inputs)
        image_at: list[int] = []
        image_values: list[str] = []
        data: list[str | bytes] = []
        for index, item in enumerate(items):
            if isinstance(item, ImageObject):
                image_at.append(index)
                image_values.append(item.image)
            elif item.lstrip().lower().startswith("data:image/"):
                image_at.append(index)
                image_values.append(item)
            data.append(item if isinstance(item, str) else "")
        if image_at:
            loaded = await self._images.load(
                image_values, [f"input[{index}]" for index in image_at]
            )
            for index, value in zip(image_at, loaded, strict=True):
                data[index] = value
        return data

    def _check_count(self, count: int) -> None:
        if count > self._limits.max_inputs_per_request:
            raise InvalidRequest(
                f"Too many inputs: {count} were sent, at most "
                f"{self._limits.max_inputs_per_request} are allowed in one request.",
                param="input",
            )

    async def _texts(self, spec: ModelSpec, inputs: Inputs) -> list[str]:
        if any(isinstance(item, ImageObject) for item in inputs):
            raise _wrong_modality(spec, "images")
        if not inputs or isinstance(inputs[0], str):
            texts = cast(list[str], inputs)
            if any(text.startswith("data:image/") for text in texts):
                raise _wrong_modality(spec, "images")
            return texts
        return await self._texts_from_tokens(cast(list[list[int]], inputs))

    @staticmethod
    async def _texts_from_tokens(arrays: list[list[int]]) -> list[str]:
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
        self,
        prepared: list[PreparedInput],
        model: LoadedModel,
        *,
        tokens_known: int = 0,
        cap: TokenCap | None = None,
    ) -> int:
        """Tokens of ``prepared``, checked against the model's context (or the request's
        ``cap``) and (with the ``tokens_known`` of the request's other inputs) the per-request
        limit."""
        limit = model.encoder.max_input_tokens
        for item in prepared:
            if cap is not None and item.n_tokens > cap.tokens:  # truncation off
                raise InvalidRequest(
                    f"An input has {item.n_tokens} tokens, more than the {cap.param} of "
                    f"{cap.tokens} tokens per input; raise {cap.param}, or let over-long texts "
                    "be truncated.",
                    param=cap.param,
                    code="context_length_exceeded",
                )
            if item.n_tokens > limit:  # only possible when truncation is off
                raise ContextLengthExceeded(limit, item.n_tokens)
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


async def _prepare_images(
    encoder: Encoder, data: Sequence[EncoderInput], *, truncate: bool
) -> list[PreparedInput]:
    """``encoder.prepare`` for images where the encoder says: a decode worker for a model on a
    GPU (the model thread then only launches forwards), else the model thread."""
    if isinstance(encoder, ImagePreparing) and encoder.image_prepare_thread == "worker":
        return await model_thread.run_decode(encoder.prepare, data, truncate=truncate)
    return await model_thread.run(encoder.prepare, data, truncate=truncate)


def _text_prepare(
    encoder: Encoder,
    truncate: bool,
    side: TruncationSide | None,
    prompt: str | None = None,
    route: str | None = None,
    *,
    cap: TokenCap | None = None,
) -> Callable[[Sequence[EncoderInput]], list[PreparedInput]]:
    """``encoder.prepare`` of texts with a request's options: the prompt where the encoder takes
    prompts, the side only where one applies (``_side``), the route where the model has routes
    (``_route``), so that an encoder without them keeps the plain ``prepare(inputs, *,
    truncate)``."""
    options: dict[str, Any] = {"truncate": truncate}
    if prompt is not None and isinstance(encoder, PromptedEncoder):
        options["prompt"] = prompt
    if side is not None:
        options["truncation_side"] = side
    if route is not None and isinstance(encoder, RoutedEncoder):
        options["route"] = route
    if cap is not None:  # only a TokenCapping encoder gets one (``_cap``)
        options["max_tokens"] = cap.tokens
    return functools.partial(encoder.prepare, **options)


def vllm_token_cap(value: int | None) -> tuple[bool | None, TokenCap | None]:
    """vLLM's ``truncate_prompt_tokens`` as (truncate, cap): any value truncates (None: the
    server's setting), -1 at the model's limit, N at N tokens (refused above the limit)."""
    if value is None:
        return None, None
    if value == -1:
        return True, None
    return True, TokenCap(value, "truncate_prompt_tokens", refuse_above_limit=True)


def _cap(spec: ModelSpec, encoder: Encoder, requested: TokenCap | None) -> TokenCap | None:
    """The cap a request's texts get: None when it asks none, when the model takes images only
    (nothing to cut), or when the model's own limit is as low (the model's limit wins). A cap
    above the limit is refused where the request's API says so (vLLM's)."""
    if requested is None or encoder.modality == "image":
        return None
    limit = encoder.max_input_tokens
    if requested.tokens > limit and requested.refuse_above_limit:
        raise InvalidRequest(
            f"{requested.param}={requested.tokens} is more than the {limit} tokens the model "
            f"`{spec.name}` takes; ask for 1 to {limit}, or -1 for the model's limit.",
            param=requested.param,
        )
    if requested.tokens >= limit:
        return None
    if not isinstance(encoder, TokenCapping):
        raise InvalidRequest(
            f"The model `{spec.name}` does not take {requested.param}: its texts are cut at "
            f"its own limit of {limit} tokens.",
            param=requested.param,
        )
    if requested.tokens <= encoder.special_tokens:
        raise InvalidRequest(
            f"{requested.param}={requested.tokens} leaves no room for text: the model "
            f"`{spec.name}` adds {encoder.special_tokens} special tokens to each; ask for at least "
            f"{encoder.special_tokens + 1}.",
            param=requested.param,
        )
    return requested


def _side(
    encoder: Encoder, truncate: bool, requested: TruncationSide | None
) -> TruncationSide | None:
    """The side a request's over-long texts are cut from: the one it names, else the model's;
    None when nothing is cut (truncation off, or an encoder of images only), so that the cache
    keys of such requests do not depend on it."""
    if not truncate or not isinstance(encoder, SideTruncating):
        return None
    return requested or encoder.truncation_side


def _prompt(spec: ModelSpec, encoder: Encoder, requested: str | None) -> str | None:
    """The prompt text for a request: its ``prompt_name``, else the name's pinned prompt, else
    the model's default; a name the model does not have is the request's (or the config's)
    error."""
    name = requested if requested is not None else spec.prompt_name
    if not isinstance(encoder, PromptedEncoder):
        if name is not None:
            raise InvalidRequest(
                f"The model `{spec.name}` takes no prompts; leave out prompt_name.",
                param="prompt_name",
            )
        return None
    try:
        return encoder.prompt_text(name)
    except KeyError:
        known = ", ".join(sorted(encoder.prompts)) or "none"
        if requested is None:  # the models file pins a prompt the model does not have
            raise ModelLoadFailed(
                f"The model `{spec.name}` pins the prompt `{name}`, which its model does not "
                f"have (its prompts: {known}).",
                param="model",
            ) from None
        raise InvalidRequest(
            f"The model `{spec.name}` has no prompt `{name}`; its prompts are: {known}.",
            param="prompt_name",
        ) from None


def _route(spec: ModelSpec, encoder: Encoder, requested: str | None) -> str | None:
    """The route a routed model (an inference-free SPLADE's Router) takes for a request: by its
    ``prompt_name``, else the name's pinned prompt, as ``_prompt`` reads them; None for other
    models."""
    if not isinstance(encoder, RoutedEncoder):
        return None
    try:
        return encoder.route(requested if requested is not None else spec.prompt_name)
    except ValueError as exc:
        raise InvalidRequest(f"The model `{spec.name}`: {exc}.", param="prompt_name") from None


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


def _image_values(spec: ModelSpec, inputs: Inputs) -> list[str]:
    if inputs and not isinstance(inputs[0], (str, ImageObject)):
        raise _wrong_modality(spec, "token arrays")
    values: list[str] = []
    for item in cast(list[str | ImageObject], inputs):
        if isinstance(item, ImageObject):
            values.append(item.image)  # objects may also carry bare base64
        elif item.lstrip().lower().startswith(_IMAGE_SCHEMES):
            values.append(item)
        else:
            raise _wrong_modality(spec, "text")
    return values


def _stack(rows: list[Vectors]) -> Vectors:
    stacked: Vectors = np.stack(rows).astype(np.float32, copy=False)
    return stacked


def _l2(vectors: Vectors) -> Vectors:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    unit: Vectors = (vectors / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)
    return unit
