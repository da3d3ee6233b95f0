"""sentence-transformers' saved modules, read and run without sentence-transformers.

A sentence-transformers directory lists its modules in ``modules.json``; the ones a text
embedding model is made of are served here: Transformer (``sentence_bert_config.json``:
``max_seq_length``, ``do_lower_case``), Pooling (``1_Pooling/config.json``: every mode of
``Pooling.py`` and ``include_prompt``), Dense (a linear layer, an activation, an optional
residual) and Normalize. Prompts come from ``config_sentence_transformers.json``. Any other
module fails the load with a line that names it: nothing is imported from a name a model
directory gives.

The modules run in their saved order, each on the feature it names (``module_input_name``, as
sentence-transformers 6 does): a Dense or Normalize on ``token_embeddings`` before Pooling is
applied to every token before pooling, one on ``sentence_embedding`` after it. An order that
cannot be honoured (a token-level module after Pooling, which would change nothing, or a
sentence-level one before it, which has no input yet) fails the load with a line saying so, as
does any saved key that would change the vectors and is not served (a ``model_type`` other than
SentenceTransformer, per-task lengths, query expansion, processing arguments, a Transformer
task or output other than feature extraction's token embeddings). Nothing that changes vectors
is ignored.

Pooling works on the flat layout, every sentence's real tokens one after another (the
arithmetic of ``Pooling._forward_padded`` on right-padded rows, which ``_forward_flattened``
shares): the unpadded and the length-grouped forwards both produce it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from emb_model_provider.core.kinds import POOLING_MODES, Pooling
from emb_model_provider.encoders.sources import SourceError

#: sentence-transformers >= 6 writes ``pooling_mode``; earlier versions one flag per mode.
_LEGACY_FLAGS: dict[str, Pooling] = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}

#: Dense activations sentence-transformers saves as ``torch.nn`` class paths, by class name.
#: Only these are built; any other path fails the load instead of being imported.
ACTIVATIONS: dict[str, type[torch.nn.Module]] = {
    "Tanh": torch.nn.Tanh,
    "Identity": torch.nn.Identity,
    "ReLU": torch.nn.ReLU,
    "GELU": torch.nn.GELU,
    "Sigmoid": torch.nn.Sigmoid,
    "SiLU": torch.nn.SiLU,
    "LeakyReLU": torch.nn.LeakyReLU,
    "Softplus": torch.nn.Softplus,
}

_MODULES = ("Transformer", "Pooling", "Dense", "Normalize")

Feature = Literal["token_embeddings", "sentence_embedding"]
_FEATURES: tuple[Feature, ...] = ("token_embeddings", "sentence_embedding")

#: The ``model_type`` of a saved sentence-transformers model this loader serves (older saves
#: have none, which sentence-transformers reads as this).
SENTENCE_TRANSFORMER = "SentenceTransformer"
#: The ``model_type`` of a saved ``SparseEncoder`` (a CSR model's dense modules are read here).
SPARSE_ENCODER = "SparseEncoder"

#: Transformer keys (``sentence_bert_config.json``) that change vectors and are not served,
#: with the value that is served; anything else set fails the load by name.
_TRANSFORMER_DEFAULTS: dict[str, object] = {
    "transformer_task": "feature-extraction",
    "module_output_name": "token_embeddings",
    "query_length": None,
    "document_length": None,
    "query_expansion": None,
}
#: The ``processing_kwargs`` entries that reach a plain text's tokenisation (the others are for
#: images, audio, video and chat messages, which a text model is not sent).
_TEXT_PROCESSING = ("common", "text")


@dataclass(frozen=True)
class PoolingConfig:
    modes: tuple[Pooling, ...]
    #: False: prompt tokens are left out of the pooled tokens (INSTRUCTOR-style models).
    include_prompt: bool = True

    @property
    def name(self) -> str:
        return "+".join(self.modes)


@dataclass(frozen=True)
class DenseConfig:
    path: Path
    in_features: int
    out_features: int
    bias: bool
    activation: str
    #: ``use_residual``: the input added back (through a bias-free projection when the sizes
    #: differ).
    residual: bool = False
    #: The feature it reads and writes: ``sentence_embedding`` (after Pooling) or
    #: ``token_embeddings`` (before it).
    feature: Feature = "sentence_embedding"


#: A step of the token-level or sentence-level head: a Dense layer, or an L2 normalisation.
Step = DenseConfig | Literal["normalize"]


@dataclass(frozen=True)
class SentenceConfig:
    """What sentence-transformers' saved modules say about how to embed with this model."""

    transformer_dir: Path
    max_seq_length: int | None = None
    do_lower_case: bool = False
    pooling: PoolingConfig | None = None
    #: Steps on every token before pooling (a Dense or Normalize on ``token_embeddings``).
    token_steps: tuple[Step, ...] = ()
    #: Dense layers after pooling.
    dense: tuple[DenseConfig, ...] = ()
    #: The model ends with Normalize. The encoder leaves it to the service, which normalises
    #: unless the models file says ``normalize: false`` (then the vectors before Normalize).
    normalize: bool = False
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    #: False: a plain transformers checkpoint (no ``modules.json``), whose pooling
    #: sentence-transformers picks from the architecture.
    has_modules: bool = True


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SourceError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise SourceError(f"{path} is not a JSON object")
    return data


def read_sentence_config(model_dir: Path, *, sparse_head: str | None = None) -> SentenceConfig:
    """What ``model_dir``'s saved modules say. ``sparse_head``: the directory is a
    ``SparseEncoder`` whose last module is of that kind (a CSR model's ``SparseAutoEncoder``),
    run by the caller on the sentence embedding of the modules before it, read here."""
    prompts, default_prompt = _read_prompts(
        model_dir, model_type=SPARSE_ENCODER if sparse_head else SENTENCE_TRANSFORMER
    )
    modules_file = model_dir / "modules.json"
    if not modules_file.is_file():  # a plain transformers checkpoint
        return SentenceConfig(
            model_dir, prompts=prompts, default_prompt_name=default_prompt, has_modules=False
        )
    try:
        modules = json.loads(modules_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SourceError(f"cannot read {modules_file}: {exc}") from exc
    if not isinstance(modules, list):
        raise SourceError(f"{modules_file} is not a list of modules")
    if sparse_head is not None:
        modules = _without_head(modules, sparse_head, modules_file)
    transformer_dir = model_dir
    max_seq_length: int | None = None
    do_lower_case = False
    pooling: PoolingConfig | None = None
    token_steps: list[Step] = []
    dense: list[DenseConfig] = []
    normalize = False
    for index, module in enumerate(modules):
        type_path = str(module.get("type", "")) if isinstance(module, dict) else ""
        kind = type_path.rsplit(".", 1)[-1]
        if not type_path.startswith("sentence_transformers.") or kind not in _MODULES:
            raise SourceError(
                f"sentence-transformers module {type_path or json.dumps(module)} is not supported "
                f"(supported: {', '.join(_MODULES)})"
            )
        path = model_dir / str(module.get("path", ""))
        if (kind == "Transformer") != (index == 0):
            raise SourceError(
                f"{modules_file}: the Transformer must be the first module and the only one "
                f"(found {kind} at position {index})"
            )
        if kind == "Transformer":
            transformer_dir = path
            max_seq_length, do_lower_case = _transformer_config(path)
            continue
        if kind == "Pooling":
            if pooling is not None:
                raise SourceError(f"{modules_file}: more than one Pooling module")
            pooling = pooling_config(_read_json(path / "config.json"))
            continue
        if normalize:
            raise SourceError(f"sentence-transformers module {type_path} after Normalize")
        step: Step = _dense_config(path) if kind == "Dense" else "normalize"
        feature = step.feature if isinstance(step, DenseConfig) else _normalize_feature(path)
        if (feature == "token_embeddings") != (pooling is None):
            raise SourceError(
                f"{path.name} ({kind}) reads {feature} "
                + (
                    "after Pooling, where it would not change the sentence embedding"
                    if pooling
                    else "before Pooling, where there is no sentence embedding yet"
                )
                + "; this module order is not supported"
            )
        if pooling is None:
            token_steps.append(step)
        elif isinstance(step, DenseConfig):
            dense.append(step)
        else:
            normalize = True
    if pooling is None:
        raise SourceError(
            f"{modules_file} has no Pooling module: no sentence embedding is made "
            "(token-level models are not served)"
        )
    return SentenceConfig(
        transformer_dir,
        max_seq_length=max_seq_length,
        do_lower_case=do_lower_case,
        pooling=pooling,
        token_steps=tuple(token_steps),
        dense=tuple(dense),
        normalize=normalize,
        prompts=prompts,
        default_prompt_name=default_prompt,
    )


def _without_head(modules: list[Any], head: str, modules_file: Path) -> list[Any]:
    """``modules`` without their last, which must be a ``head``."""
    last = modules[-1] if modules else None
    if not isinstance(last, dict) or not str(last.get("type", "")).endswith(f".{head}"):
        raise SourceError(f"{modules_file}: the last module is not a {head}")
    return modules[:-1]


def _transformer_config(path: Path) -> tuple[int | None, bool]:
    """``max_seq_length`` and ``do_lower_case`` of a Transformer module, once its other keys
    are known to be served."""
    config_file = path / "sentence_bert_config.json"
    if not config_file.is_file():
        return None, False
    config = _read_json(config_file)
    _check_text_modality(config, config_file)
    _check_transformer_keys(config, config_file)
    return config.get("max_seq_length"), bool(config.get("do_lower_case", False))


def _check_transformer_keys(config: dict[str, Any], config_file: Path) -> None:
    """Refuse, by name, a Transformer setting that would change vectors and is not served."""
    for key, served in _TRANSFORMER_DEFAULTS.items():
        value = config.get(key, served)
        if value != served and not (served is None and value in ({}, [])):
            raise SourceError(
                f"{config_file}: {key} = {json.dumps(value)} is not supported "
                f"(served: {json.dumps(served)})"
            )
    processing = config.get("processing_kwargs") or {}
    for key in _TEXT_PROCESSING:
        if isinstance(processing, dict) and processing.get(key):
            raise SourceError(
                f"{config_file}: processing_kwargs.{key} = {json.dumps(processing[key])} is not "
                "supported (the model's tokenizer is applied as saved)"
            )


def _feature(value: object, where: Path, key: str) -> Feature:
    for feature in _FEATURES:
        if value == feature:
            return feature
    raise SourceError(
        f"{where}: {key} {json.dumps(value)} is not supported ({', '.join(_FEATURES)})"
    )


def _normalize_feature(path: Path) -> Feature:
    """The feature a Normalize module normalises (its ``module_input_name``; it writes it back
    in place unless ``module_output_name`` says otherwise, which is not served)."""
    config_file = path / "config.json"
    config = _read_json(config_file) if config_file.is_file() else {}
    feature = _feature(
        config.get("module_input_name", "sentence_embedding"), config_file, "module_input_name"
    )
    if config.get("module_output_name", feature) != feature:
        raise SourceError(
            f"{config_file}: module_output_name {json.dumps(config['module_output_name'])} "
            "differs from module_input_name, which is not supported"
        )
    return feature


def _check_text_modality(config: dict[str, Any], config_file: Path) -> None:
    modality = config.get("modality_config")
    if isinstance(modality, dict) and "text" not in modality:
        raise SourceError(
            f"{config_file}: modality_config {sorted(modality)} has no plain text input "
            "(chat-message and multimodal Transformer modules are not supported)"
        )


def _read_prompts(
    model_dir: Path, *, model_type: str = SENTENCE_TRANSFORMER
) -> tuple[dict[str, str], str | None]:
    config_file = model_dir / "config_sentence_transformers.json"
    if not config_file.is_file():
        return {}, None
    config = _read_json(config_file)
    saved_type = config.get("model_type", model_type)
    if saved_type != model_type:
        raise SourceError(
            f"{config_file}: model_type {json.dumps(saved_type)} is not a {model_type} "
            + (
                "embedding model (sentence-transformers would drop its head and mean-pool it)"
                if model_type == SENTENCE_TRANSFORMER
                else "model"
            )
        )
    raw = config.get("prompts") or {}
    if not isinstance(raw, dict):
        raise SourceError(f"{config_file}: prompts must be an object of name -> text")
    default = config.get("default_prompt_name")
    return {str(name): str(text) for name, text in raw.items()}, (
        str(default) if default is not None else None
    )


def pooling_config(config: dict[str, Any]) -> PoolingConfig:
    mode = config.get("pooling_mode")
    if mode is None:
        flagged = tuple(name for key, name in _LEGACY_FLAGS.items() if config.get(key))
        modes: tuple[str, ...] = flagged or ("mean",)
    elif isinstance(mode, str):
        modes = (mode,)
    else:
        modes = tuple(str(item) for item in mode)
    unknown = [item for item in modes if item not in POOLING_MODES]
    if unknown:
        raise SourceError(
            f"pooling mode {', '.join(unknown)} is not supported ({', '.join(POOLING_MODES)})"
        )
    return PoolingConfig(cast(tuple[Pooling, ...], modes), bool(config.get("include_prompt", True)))


def _dense_config(path: Path) -> DenseConfig:
    config = _read_json(path / "config.json")
    activation = str(config.get("activation_function", "torch.nn.modules.activation.Tanh"))
    if not activation.startswith("torch.nn.") or activation.rsplit(".", 1)[-1] not in ACTIVATIONS:
        raise SourceError(
            f"Dense activation {activation} in {path} is not supported "
            f"(torch.nn {', '.join(ACTIVATIONS)})"
        )
    config_file = path / "config.json"
    feature = _feature(
        config.get("module_input_name", "sentence_embedding"), config_file, "module_input_name"
    )
    if config.get("module_output_name", feature) not in (None, feature):
        raise SourceError(
            f"{config_file}: module_output_name {json.dumps(config['module_output_name'])} "
            "differs from module_input_name, which is not supported"
        )
    try:
        return DenseConfig(
            path=path,
            in_features=int(config["in_features"]),
            out_features=int(config["out_features"]),
            bias=bool(config.get("bias", True)),
            activation=activation.rsplit(".", 1)[-1],
            residual=bool(config.get("use_residual", False)),
            feature=feature,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise SourceError(f"{config_file}: bad Dense config ({exc})") from exc


class DenseHead:
    """Dense and Normalize steps, in order, float32: ``activation(x @ W.T + b)`` (plus the
    input, or its projection, with ``use_residual``) for a Dense; ``x / |x|`` for a Normalize.
    Applied to pooled vectors (rows: sentences) or, before pooling, to tokens (rows: tokens)."""

    def __init__(self, steps: Sequence[Step], device: torch.device) -> None:
        self._steps: list[_DenseLayer | None] = [
            None if step == "normalize" else _DenseLayer.load(step, device) for step in steps
        ]

    @property
    def weight_bytes(self) -> int:
        """Bytes of the layers' float32 weights on the device."""
        tensors = [
            tensor
            for step in self._steps
            if step is not None
            for tensor in (step.weight, step.bias, step.residual)
            if tensor is not None
        ]
        return sum(tensor.numel() * tensor.element_size() for tensor in tensors)

    @property
    def out_features(self) -> int | None:
        layers = [step for step in self._steps if step is not None]
        return int(layers[-1].weight.shape[0]) if layers else None

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        for step in self._steps:
            rows = F.normalize(rows, p=2, dim=-1) if step is None else step(rows)
        return rows


@dataclass(frozen=True)
class _DenseLayer:
    weight: torch.Tensor
    bias: torch.Tensor | None
    activation: torch.nn.Module
    #: With ``use_residual``: the identity (None) or the projection of a size change.
    residual: torch.Tensor | None
    use_residual: bool

    @classmethod
    def load(cls, config: DenseConfig, device: torch.device) -> _DenseLayer:
        weights_file = config.path / "model.safetensors"
        if not weights_file.is_file():
            raise SourceError(
                f"{config.path} has no model.safetensors (pickled Dense weights are not loaded)"
            )
        state = load_file(str(weights_file))
        weight = state.get("linear.weight")
        if weight is None or tuple(weight.shape) != (config.out_features, config.in_features):
            raise SourceError(f"{weights_file}: no linear.weight of the configured shape")
        bias = state.get("linear.bias") if config.bias else None
        residual: torch.Tensor | None = None
        if config.residual and config.in_features != config.out_features:
            residual = state.get("residual.weight")
            if residual is None or tuple(residual.shape) != tuple(weight.shape):
                raise SourceError(f"{weights_file}: no residual.weight of the configured shape")
            residual = residual.to(device, torch.float32)
        return cls(
            weight.to(device, torch.float32),
            None if bias is None else bias.to(device, torch.float32),
            ACTIVATIONS[config.activation](),
            residual,
            config.residual,
        )

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.activation(F.linear(rows, self.weight, self.bias))
        if self.use_residual:
            out = out + (rows if self.residual is None else F.linear(rows, self.residual))
        return out


def pool_flat(
    hidden: torch.Tensor,
    lengths: torch.Tensor,
    skip: torch.Tensor,
    config: PoolingConfig,
) -> torch.Tensor:
    """Pooled vectors (size, hidden x modes), float32, from ``hidden`` (tokens, hidden): each
    sentence's tokens in a row, ``lengths`` of them, of which the first ``skip`` (prompt tokens,
    when the Pooling leaves them out) are not pooled; weighted-mean positions count from the
    sentence's first token all the same, as ``Pooling.py``."""
    hidden = hidden.float()
    device = hidden.device
    size, width = int(lengths.shape[0]), int(hidden.shape[1])
    starts = torch.cumsum(lengths, 0) - lengths
    sentence = torch.repeat_interleave(torch.arange(size, device=device), lengths)
    position = torch.arange(hidden.shape[0], device=device) - starts[sentence]
    kept = position >= skip[sentence]
    if bool(kept.all()):
        rows, rows_sentence, rows_position = hidden, sentence, position
    else:
        rows, rows_sentence, rows_position = hidden[kept], sentence[kept], position[kept]
    counts = (lengths - skip).clamp(min=0).to(torch.float32)[:, None]
    out: list[torch.Tensor] = []
    sums: torch.Tensor | None = None
    for mode in config.modes:
        if mode == "cls":
            # The first pooled token; the sentence's first when its prompt is all there is.
            first = starts + torch.where(lengths > skip, skip, 0)
            out.append(hidden[first])
        elif mode == "lasttoken":
            last = hidden[starts + lengths - 1]
            out.append(last * (lengths > skip).to(last.dtype)[:, None])
        elif mode in ("mean", "mean_sqrt_len_tokens"):
            if sums is None:
                sums = hidden.new_zeros(size, width).index_add_(0, rows_sentence, rows)
            denominator = counts.clamp(min=1e-9)
            out.append(sums / (denominator if mode == "mean" else denominator.sqrt()))
        elif mode == "max":
            index = rows_sentence[:, None].expand(-1, width)
            empty = hidden.new_full((size, width), float("-inf"))
            out.append(empty.scatter_reduce(0, index, rows, reduce="amax"))
        else:  # weightedmean
            weights = (rows_position + 1).to(torch.float32)[:, None]
            weighted = hidden.new_zeros(size, width).index_add_(0, rows_sentence, rows * weights)
            total = hidden.new_zeros(size, 1).index_add_(0, rows_sentence, weights)
            out.append(weighted / total.clamp(min=1e-9))
    return out[0] if len(out) == 1 else torch.cat(out, dim=1)


def read_truncate_dim(model_dir: Path) -> int | None:
    """``truncate_dim`` of ``config_sentence_transformers.json``: the Matryoshka size
    ``SentenceTransformer(dir)`` cuts its vectors to by default; None when the model sets none."""
    config_file = model_dir / "config_sentence_transformers.json"
    if not config_file.is_file():
        return None
    value = _read_json(config_file).get("truncate_dim")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SourceError(f"{config_file}: truncate_dim must be a positive integer, not {value!r}")
    return value
