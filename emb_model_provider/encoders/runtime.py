"""What every torch encoder shares: the device, dtype and threads at load, the load of a
transformers checkpoint, weight size, release."""

from __future__ import annotations

import contextlib
import gc
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from tokenizers import Tokenizer
from transformers import AutoConfig, AutoTokenizer
from transformers.models.auto.auto_factory import _BaseAutoModelClass
from transformers.utils import logging as hf_logging

from emb_model_provider.core.kinds import PrepareThread
from emb_model_provider.encoders.base import LoadOptions
from emb_model_provider.encoders.sources import SourceError

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def torch_runtime(options: LoadOptions) -> tuple[torch.device, torch.dtype]:
    if options.num_threads > 0:
        torch.set_num_threads(options.num_threads)
    # Weight loading progress bars are noise in a server's log.
    cast(Callable[[], None], hf_logging.disable_progress_bar)()  # untyped in transformers
    device = torch.device(options.device)
    if device.type == "cpu" and options.dtype == "float16":  # as EMB_PROVIDER_DTYPE (core/device)
        raise SourceError("float16 is not supported on the CPU; use float32 or bfloat16")
    return device, _DTYPES[options.dtype]


def refuse_custom_code(transformer_dir: Path) -> None:
    """Raise when the model's config or tokenizer names code of its own (``auto_map``): it
    would run in the server, so it loads only when trust_remote_code allows it."""
    for name in ("config.json", "tokenizer_config.json"):
        path = transformer_dir / name
        if not path.is_file():
            continue
        try:
            auto_map: Any = json.loads(path.read_text(encoding="utf-8")).get("auto_map")
        except (OSError, ValueError, AttributeError):
            continue
        if auto_map:
            raise SourceError(
                f"{transformer_dir} needs custom code (auto_map in {name}: "
                f"{json.dumps(auto_map, sort_keys=True)}), which runs only when allowed: set "
                "`trust_remote_code: true` on its models-file entry or "
                "EMB_PROVIDER_TRUST_REMOTE_CODE=true (the code runs in the server with its rights)"
            )


@dataclass(frozen=True)
class Pretrained:
    """A transformers checkpoint as ``load_pretrained`` loads it, on the CPU still (the caller
    moves what it keeps: a decoder reranker keeps two rows of its head). ``config``,
    ``hf_tokenizer`` and ``model`` are what transformers' untyped ``from_pretrained`` returns."""

    config: Any
    #: The transformers tokenizer (its ``pad_token_id``, ``model_max_length``, ...).
    hf_tokenizer: Any
    #: Its fast (``tokenizers``) backend, which the encoders run.
    tokenizer: Tokenizer
    model: Any
    device: torch.device
    dtype: torch.dtype


def fast_backend(hf_tokenizer: Any, where: Path) -> Tokenizer:
    """The fast (``tokenizers``) tokenizer behind a transformers tokenizer: what the encoders
    run (read-only, shared by request threads); a slow-only tokenizer is a ``SourceError``."""
    backend = getattr(hf_tokenizer, "backend_tokenizer", None)
    if not isinstance(backend, Tokenizer):
        raise SourceError(f"{where} has no fast (tokenizers) tokenizer")
    return backend


def load_pretrained(
    weights_dir: Path,
    auto_class: type[_BaseAutoModelClass],
    *,
    options: LoadOptions,
    what: str,
) -> Pretrained:
    """Config, tokenizer and ``auto_class`` weights from ``weights_dir``, in ``options``' dtype:
    custom code refused unless allowed, any load failure one ``SourceError`` naming ``what``
    (``"a cross-encoder"``), and a fast tokenizer required (the encoders tokenise with it)."""
    trust = options.trust_remote_code
    if not trust:
        refuse_custom_code(weights_dir)
    device, dtype = torch_runtime(options)
    try:
        config = AutoConfig.from_pretrained(str(weights_dir), trust_remote_code=trust)
        hf_tokenizer = AutoTokenizer.from_pretrained(str(weights_dir), trust_remote_code=trust)
        model = auto_class.from_pretrained(
            str(weights_dir), config=config, dtype=dtype, trust_remote_code=trust
        )
    except (OSError, ValueError, KeyError) as exc:
        message = " ".join(f"cannot load {what} from {weights_dir}: {exc}".split())
        raise SourceError(message) from exc
    backend = fast_backend(hf_tokenizer, weights_dir)
    return Pretrained(config, hf_tokenizer, backend, model, device, dtype)


def image_prepare_thread(device: torch.device) -> PrepareThread:
    """Where a model on ``device`` has its images decoded and preprocessed: on CPU the model
    thread (the processors' torch kernels would otherwise start OpenMP teams of their own, see
    ``core/model_thread.py``); on an accelerator the decode workers, so that the model thread,
    which feeds the device, runs only forwards."""
    return "model" if device.type == "cpu" else "worker"


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers (what loading it costs on its device)."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


def release(model: torch.nn.Module, device: torch.device) -> None:
    """Free the model's weights now rather than whenever the last reference goes: moving it to
    the ``meta`` device drops every storage; on CUDA the cached blocks go back to the driver."""
    model.to("meta")
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@contextlib.contextmanager
def oom_releases_cache(device: torch.device) -> Iterator[None]:
    """On CUDA out-of-memory give the cached blocks back before the error reaches the batcher,
    which retries the batch in halves: the halves then have the memory the whole one could not."""
    try:
        yield
    except torch.OutOfMemoryError:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        raise
