"""CSR sparse models ("Beyond Matryoshka"): a dense sentence-transformers pipeline followed by a
``SparseAutoEncoder``, as sentence-transformers' ``SparseEncoder`` computes them.

The dense part (Transformer, Pooling, Dense, Normalize) is the text encoder's own
(``load_text_encoder`` with the last module left out), so its vectors are exactly what an
embedding model of the same modules gives. The ``SparseAutoEncoder`` then runs in torch on the
same device and dtype, as ``SparseAutoEncoder.forward`` does under ``inference_mode``: with
``normalize``, its layer norm (``x - mean``, divided by the unbiased standard deviation plus
1e-5), then ``x - pre_bias`` through the encoder's linear layer with ``latent_bias``: the
pre-activation latents.

Why the encoder stops there: ``encode(max_active_dims=K)`` makes K the autoencoder's top-k, so a
request's K changes which latents are kept, and a K above the saved one gives more non-zero
terms. The latents are what the batcher merges and the result cache holds, whatever the K;
``sparsify`` then applies a request's K (``torch.topk`` of the latents, the others zero, then
ReLU), as quantisation is applied after the cache. With no K, the model's saved
``max_active_dims``, else the autoencoder's ``k``, as ``SparseEncoder`` takes them. The
library's generic ``select_max_active_dims`` with the same K, applied after the module, keeps
what is left unchanged (at most K terms are non-zero).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from emb_model_provider.core.kinds import TruncationSide
from emb_model_provider.encoders.base import EncoderInput, LoadOptions, PreparedInput, Vectors
from emb_model_provider.encoders.runtime import oom_releases_cache, torch_runtime
from emb_model_provider.encoders.sources import SourceError, resolve_source
from emb_model_provider.encoders.st_modules import read_sentence_config
from emb_model_provider.encoders.text import TextEncoder, load_text_encoder

logger = logging.getLogger(__name__)

#: The module kind that makes a SparseEncoder a CSR model, last in its modules.json.
SPARSE_AUTO_ENCODER = "SparseAutoEncoder"
#: ``SparseAutoEncoder.LN``'s epsilon, added to the standard deviation.
_LN_EPS = 1e-5


class SparseAutoEncoderHead:
    """``SparseAutoEncoder``'s inference path up to its top-k: the pre-activation latents."""

    def __init__(
        self,
        weight: torch.Tensor,
        pre_bias: torch.Tensor,
        latent_bias: torch.Tensor,
        *,
        k: int,
        normalize: bool,
    ) -> None:
        self._weight = weight
        self._pre_bias = pre_bias
        self._latent_bias = latent_bias
        self.k = k
        self.normalize = normalize
        self.hidden_dim = int(weight.shape[0])
        self.input_dim = int(weight.shape[1])
        self.memory_bytes = sum(
            tensor.numel() * tensor.element_size() for tensor in (weight, pre_bias, latent_bias)
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalize:  # ``SparseAutoEncoder.LN``: torch's (unbiased) std, eps added to it
            x = x - x.mean(dim=-1, keepdim=True)
            x = x / (x.std(dim=-1, keepdim=True) + _LN_EPS)
        return F.linear(x - self._pre_bias, self._weight, self._latent_bias)

    def close(self) -> None:
        self._weight = self._weight.to("meta")


class CsrModel:
    modality: Literal["text"] = "text"
    task: Literal["sparse"] = "sparse"
    #: ``prepare`` takes a request's ``max_tokens`` (``TokenCapping``), as its prefix does.
    token_caps: Literal[True] = True

    def __init__(
        self,
        prefix: TextEncoder,
        head: SparseAutoEncoderHead,
        *,
        normalize_prefix: bool,
        device: torch.device,
        dtype: torch.dtype,
        max_active_dims: int,
    ) -> None:
        self._prefix = prefix
        self._head = head
        self._normalize_prefix = normalize_prefix
        self._device = device
        self._dtype = dtype
        #: The latents' size (``SparseAutoEncoder.get_embedding_dimension``).
        self.dimensions = head.hidden_dim
        self.max_input_tokens = prefix.max_input_tokens
        #: The top-k a request that names none gets: the saved ``max_active_dims``, else ``k``.
        self.max_active_dims = max_active_dims
        self.prompts = prefix.prompts
        self.default_prompt_name = prefix.default_prompt_name
        self.truncation_side: TruncationSide = prefix.truncation_side
        self.special_tokens = prefix.special_tokens
        self.placement = prefix.placement
        self.memory_bytes = prefix.memory_bytes + head.memory_bytes
        self.architecture = (
            f"{prefix.architecture} + SparseAutoEncoder({head.input_dim} -> {head.hidden_dim}, "
            f"k {head.k})"
        )

    def prompt_text(self, name: str | None) -> str | None:
        """The prompt of ``name`` (or the model's default); ``KeyError`` for an unknown name."""
        return self._prefix.prompt_text(name)

    def prepare(
        self,
        inputs: Sequence[EncoderInput],
        *,
        truncate: bool,
        prompt: str | None = None,
        truncation_side: TruncationSide | None = None,
        max_tokens: int | None = None,
    ) -> list[PreparedInput]:
        return self._prefix.prepare(
            inputs,
            truncate=truncate,
            prompt=prompt,
            truncation_side=truncation_side,
            max_tokens=max_tokens,
        )

    def encode(self, batch: Sequence[PreparedInput]) -> Vectors:
        """The pre-activation latents of ``batch`` (``sparsify`` makes them vectors)."""
        dense = self._prefix.encode(batch)
        with oom_releases_cache(self._device), torch.inference_mode():
            x = torch.from_numpy(dense).to(self._device, self._dtype)
            if self._normalize_prefix:  # the pipeline's Normalize module, as the library runs it
                x = F.normalize(x, p=2, dim=-1)
            latents = self._head(x)
            return latents.float().cpu().numpy().astype(np.float32, copy=False)

    def sparsify(self, rows: Vectors, k: int | None) -> Vectors:
        """``SparseAutoEncoder.top_k`` of the latents with ``k`` (None: the model's default):
        the k largest kept, the others zero, then ReLU."""
        k = self.max_active_dims if k is None else k
        latents = torch.from_numpy(np.ascontiguousarray(rows))
        if k >= latents.shape[-1]:
            kept = latents
        else:
            top = torch.topk(latents, k=k, dim=-1)
            kept = torch.zeros_like(latents).scatter_(-1, top.indices, top.values)
        vectors: Vectors = F.relu(kept).numpy().astype(np.float32, copy=False)
        return vectors

    def warmup(self) -> None:
        for texts in (["warm up"], ["warm up the sparse encoder with a longer sentence"] * 4):
            self.encode(self.prepare(texts, truncate=True))

    def close(self) -> None:
        self._prefix.close()
        self._head.close()


def is_csr(model_dir: Path) -> bool:
    """``modules.json``'s last module is a ``SparseAutoEncoder``."""
    try:
        listed = json.loads((model_dir / "modules.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(listed, list) or not listed or not isinstance(listed[-1], dict):
        return False
    return str(listed[-1].get("type", "")).rsplit(".", 1)[-1] == SPARSE_AUTO_ENCODER


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SourceError(f"cannot read {path}: {exc}") from exc


def _head(
    module_dir: Path, *, device: torch.device, dtype: torch.dtype
) -> tuple[SparseAutoEncoderHead, int]:
    """The ``SparseAutoEncoder`` folder's weights, and its ``input_dim``."""
    config = _read_json(module_dir / "config.json")
    if not isinstance(config, dict):
        raise SourceError(f"{module_dir / 'config.json'} is not a JSON object")
    sizes = {key: config.get(key) for key in ("input_dim", "hidden_dim", "k")}
    if not all(isinstance(value, int) and value > 0 for value in sizes.values()):
        raise SourceError(f"{module_dir}: the SparseAutoEncoder's {sizes} must be positive")
    input_dim, hidden_dim, k = (int(value) for value in sizes.values())  # type: ignore[arg-type]
    weights_file = module_dir / "model.safetensors"
    if not weights_file.is_file():
        raise SourceError(
            f"{module_dir} has no model.safetensors (pickled SparseAutoEncoder weights are not "
            "loaded)"
        )
    state = load_file(str(weights_file))
    # The encoder's weight is tied to the decoder's: saved under either name.
    weight = state.get("encoder.weight", state.get("decoder.linear.weight"))
    pre_bias, latent_bias = state.get("pre_bias"), state.get("latent_bias")
    if (
        weight is None
        or pre_bias is None
        or latent_bias is None
        or tuple(weight.shape) != (hidden_dim, input_dim)
        or tuple(pre_bias.shape) != (input_dim,)
        or tuple(latent_bias.shape) != (hidden_dim,)
    ):
        raise SourceError(
            f"{weights_file}: no encoder weight ({hidden_dim} x {input_dim}), pre_bias and "
            "latent_bias of the config's sizes"
        )
    head = SparseAutoEncoderHead(
        *(tensor.to(device, dtype) for tensor in (weight, pre_bias, latent_bias)),
        k=k,
        normalize=bool(config.get("normalize", False)),
    )
    return head, input_dim


def load_csr_encoder(
    source: str,
    *,
    revision: str | None,
    max_input_tokens: int | None,
    options: LoadOptions,
) -> CsrModel:
    """Load a CSR ``SparseEncoder`` directory: its dense modules as the text encoder loads
    them, then its ``SparseAutoEncoder``."""
    model_dir = resolve_source(
        source, revision=revision, token=options.hf_token, cache_dir=options.cache_dir
    )
    if not is_csr(model_dir):
        raise SourceError(f"{model_dir}: modules.json does not end with a {SPARSE_AUTO_ENCODER}")
    folder = Path(str(_read_json(model_dir / "modules.json")[-1].get("path", "")))
    if folder.is_absolute() or ".." in folder.parts:
        raise SourceError(f"{model_dir}: module folder {folder} is outside the model")
    head_dir = model_dir / folder
    sentence = read_sentence_config(model_dir, sparse_head=SPARSE_AUTO_ENCODER)
    device, dtype = torch_runtime(options)
    head, input_dim = _head(head_dir, device=device, dtype=dtype)
    prefix = load_text_encoder(
        source,
        revision=revision,
        max_input_tokens=max_input_tokens,
        pooling=None,
        options=options,
        sparse_head=SPARSE_AUTO_ENCODER,
    )
    if prefix.dimensions != input_dim:
        prefix.close()
        raise SourceError(
            f"{model_dir}: the dense modules give {prefix.dimensions} dimensions, the "
            f"SparseAutoEncoder takes {input_dim}"
        )
    settings_file = model_dir / "config_sentence_transformers.json"
    settings = _read_json(settings_file) if settings_file.is_file() else {}
    saved = settings.get("max_active_dims") if isinstance(settings, dict) else None
    if saved is not None and (isinstance(saved, bool) or not isinstance(saved, int) or saved < 1):
        raise SourceError(f"max_active_dims must be a positive integer, not {saved!r}")
    encoder = CsrModel(
        prefix,
        head,
        normalize_prefix=sentence.normalize,
        device=device,
        dtype=dtype,
        max_active_dims=saved if saved is not None else head.k,
    )
    logger.info(
        "loaded CSR sparse encoder %s from %s on %s: %d latents, top-%d by default, %d max tokens",
        encoder.architecture,
        model_dir,
        encoder.placement,
        encoder.dimensions,
        encoder.max_active_dims,
        encoder.max_input_tokens,
    )
    return encoder
