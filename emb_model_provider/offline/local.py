"""The in-process engine: the registry's encoder in this process, batches cut from each chunk.

Vectors are those the server returns for the same inputs: the same encoder, the same truncation,
then ``dimensions`` as a re-normalised prefix (``base.unit_prefix``); a sparse (SPLADE) model's
rows are cut to their non-zero terms, ``dimensions`` keeping the top k
(``services.sparse.vectors_of``, the server's own). Images are read from local paths, or fetched
and decoded as the server does (``services.image_inputs.ImageLoader``: the SSRF-safe fetcher,
the same byte and pixel caps).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from emb_model_provider.core.config import Settings
from emb_model_provider.core.errors import BadInput, ConfigError, InvalidRequest, ProviderError
from emb_model_provider.core.kinds import Precision
from emb_model_provider.encoders.base import (
    Encoder,
    LoadOptions,
    PreparedInput,
    PromptedEncoder,
    RoutedEncoder,
    Vectors,
)
from emb_model_provider.encoders.sources import SourceError
from emb_model_provider.offline.base import BulkError, ChunkResult, empty_vectors, unit_prefix
from emb_model_provider.offline.records import ModelKind, Record
from emb_model_provider.registry import ModelSpec, Registry, build_encoder, default_dimensions
from emb_model_provider.security.fetch import FetchPolicy, ImageFetcher
from emb_model_provider.services.image_inputs import ImageLoader
from emb_model_provider.services.sparse import SparseVector, check_top_k, vectors_of


@dataclass(frozen=True)
class LocalConfig:
    """Plain, picklable values (Ray ships this to its actors): which model, where, how."""

    model: str
    dimensions: int | None = None
    batch_size: int = 64
    device: str = "auto"
    dtype: str = "auto"
    precision: Precision = "exact"
    models_file: str | None = None
    hf_token: str | None = None
    cache_dir: str | None = None
    num_threads: int = 0
    truncate: bool = True
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    trust_remote_code: bool = False
    allow_image_urls: bool = True
    url_allowlist: tuple[str, ...] = ()
    max_url_timeout_s: float = 20.0
    max_url_redirects: int = 3

    @classmethod
    def from_settings(
        cls, settings: Settings, *, model: str | None, dimensions: int | None, batch_size: int
    ) -> LocalConfig:
        return cls(
            model=model or settings.default_model,
            dimensions=dimensions,
            batch_size=batch_size,
            device=settings.device,
            dtype=settings.dtype,
            precision=settings.precision,
            # Absolute: Ray actors may run in another working directory.
            models_file=str(settings.models_file.resolve()) if settings.models_file else None,
            hf_token=settings.hf_token_value(),
            cache_dir=str(settings.cache_dir) if settings.cache_dir else None,
            num_threads=settings.num_threads,
            truncate=settings.truncate,
            max_image_bytes=settings.max_image_bytes,
            max_image_pixels=settings.max_image_pixels,
            trust_remote_code=settings.trust_remote_code,
            allow_image_urls=settings.allow_image_urls,
            url_allowlist=settings.url_allowlist_entries(),
            max_url_timeout_s=settings.max_url_timeout,
            max_url_redirects=settings.max_url_redirects,
        )

    @classmethod
    def create(cls, model: str, **values: Any) -> LocalConfig:
        """Defaults from ``EMB_PROVIDER_*`` settings, then ``values`` (the Python entry point)."""
        base = cls.from_settings(Settings(), model=model, dimensions=None, batch_size=64)
        return dataclasses.replace(base, **values)

    def spec(self) -> ModelSpec:
        return self.specs()[0]

    def specs(self) -> tuple[ModelSpec, ModelSpec]:
        """The model's spec and the spec whose weights serve it (its base, for a name that
        pins a prompt)."""
        try:
            registry = Registry.from_settings(Path(self.models_file) if self.models_file else None)
        except ConfigError as exc:
            raise BulkError(f"invalid models file: {exc.message}") from exc
        try:
            spec = registry.get(self.model)
        except ProviderError as exc:
            known = ", ".join(spec.name for spec in registry)
            raise BulkError(f"unknown model {self.model!r}; known: {known}") from exc
        return spec, registry.weights(spec)


class LocalEmbedder:
    """Loads the encoder once; ``embed`` is called with one chunk at a time."""

    def __init__(self, config: LocalConfig) -> None:
        from emb_model_provider.core.device import resolve_placement

        self._config = config
        self._spec, weights = config.specs()
        try:
            placement = resolve_placement(config.device, config.dtype)
        except ConfigError as exc:
            raise BulkError(f"invalid setting {exc.setting}: {exc.message}") from exc
        options = LoadOptions(
            device=str(placement.device),
            dtype=str(placement.dtype).removeprefix("torch."),
            hf_token=config.hf_token,
            cache_dir=config.cache_dir,
            num_threads=config.num_threads,
            max_image_pixels=config.max_image_pixels,
            trust_remote_code=config.trust_remote_code,
            precision=config.precision,
        )
        try:
            self._encoder: Encoder = build_encoder(weights, options)
        except SourceError as exc:
            raise BulkError(f"cannot load model {self._spec.name}: {exc}") from exc
        if self._encoder.task not in ("embed", "sparse"):  # a reranker's scores
            self._encoder.close()
            raise BulkError(
                f"model {self._spec.name} serves the task {self._encoder.task}; the embed command "
                "writes the vectors of embedding and sparse (SPLADE) models only"
            )
        #: A SPLADE model: (indices, values) pairs, cut to ``top_k`` as the server cuts them.
        self.sparse = self._encoder.task == "sparse"
        #: The prompt every text gets, as the server gives it: the name's pinned prompt, else
        #: the model's default.
        self._prompt: str | None = None
        if isinstance(self._encoder, PromptedEncoder):
            try:
                self._prompt = self._encoder.prompt_text(self._spec.prompt_name)
            except KeyError as exc:
                raise BulkError(
                    f"model {self._spec.name} pins the prompt {self._spec.prompt_name!r}, which "
                    f"its model does not have ({', '.join(self._encoder.prompts) or 'none'})"
                ) from exc
        #: An inference-free SPLADE's route (its Router's), picked by the pinned prompt name as
        #: the server picks it; None for other models.
        self._route: str | None = None
        if isinstance(self._encoder, RoutedEncoder):
            try:
                self._route = self._encoder.route(self._spec.prompt_name)
            except ValueError as exc:
                raise BulkError(f"model {self._spec.name}: {exc}") from exc
        native = self._encoder.dimensions
        # A sparse model's dimensions is a top-k, unbounded as on the server (k at or above the
        # vocabulary keeps every weight).
        wanted = None if self.sparse else config.dimensions
        if wanted is not None and not 1 <= wanted <= native:
            raise BulkError(
                f"--dimensions {config.dimensions}: {self._spec.name} has {native} dimensions; "
                f"ask for 1 to {native}"
            )
        try:  # the model's Matryoshka default, as the server applies it
            default = default_dimensions(weights, self._encoder)
        except SourceError as exc:
            raise BulkError(f"cannot load model {self._spec.name}: {exc}") from exc
        self.model = self._spec.name
        self.kind: ModelKind = self._spec.modality
        self.dimensions = native if self.sparse else config.dimensions or default
        #: The server's ``request.dimensions or spec.dimensions`` (services/embedding_service.py).
        self.top_k = (config.dimensions or self._spec.dimensions) if self.sparse else None
        try:  # a CSR model's top-k is at most its latents, as on the server
            check_top_k(self._spec.name, self._encoder, self.top_k)
        except InvalidRequest as exc:
            raise BulkError(f"--dimensions {self.top_k}: {exc}") from exc
        self.placement = self._encoder.placement
        self._policy = FetchPolicy(
            allow_urls=config.allow_image_urls,
            allowlist=config.url_allowlist,
            max_bytes=config.max_image_bytes,
            connect_timeout_s=min(5.0, config.max_url_timeout_s),
            total_timeout_s=config.max_url_timeout_s,
            max_redirects=config.max_url_redirects,
        )

    def embed(self, records: Sequence[Record]) -> ChunkResult:
        errors: dict[int, str] = {}
        data: dict[int, str | bytes] = {}
        for index, record in enumerate(records):
            if record.error is not None:
                errors[index] = record.error
            elif self.kind not in (record.kind, "multimodal"):
                errors[index] = f"a {record.kind} input, but the model takes {self.kind}"
            else:
                data[index] = record.value
        images = {index: value for index, value in data.items() if records[index].kind == "image"}
        if images:
            loaded = self._image_bytes(images, errors)
            data = {
                index: loaded[index] if index in images else value
                for index, value in data.items()
                if index not in images or index in loaded
            }
        prepared = self._prepare(data, errors)
        kept = sorted(prepared)
        result = ChunkResult(
            ids=[records[index].id for index in kept],
            vectors=[],
            tokens=sum(prepared[index].n_tokens for index in kept),
            errors=[(records[index].id, errors[index]) for index in sorted(errors)],
        )
        if self.sparse:
            pairs: dict[int, SparseVector] = {}
            for group, rows in self._encode(prepared):
                # Each batch's vocabulary-wide rows cut to their terms at once: a chunk's rows
                # would take 120 KB each (BERT's vocabulary).
                pairs.update(zip(group, vectors_of(self._encoder, rows, self.top_k), strict=True))
            result.vectors = [pairs[index] for index in kept]
            return result
        vectors: dict[int, Vectors] = {}
        for group, rows in self._encode(prepared):
            vectors.update(zip(group, rows, strict=True))
        stacked = (
            np.stack([vectors[index] for index in kept])
            if kept
            else empty_vectors(self._encoder.dimensions)
        )
        result.vectors = unit_prefix(stacked, self.dimensions, normalize=self._spec.normalize)
        return result

    def _image_bytes(
        self, values: dict[int, str | bytes], errors: dict[int, str]
    ) -> dict[int, str | bytes]:
        loaded: dict[int, str | bytes] = {}
        remote: dict[int, str] = {}
        for index, value in values.items():
            text = str(value)
            if text.lower().startswith(("http://", "https://", "data:")):
                remote[index] = text
                continue
            try:
                path = Path(text)
                size = path.stat().st_size
                if size > self._config.max_image_bytes:
                    errors[index] = (
                        f"{size} bytes, over the limit of {self._config.max_image_bytes}"
                    )
                    continue
                loaded[index] = path.read_bytes()
            except OSError as exc:
                errors[index] = f"cannot read the image: {exc.strerror or exc}"
        if remote:
            loaded.update(asyncio.run(self._fetch(remote, errors)))
        return loaded

    async def _fetch(self, values: dict[int, str], errors: dict[int, str]) -> dict[int, bytes]:
        loader = ImageLoader(ImageFetcher(self._policy), max_bytes=self._config.max_image_bytes)

        async def one(index: int, value: str) -> tuple[int, bytes | None]:
            try:
                return index, (await loader.load([value], ["image"]))[0]
            except ProviderError as exc:
                errors[index] = exc.message.removeprefix("image: ")
                return index, None

        try:
            results = await asyncio.gather(*(one(i, v) for i, v in values.items()))
        finally:
            await loader.aclose()
        return {index: data for index, data in results if data is not None}

    def _prepare_group(self, values: list[str | bytes]) -> list[PreparedInput]:
        if self._route is not None and isinstance(self._encoder, RoutedEncoder):
            return self._encoder.prepare(
                values, truncate=self._truncate, prompt=self._prompt, route=self._route
            )
        if self._prompt is not None and isinstance(self._encoder, PromptedEncoder):
            return self._encoder.prepare(values, truncate=self._truncate, prompt=self._prompt)
        return self._encoder.prepare(values, truncate=self._truncate)

    def _prepare(
        self, data: dict[int, str | bytes], errors: dict[int, str]
    ) -> dict[int, PreparedInput]:
        """Each input prepared; an input the encoder refuses is an error of its own."""
        prepared: dict[int, PreparedInput] = {}
        indices = sorted(data)
        size = self._config.batch_size
        for start in range(0, len(indices), size):
            group = indices[start : start + size]
            try:
                items = self._prepare_group([data[i] for i in group])
                prepared.update(zip(group, items, strict=True))
            except InvalidRequest:  # find which one, and keep the others
                for index in group:
                    try:
                        (item,) = self._prepare_group([data[index]])
                        prepared[index] = item
                    except InvalidRequest as exc:
                        errors[index] = exc.reason if isinstance(exc, BadInput) else exc.message
        limit = self._encoder.max_input_tokens
        for index, item in list(prepared.items()):
            if item.n_tokens > limit:  # only when truncation is off, as the server's 400
                errors[index] = f"{item.n_tokens} tokens, over the model's limit of {limit}"
                del prepared[index]
        return prepared

    @property
    def _truncate(self) -> bool:
        return self._config.truncate

    def _encode(self, prepared: dict[int, PreparedInput]) -> Iterator[tuple[list[int], Vectors]]:
        """Each batch's indices and rows."""
        # Longest first, as sentence-transformers' encode: batches of similar lengths pad little.
        order = sorted(prepared, key=lambda index: -prepared[index].n_tokens)
        size = self._config.batch_size
        for start in range(0, len(order), size):
            group = order[start : start + size]
            yield group, self._encoder.encode([prepared[index] for index in group])

    def close(self) -> None:
        self._encoder.close()
