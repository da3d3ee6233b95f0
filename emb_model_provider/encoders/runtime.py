"""What every torch encoder shares: the device, dtype and threads at load, weight size, release."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterator
from typing import cast

import torch
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
