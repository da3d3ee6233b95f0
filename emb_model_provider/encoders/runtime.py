"""What every torch encoder loader does first: the device, the dtype and torch's threads."""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch
from transformers.utils import logging as hf_logging

from emb_model_provider.encoders.base import LoadOptions

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def torch_runtime(options: LoadOptions) -> tuple[torch.device, torch.dtype]:
    if options.num_threads > 0:
        torch.set_num_threads(options.num_threads)
    # Weight loading progress bars are noise in a server's log.
    cast(Callable[[], None], hf_logging.disable_progress_bar)()  # untyped in transformers
    return torch.device(options.device), _DTYPES[options.dtype]
