"""Tiny random models saved to a folder, for tests that need an image model (or a models file)
without the hub: the same DINOv3 architectures as the registry's, a few kilobytes of weights."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    DINOv3ConvNextConfig,
    DINOv3ConvNextModel,
    DINOv3ViTConfig,
    DINOv3ViTModel,
)
from transformers.models.dinov3_vit.image_processing_dinov3_vit import DINOv3ViTImageProcessor


def tiny_dinov3_vit(path: Path, *, seed: int = 0) -> Path:
    """A 2-layer DINOv3 ViT (hidden size 32, 4 register tokens) with its image processor; its
    random weights come from ``seed``."""
    torch.manual_seed(seed)
    DINOv3ViTModel(
        DINOv3ViTConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            num_register_tokens=4,
        )
    ).save_pretrained(path)
    DINOv3ViTImageProcessor().save_pretrained(path)
    return path


def tiny_dinov3_convnext(path: Path) -> Path:
    """A one-block-per-stage DINOv3 ConvNeXt with its image processor."""
    torch.manual_seed(0)
    DINOv3ConvNextModel(
        DINOv3ConvNextConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1])
    ).save_pretrained(path)
    DINOv3ViTImageProcessor().save_pretrained(path)
    return path


def image_models_file(path: Path, models: dict[str, Path]) -> Path:
    """A models file adding each ``name: folder`` as an image model."""
    lines = ["models:"]
    for name, folder in models.items():
        lines += [f"  - name: {name}", f"    source: {folder}", "    modality: image"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
