"""Sparse (SPLADE) encoders: one weight per vocabulary term, as sentence-transformers'
``SparseEncoder`` computes them.

Two kinds of module list are served, each matching ``SparseEncoder(path)`` on the same weights:

- SPLADE: a fill-mask ``Transformer`` (or the older ``MLMTransformer``), then ``SpladePooling``:
  each token's MLM logits go through ``log1p(relu(.))`` (``log1p_relu``: ``log1p`` once more),
  padding masked out, then ``max`` (or ``sum``) over the tokens;
- an inference-free SPLADE: a ``Router`` whose routes are each such a SPLADE pipeline or a
  ``SparseStaticEmbedding`` (one learned weight per vocabulary term, no transformer: a text's
  vector is the weights of the tokens it contains, tokenised without special tokens and
  truncated at the tokenizer's ``model_max_length``). The usual arrangement is a static
  ``query`` route and a SPLADE ``document`` route (``Router.for_query_document``).

Routes are chosen as the library's ``Router`` chooses them for text: ``encode_query`` is the task
``query``, ``encode_document`` the task ``document``, ``encode`` no task; the ``route_mappings``
(``(task, "text")``, ``(task, None)``, ``(None, "text")``, ``(None, None)``), then a route of the
task's name, then the ``default_route`` (without one, the first route unless
``allow_empty_key`` is off). ``route`` maps a request's prompt name onto that: ``query`` and
``document`` are those tasks, any other name (or none) is ``encode``'s no task. A route never
changes the prompt: prompts are prepended to the text, on every route, as
``encode(prompt_name=...)`` does; the model's saved ``max_active_dims`` keeps the top-k weights
of each vector.

``prepare`` tags each input with its route, so that the batcher may merge the requests of
different routes: ``encode`` runs each route on its own inputs and puts the rows back in order.

``encode`` returns dense rows over the whole vocabulary. Why not a compact top-k row: a SPLADE
vector has as many non-zero terms as its text and the weights make it (a random or barely trained
model lights up most of the vocabulary), so a fixed-width compact row would either drop terms the
library keeps or be as wide as the vocabulary. Dense rows are exact for every model; the batcher
and the result cache take them as they take dense vectors (the cache is bounded in bytes, so a
sparse model's ~120 KB entries make it hold fewer, never more memory). The service turns each row
into its (indices, values) pairs after the cache.

CSR models (a dense pipeline, then a ``SparseAutoEncoder``) are loaded by ``encoders/csr.py``; a
``SparseAutoEncoder`` anywhere else (not last, or in a Router's route) is refused by name.
"""

from __future__ import annotations

import ast
import inspect
import json
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from transformers import AutoModelForMaskedLM, AutoTokenizer, PreTrainedModel

from emb_model_provider.core.errors import ContextLengthExceeded
from emb_model_provider.core.kinds import TruncationSide
from emb_model_provider.encoders.base import EncoderInput, LoadOptions, PreparedInput, Vectors
from emb_model_provider.encoders.csr import CsrModel, is_csr, load_csr_encoder
from emb_model_provider.encoders.runtime import (
    fast_backend,
    load_pretrained,
    oom_releases_cache,
    refuse_custom_code,
    release,
    torch_runtime,
    weight_bytes,
)
from emb_model_provider.encoders.sources import SourceError, resolve_source
from emb_model_provider.encoders.text import (
    DEFAULT_PROMPTS,
    length_groups,
    lowercase,
    text_of,
)
from emb_model_provider.encoders.truncation import TruncationModes

logger = logging.getLogger(__name__)

SpladeStrategy = Literal["max", "sum"]
SpladeActivation = Literal["relu", "log1p_relu"]

#: Pad share of a length group on CPU (see ``encoders/text.py``).
_CPU_PAD_SHARE = 0.10
#: sentence-transformers' SPLADE module lists (sentence-transformers 6 saves a ``Transformer``
#: with ``transformer_task: fill-mask``; earlier ones an ``MLMTransformer``).
_SPLADE = (("MLMTransformer", "SpladePooling"), ("Transformer", "SpladePooling"))
_STATIC = ("SparseStaticEmbedding",)
_REFUSED = {
    "SparseAutoEncoder": "a SparseAutoEncoder that is not the model's last module (CSR models "
    "are served as a dense pipeline, then a SparseAutoEncoder)"
}
_SERVED = (
    "MLMTransformer + SpladePooling (SPLADE), a Router whose routes are each that or a "
    "SparseStaticEmbedding (inference-free SPLADE), or a dense pipeline then a "
    "SparseAutoEncoder (CSR)"
)
#: The tasks of ``encode_query`` and ``encode_document``: a request's prompt name of these
#: selects that task's route; any other name is ``encode``'s (no task).
_TASKS = ("query", "document")
#: A tokenizer's ``model_max_length`` above this is transformers' "no limit" placeholder.
_NO_LIMIT = 1_000_000


class SpladeRoute:
    """A fill-mask transformer's logits, pooled as ``SpladePooling.forward`` pools them."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: Tokenizer,
        *,
        max_input_tokens: int,
        pad_token_id: int,
        device: torch.device,
        strategy: SpladeStrategy,
        activation: SpladeActivation,
        do_lower_case: bool = False,
        truncation_side: TruncationSide = "right",
    ) -> None:
        self._model = model
        self._device = device
        self._pad_token_id = pad_token_id
        self.max_input_tokens = max_input_tokens
        self.strategy: SpladeStrategy = strategy
        self.activation: SpladeActivation = activation
        self.dimensions = int(model.config.vocab_size)
        self.architecture = type(model).__name__
        self.memory_bytes = weight_bytes(model)
        base = Tokenizer.from_str(tokenizer.to_str())
        if do_lower_case:
            lowercase(base)
        # Read-only tokenizers per truncation mode, as in the text encoder.
        self.tokenizers = TruncationModes(base, max_input_tokens, side=truncation_side)
        self._token_types = "token_type_ids" in inspect.signature(model.forward).parameters
        self.pad_share: float | None = _CPU_PAD_SHARE if device.type == "cpu" else None

    def tokenize(
        self,
        texts: list[str],
        *,
        truncate: bool,
        side: TruncationSide | None = None,
        max_tokens: int | None = None,
    ) -> list[npt.NDArray[np.int64]]:
        tokenizer = self.tokenizers.get(truncate, side, max_tokens)
        encodings = tokenizer.encode_batch(texts, add_special_tokens=True)
        return [np.asarray(enc.ids, dtype=np.int64) for enc in encodings]

    def forward(self, ids: Sequence[npt.NDArray[np.int64]]) -> torch.Tensor:
        order = sorted(range(len(ids)), key=lambda index: ids[index].shape[0])
        lengths = [int(ids[index].shape[0]) for index in order]
        parts = [
            self._forward_padded([ids[index] for index in order[start:end]])
            for start, end in length_groups(lengths, self.pad_share)
        ]
        pooled = torch.cat(parts) if len(parts) > 1 else parts[0]
        return pooled[torch.argsort(torch.tensor(order, device=pooled.device))]

    def _forward_padded(self, batch: Sequence[npt.NDArray[np.int64]]) -> torch.Tensor:
        """MLM logits of right-padded rows, pooled as ``SpladePooling.forward`` pools them."""
        longest = max(row.shape[0] for row in batch)
        input_ids = np.full((len(batch), longest), self._pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((len(batch), longest), dtype=np.int64)
        for row, ids in enumerate(batch):
            input_ids[row, : ids.shape[0]] = ids
            attention_mask[row, : ids.shape[0]] = 1
        ids_t = torch.from_numpy(input_ids).to(self._device)
        mask_t = torch.from_numpy(attention_mask).to(self._device)
        kwargs: dict[str, torch.Tensor] = {"input_ids": ids_t, "attention_mask": mask_t}
        if self._token_types:
            kwargs["token_type_ids"] = torch.zeros_like(ids_t)
        logits: torch.Tensor = self._model(**kwargs).logits
        # In place, as the library does at inference: the logits are not needed again.
        weights = (logits * mask_t.unsqueeze(-1).to(logits.dtype)).relu_().log1p_()
        if self.activation == "log1p_relu":
            weights = weights.log1p_()
        if self.strategy == "max":
            return weights.amax(dim=1)
        return weights.sum(dim=1)

    def close(self) -> None:
        release(self._model, self._device)


class StaticRoute:
    """``SparseStaticEmbedding``: the learned weight of each vocabulary term the text contains
    (its ``token_presence * weight``), no transformer."""

    architecture = "SparseStaticEmbedding"

    def __init__(
        self,
        weight: torch.Tensor,
        tokenizer: Tokenizer,
        *,
        max_input_tokens: int,
        truncation_side: TruncationSide = "right",
    ) -> None:
        self._weight = weight
        self.max_input_tokens = max_input_tokens
        self.dimensions = int(weight.shape[0])
        self.memory_bytes = weight.numel() * weight.element_size()
        base = Tokenizer.from_str(tokenizer.to_str())
        # Read-only tokenizers per truncation mode, as in the text encoder.
        self.tokenizers = TruncationModes(base, max_input_tokens, side=truncation_side)

    def tokenize(
        self,
        texts: list[str],
        *,
        truncate: bool,
        side: TruncationSide | None = None,
        max_tokens: int | None = None,
    ) -> list[npt.NDArray[np.int64]]:
        # ``SparseStaticEmbedding.preprocess`` tokenises without special tokens.
        tokenizer = self.tokenizers.get(truncate, side, max_tokens)
        encodings = tokenizer.encode_batch(texts, add_special_tokens=False)
        return [np.asarray(enc.ids, dtype=np.int64) for enc in encodings]

    def forward(self, ids: Sequence[npt.NDArray[np.int64]]) -> torch.Tensor:
        device = self._weight.device
        rows = torch.zeros(len(ids), self.dimensions, dtype=self._weight.dtype, device=device)
        counts = torch.tensor([row.shape[0] for row in ids], device=device)
        if int(counts.sum()) == 0:
            return rows
        columns = torch.from_numpy(np.concatenate(ids)).to(device)
        at = torch.repeat_interleave(torch.arange(len(ids), device=device), counts)
        # A term present once or more weighs its weight once (the library's presence mask).
        rows[at, columns] = self._weight[columns]
        return rows

    def close(self) -> None:
        self._weight = self._weight.to("meta")


Route = SpladeRoute | StaticRoute


@dataclass(frozen=True, slots=True)
class RouterConfig:
    """What ``Router`` reads from its config to choose a route (text inputs only)."""

    routes: tuple[str, ...]
    default_route: str | None
    #: ``(task, modality)`` -> route, the text-reachable ones (modality ``"text"`` or None).
    mappings: Mapping[tuple[str | None, str | None], str]

    def resolve(self, task: str | None) -> str:
        """``Router._resolve_route`` for text inputs; ``ValueError`` as the library raises it."""
        for key in ((task, "text"), (task, None), (None, "text"), (None, None)):
            if key in self.mappings:
                return self.mappings[key]
        if task and task in self.routes:
            return task
        if "text" in self.routes:  # a route named after the modality
            return "text"
        if task is not None:
            raise ValueError(
                f"the model has no route for the task {task!r} (its routes: "
                f"{', '.join(self.routes)})"
            )
        if self.default_route is None:
            raise ValueError(
                "the model's Router has no default route: name the task with prompt_name "
                f"{' or '.join(repr(task) for task in _TASKS)}"
            )
        return self.default_route


@dataclass(frozen=True, slots=True)
class _Tagged:
    """``prepare``'s payload: the route that runs the input, and its token ids."""

    route: int
    ids: npt.NDArray[np.int64]


class SparseModel:
    modality: Literal["text"] = "text"
    task: Literal["sparse"] = "sparse"
    #: ``prepare`` takes a request's ``max_tokens`` (``TokenCapping``).
    token_caps: Literal[True] = True

    def __init__(
        self,
        routes: Mapping[str, Route],
        *,
        router: RouterConfig | None,
        device: torch.device,
        dtype: torch.dtype,
        prompts: Mapping[str, str] | None = None,
        default_prompt_name: str | None = None,
        max_active_dims: int | None = None,
    ) -> None:
        self._names = list(routes)
        self._routes = list(routes.values())
        self._router = router
        self._device = device
        #: The vocabulary: one weight per term (every route's).
        self.dimensions = self._routes[0].dimensions
        #: The longest route's: an input over its own route's limit is refused there.
        self.max_input_tokens = max(route.max_input_tokens for route in self._routes)
        #: The model's saved top-k (``max_active_dims``); None keeps every non-zero weight.
        self.max_active_dims = max_active_dims
        self.prompts: dict[str, str] = dict(prompts or {})
        self.default_prompt_name = default_prompt_name
        self.placement = f"{device} ({str(dtype).removeprefix('torch.')})"
        unique = {id(route): route for route in self._routes}.values()  # a route may be shared
        self.memory_bytes = sum(route.memory_bytes for route in unique)
        if router is None:
            self.architecture = self._routes[0].architecture
        else:
            described = ", ".join(
                f"{name}: {route.architecture}"
                for name, route in zip(self._names, self._routes, strict=True)
            )
            default = f"; default {router.default_route}" if router.default_route else ""
            self.architecture = f"Router({described}{default})"
        #: The side over-long inputs are cut from when a request names none: the tokenizer's
        #: saved side (for a Router, its first route's; a request naming a side sets it for all).
        self.truncation_side: TruncationSide = self._routes[0].tokenizers.side
        #: The most special tokens a route's tokenizer adds (``TokenCapping``).
        self.special_tokens = max(route.tokenizers.special_tokens for route in self._routes)
        self._forward_lock = threading.Lock()

    def prompt_text(self, name: str | None) -> str | None:
        """The prompt of ``name`` (or the model's default); ``KeyError`` for an unknown name."""
        name = name if name is not None else self.default_prompt_name
        return None if name is None else self.prompts[name]

    def route(self, prompt_name: str | None) -> str | None:
        """The route a request naming ``prompt_name`` takes (``query`` and ``document`` as
        ``encode_query`` and ``encode_document``, anything else as ``encode``); None for a model
        without a Router. ``ValueError`` when the Router has no route for it."""
        if self._router is None:
            return None
        return self._router.resolve(prompt_name if prompt_name in _TASKS else None)

    def prepare(
        self,
        inputs: Sequence[EncoderInput],
        *,
        truncate: bool,
        prompt: str | None = None,
        route: str | None = None,
        truncation_side: TruncationSide | None = None,
        max_tokens: int | None = None,
    ) -> list[PreparedInput]:
        """Token ids of ``inputs`` (``prompt`` prepended) for ``route`` (None: ``encode``'s),
        over-long ones cut from ``truncation_side`` (None: the tokenizer's saved side), at
        ``max_tokens`` when a request caps them lower."""
        if route is None:
            route = self.route(None)
        index = self._names.index(route) if route is not None else 0
        runner = self._routes[index]
        texts = [text_of(position, value) for position, value in enumerate(inputs)]
        if prompt:
            texts = [prompt + text for text in texts]
        ids = runner.tokenize(texts, truncate=truncate, side=truncation_side, max_tokens=max_tokens)
        if not truncate and runner.max_input_tokens < self.max_input_tokens:
            # The service checks the model's longest route; this route takes fewer.
            for row in ids:
                if row.shape[0] > runner.max_input_tokens:
                    raise ContextLengthExceeded(runner.max_input_tokens, int(row.shape[0]))
        # Every token is pooled, the prompt's too: usage counts them all.
        return [PreparedInput(payload=_Tagged(index, row), n_tokens=row.shape[0]) for row in ids]

    def encode(self, batch: Sequence[PreparedInput]) -> Vectors:
        items = [_tagged(item.payload) for item in batch]
        by_route: dict[int, list[int]] = {}
        for position, item in enumerate(items):
            by_route.setdefault(item.route, []).append(position)
        with self._forward_lock, oom_releases_cache(self._device), torch.inference_mode():
            parts = [
                (positions, self._routes[route].forward([items[at].ids for at in positions]))
                for route, positions in by_route.items()
            ]
            if len(parts) == 1:
                pooled = parts[0][1]
            else:  # requests of several routes in one batch: each row back in its place
                pooled = torch.empty(len(items), self.dimensions, device=self._device)
                for positions, rows in parts:
                    at = torch.tensor(positions, device=self._device)
                    pooled[at] = rows.to(pooled.dtype)
            if self.max_active_dims is not None:
                pooled = top_k(pooled, self.max_active_dims)
            return pooled.float().cpu().numpy().astype(np.float32, copy=False)

    def warmup(self) -> None:
        names: list[str | None] = list(self._names) if self._router is not None else [None]
        for route in names:
            for texts in (["warm up"], ["warm up the sparse encoder with a longer sentence"] * 4):
                self.encode(self.prepare(texts, truncate=True, route=route))

    def close(self) -> None:
        with self._forward_lock:
            for route in {id(route): route for route in self._routes}.values():
                route.close()


def top_k(vectors: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` largest weights of each row, the others zero: sentence-transformers'
    ``select_max_active_dims`` (by absolute value; SPLADE weights are never negative)."""
    if k >= vectors.shape[-1]:
        return vectors
    values, indices = torch.topk(vectors.abs(), k=k, dim=-1)
    del values
    kept = torch.zeros_like(vectors)
    return kept.scatter_(-1, indices, vectors.gather(-1, indices))


def _tagged(payload: object) -> _Tagged:
    assert isinstance(payload, _Tagged)  # what ``prepare`` made
    return payload


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _kind(module_type: object) -> str:
    return str(module_type).rsplit(".", 1)[-1]


def _refuse_by_name(model_dir: Path, kinds: Sequence[str]) -> None:
    for kind in kinds:
        if kind in _REFUSED:
            raise SourceError(
                f"{model_dir}: {_REFUSED[kind]} is not supported; sparse models served are "
                f"{_SERVED}"
            )


def _module_list(model_dir: Path) -> list[tuple[str, Path]]:
    """modules.json's (kind, folder) pairs."""
    listed = _read_json(model_dir / "modules.json")
    if not isinstance(listed, list) or not listed:
        raise SourceError(f"{model_dir}: a SparseEncoder needs its modules.json")
    modules = [
        (_kind(module.get("type", "")), model_dir / str(module.get("path", "")))
        for module in listed
    ]
    _refuse_by_name(model_dir, [kind for kind, _ in modules])
    return modules


def _router(router_dir: Path) -> tuple[RouterConfig, dict[str, list[tuple[str, Path]]]]:
    """The Router's config (``router_config.json``, or ``config.json`` as the legacy ``Asym``
    saved it) and each route's (kind, folder) modules."""
    config = _read_json(router_dir / "router_config.json") or _read_json(router_dir / "config.json")
    types, structure = config.get("types"), config.get("structure")
    if not isinstance(types, dict) or not isinstance(structure, dict) or not structure:
        raise SourceError(f"{router_dir}: the Router's config (types, structure) is unreadable")
    routes: dict[str, list[tuple[str, Path]]] = {}
    for name, module_ids in structure.items():
        if not isinstance(module_ids, list) or not all(str(mid) in types for mid in module_ids):
            raise SourceError(f"{router_dir}: route {name!r} names modules the Router lacks")
        for module_id in module_ids:
            if Path(str(module_id)).is_absolute() or ".." in Path(str(module_id)).parts:
                raise SourceError(f"{router_dir}: module folder {module_id!r} is outside the model")
        routes[str(name)] = [(_kind(types[str(mid)]), router_dir / str(mid)) for mid in module_ids]
    _refuse_by_name(router_dir, [kind for modules in routes.values() for kind, _ in modules])
    parameters = config.get("parameters") or {}
    default = parameters.get("default_route")
    if default is not None and default not in routes:
        raise SourceError(f"{router_dir}: default route {default!r} is not one of {sorted(routes)}")
    if default is None and parameters.get("allow_empty_key", True):
        default = next(iter(routes))  # as Router.__init__ does
    mappings: dict[tuple[str | None, str | None], str] = {}
    for key, target in (parameters.get("route_mappings") or {}).items():
        try:
            task, modality = ast.literal_eval(key)  # saved as str((task, modality))
        except (ValueError, SyntaxError, TypeError):
            continue  # the library skips (and warns about) an unparsable key too
        if target not in routes:
            raise SourceError(f"{router_dir}: route mapping {key} names no route ({target!r})")
        if modality in (None, "text"):  # the text-reachable ones
            mappings[(task, modality)] = str(target)
    return RouterConfig(tuple(routes), default, mappings), routes


def _static_route(
    module_dir: Path,
    *,
    max_input_tokens: int | None,
    options: LoadOptions,
    device: torch.device,
    fallback: int | None,
) -> StaticRoute:
    """A ``SparseStaticEmbedding`` folder: its tokenizer and its weight vector."""
    if not options.trust_remote_code:
        refuse_custom_code(module_dir)
    try:
        hf_tokenizer: Any = AutoTokenizer.from_pretrained(
            str(module_dir), trust_remote_code=options.trust_remote_code
        )
    except (OSError, ValueError, KeyError) as exc:
        message = " ".join(f"cannot load the tokenizer in {module_dir}: {exc}".split())
        raise SourceError(message) from exc
    backend = fast_backend(hf_tokenizer, module_dir)
    weights_file = module_dir / "model.safetensors"
    if not weights_file.is_file():
        raise SourceError(
            f"{module_dir} has no model.safetensors (pickled SparseStaticEmbedding weights are "
            "not loaded)"
        )
    weight = load_file(str(weights_file)).get("weight")
    vocabulary = len(hf_tokenizer.get_vocab())
    if weight is None or weight.dim() != 1 or weight.shape[0] != vocabulary:
        raise SourceError(f"{weights_file}: no weight vector of the tokenizer's {vocabulary} terms")
    # The library truncates at the tokenizer's model_max_length; transformers' "no limit"
    # placeholder falls back to the other routes' limit.
    saved = int(hf_tokenizer.model_max_length)
    limit = max_input_tokens or (saved if saved < _NO_LIMIT else fallback)
    if limit is None:
        raise SourceError(
            f"{module_dir}: the tokenizer sets no model_max_length; set max_input_tokens on the "
            "models-file entry"
        )
    return StaticRoute(
        weight.float().to(device),
        backend,
        max_input_tokens=int(limit),
        truncation_side="left" if hf_tokenizer.truncation_side == "left" else "right",
    )


def _splade_route(
    modules: Sequence[tuple[str, Path]], *, max_input_tokens: int | None, options: LoadOptions
) -> SpladeRoute:
    (transformer_kind, transformer_dir), (_, pooling_dir) = modules
    st_config = _read_json(transformer_dir / "sentence_bert_config.json")
    task = st_config.get("transformer_task")
    if transformer_kind == "Transformer" and task != "fill-mask":
        raise SourceError(
            f"{transformer_dir}: SpladePooling needs a fill-mask Transformer, not "
            f"{task or 'feature-extraction'}"
        )
    pooling = _read_json(pooling_dir / "config.json")
    strategy = pooling.get("pooling_strategy", "max")
    activation = pooling.get("activation_function", "relu")
    if strategy not in ("max", "sum") or activation not in ("relu", "log1p_relu"):
        raise SourceError(
            f"{pooling_dir}: SpladePooling {strategy}/{activation} is not supported "
            "(max or sum of relu or log1p_relu)"
        )
    loaded = load_pretrained(
        transformer_dir, AutoModelForMaskedLM, options=options, what="a sparse encoder"
    )
    hf_tokenizer = loaded.hf_tokenizer
    positions = int(getattr(loaded.config, "max_position_embeddings", 512))
    saved = st_config.get("max_seq_length")
    limit = (
        max_input_tokens
        or (int(saved) if isinstance(saved, int) else None)
        or min(int(hf_tokenizer.model_max_length), positions)
    )
    if limit > positions:
        raise SourceError(f"max_input_tokens {limit} exceeds the model's {positions} positions")
    pad_id = hf_tokenizer.pad_token_id
    return SpladeRoute(
        loaded.model.to(loaded.device).eval(),
        loaded.tokenizer,
        max_input_tokens=int(limit),
        pad_token_id=int(pad_id) if pad_id is not None else 0,
        device=loaded.device,
        strategy=strategy,
        activation=activation,
        do_lower_case=bool(st_config.get("do_lower_case", False)),
        truncation_side="left" if hf_tokenizer.truncation_side == "left" else "right",
    )


def _kinds_of(modules: Sequence[tuple[str, Path]]) -> tuple[str, ...]:
    return tuple(kind for kind, _ in modules)


def _routes(
    model_dir: Path, *, max_input_tokens: int | None, options: LoadOptions, device: torch.device
) -> tuple[dict[str, Route], RouterConfig | None]:
    """Each route's runner (one unnamed route without a Router), and the Router's config."""
    modules = _module_list(model_dir)
    if _kinds_of(modules) in _SPLADE:
        return {
            "": _splade_route(modules, max_input_tokens=max_input_tokens, options=options)
        }, None
    if _kinds_of(modules) not in (("Router",), ("Asym",)):  # Asym: Router's older name
        raise SourceError(
            f"{model_dir}: sparse modules {list(_kinds_of(modules))} are not supported "
            f"(served: {_SERVED})"
        )
    router, listed = _router(modules[0][1])
    for name, route_modules in listed.items():
        if _kinds_of(route_modules) not in (*_SPLADE, _STATIC):
            raise SourceError(
                f"{model_dir}: route {name!r} has modules {list(_kinds_of(route_modules))}, "
                f"which are not supported (served: {_SERVED})"
            )
    # SPLADE routes first: a static route's tokenizer may set no limit and take theirs.
    loaded: dict[tuple[Path, ...], Route] = {}  # a module the Router shares loads once
    for route_modules in sorted(listed.values(), key=lambda modules: len(modules) == 1):
        key = tuple(folder for _, folder in route_modules)
        if key in loaded:
            continue
        if _kinds_of(route_modules) == _STATIC:
            limits = [route.max_input_tokens for route in loaded.values()]
            loaded[key] = _static_route(
                route_modules[0][1],
                max_input_tokens=max_input_tokens,
                options=options,
                device=device,
                fallback=max(limits) if limits else None,
            )
        else:
            loaded[key] = _splade_route(
                route_modules, max_input_tokens=max_input_tokens, options=options
            )
    routes = {
        name: loaded[tuple(folder for _, folder in route_modules)]
        for name, route_modules in listed.items()
    }
    sizes = {name: route.dimensions for name, route in routes.items()}
    if len(set(sizes.values())) > 1:
        raise SourceError(f"{model_dir}: the routes' vocabularies differ in size ({sizes})")
    return routes, router


def load_sparse_encoder(
    source: str,
    *,
    revision: str | None,
    max_input_tokens: int | None,
    options: LoadOptions,
) -> SparseModel | CsrModel:
    """Load a sentence-transformers ``SparseEncoder`` directory (SPLADE, an inference-free
    SPLADE's Router, or a CSR model). ``max_input_tokens`` (a models-file entry's) overrides the
    saved lengths."""
    model_dir = resolve_source(
        source, revision=revision, token=options.hf_token, cache_dir=options.cache_dir
    )
    if is_csr(model_dir):
        return load_csr_encoder(
            source, revision=revision, max_input_tokens=max_input_tokens, options=options
        )
    settings = _read_json(model_dir / "config_sentence_transformers.json")
    device, dtype = torch_runtime(options)
    routes, router = _routes(
        model_dir, max_input_tokens=max_input_tokens, options=options, device=device
    )
    # As for dense models, sentence-transformers 6 gives every model ``query`` and ``document``.
    prompts = {**DEFAULT_PROMPTS, **(settings.get("prompts") or {})}
    default_prompt = settings.get("default_prompt_name")
    if default_prompt is not None and default_prompt not in prompts:
        raise SourceError(
            f"default prompt {default_prompt!r} is not one of the prompts {sorted(prompts)}"
        )
    max_active = settings.get("max_active_dims")
    encoder = SparseModel(
        routes,
        router=router,
        device=device,
        dtype=dtype,
        prompts=prompts,
        default_prompt_name=default_prompt,
        max_active_dims=int(max_active) if isinstance(max_active, int) else None,
    )
    described = ", ".join(
        f"{name or 'SPLADE'} {route.strategy} of {route.activation}"
        if isinstance(route, SpladeRoute)
        else f"{name} static"
        for name, route in routes.items()
    )
    logger.info(
        "loaded sparse encoder %s from %s on %s: %d terms, %d max tokens, %s",
        encoder.architecture,
        model_dir,
        encoder.placement,
        encoder.dimensions,
        encoder.max_input_tokens,
        described,
    )
    return encoder
