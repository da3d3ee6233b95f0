"""sentence-transformers' saved modules, read and run without sentence-transformers.

A sentence-transformers directory lists its modules in ``modules.json``; the ones a text
embedding model is made of are served here: Transformer (``sentence_bert_config.json``:
``max_seq_length``, ``do_lower_case``), Pooling (``1_Pooling/config.json``: every mode of
``Pooling.py`` and ``include_prompt``), Dense (a linear layer and an activation) and Normalize.
Prompts come from ``config_sentence_transformers.json``. Any other module fails the load with a
line that names it: nothing is imported from a name a model directory gives.

Pooling works on the flat layout, every sentence's real tokens one after another (the
arithmetic of ``Pooling._forward_padded`` on right-padded rows, which ``_forward_flattened``
shares): the unpadded and the length-grouped forwards both produce it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

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
_ACTIVATIONS: dict[str, type[torch.nn.Module]] = {
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


@dataclass(frozen=True)
class SentenceConfig:
    """What sentence-transformers' saved modules say about how to embed with this model."""

    transformer_dir: Path
    max_seq_length: int | None = None
    do_lower_case: bool = False
    pooling: PoolingConfig | None = None
    dense: tuple[DenseConfig, ...] = ()
    #: The model ends with Normalize. The encoder leaves it to the service, which normalises
    #: unless the models file says ``normalize: false`` (then the vectors before Normalize).
    normalize: bool = False
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SourceError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise SourceError(f"{path} is not a JSON object")
    return data


def read_sentence_config(model_dir: Path) -> SentenceConfig:
    prompts, default_prompt = _read_prompts(model_dir)
    modules_file = model_dir / "modules.json"
    if not modules_file.is_file():  # a plain transformers checkpoint
        return SentenceConfig(model_dir, prompts=prompts, default_prompt_name=default_prompt)
    try:
        modules = json.loads(modules_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SourceError(f"cannot read {modules_file}: {exc}") from exc
    transformer_dir = model_dir
    max_seq_length: int | None = None
    do_lower_case = False
    pooling: PoolingConfig | None = None
    dense: list[DenseConfig] = []
    normalize = False
    for module in modules:
        type_path = str(module.get("type", ""))
        kind = type_path.rsplit(".", 1)[-1]
        path = model_dir / str(module.get("path", ""))
        if not type_path.startswith("sentence_transformers.") or kind not in _MODULES:
            raise SourceError(
                f"sentence-transformers module {type_path or json.dumps(module)} is not supported "
                f"(supported: {', '.join(_MODULES)})"
            )
        if kind == "Transformer":
            transformer_dir = path
            config_file = path / "sentence_bert_config.json"
            if config_file.is_file():
                config = _read_json(config_file)
                max_seq_length = config.get("max_seq_length")
                do_lower_case = bool(config.get("do_lower_case", False))
                _check_text_modality(config, config_file)
        elif kind == "Pooling":
            pooling = pooling_config(_read_json(path / "config.json"))
        elif normalize:
            raise SourceError(f"sentence-transformers module {type_path} after Normalize")
        elif kind == "Dense":
            dense.append(_dense_config(path))
        else:
            normalize = True
    return SentenceConfig(
        transformer_dir,
        max_seq_length=max_seq_length,
        do_lower_case=do_lower_case,
        pooling=pooling,
        dense=tuple(dense),
        normalize=normalize,
        prompts=prompts,
        default_prompt_name=default_prompt,
    )


def _check_text_modality(config: dict[str, Any], config_file: Path) -> None:
    modality = config.get("modality_config")
    if isinstance(modality, dict) and "text" not in modality:
        raise SourceError(
            f"{config_file}: modality_config {sorted(modality)} has no plain text input "
            "(chat-message and multimodal Transformer modules are not supported)"
        )


def _read_prompts(model_dir: Path) -> tuple[dict[str, str], str | None]:
    config_file = model_dir / "config_sentence_transformers.json"
    if not config_file.is_file():
        return {}, None
    config = _read_json(config_file)
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
    if not activation.startswith("torch.nn.") or activation.rsplit(".", 1)[-1] not in _ACTIVATIONS:
        raise SourceError(
            f"Dense activation {activation} in {path} is not supported "
            f"(torch.nn {', '.join(_ACTIVATIONS)})"
        )
    try:
        return DenseConfig(
            path=path,
            in_features=int(config["in_features"]),
            out_features=int(config["out_features"]),
            bias=bool(config.get("bias", True)),
            activation=activation.rsplit(".", 1)[-1],
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise SourceError(f"{path}/config.json: bad Dense config ({exc})") from exc


class DenseHead:
    """The Dense modules after pooling, float32: ``activation(x @ W.T + b)`` each."""

    def __init__(self, configs: Sequence[DenseConfig], device: torch.device) -> None:
        self._layers: list[tuple[torch.Tensor, torch.Tensor | None, torch.nn.Module]] = []
        for config in configs:
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
            self._layers.append(
                (
                    weight.to(device, torch.float32),
                    None if bias is None else bias.to(device, torch.float32),
                    _ACTIVATIONS[config.activation](),
                )
            )

    @property
    def out_features(self) -> int | None:
        return int(self._layers[-1][0].shape[0]) if self._layers else None

    def __call__(self, pooled: torch.Tensor) -> torch.Tensor:
        for weight, bias, activation in self._layers:
            pooled = activation(F.linear(pooled, weight, bias))
        return pooled


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
