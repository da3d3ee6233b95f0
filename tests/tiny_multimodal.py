"""Tiny random CLIP, SigLIP and SigLIP 2 models with their processors, saved to a folder, for tests
that need text and images in one space without the hub. The tokenizers are built here: a byte-level
BPE vocabulary for CLIP, a Gemma-style BPE for SigLIP 2 and a SentencePiece model trained on a few
lines for SigLIP (its tokenizer reads only ``spiece.model``).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Literal

import sentencepiece as spm
import torch
from tokenizers import pre_tokenizers
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    CLIPTokenizer,
    SiglipConfig,
    SiglipImageProcessor,
    SiglipModel,
    SiglipProcessor,
    SiglipTokenizer,
)
from transformers.models.siglip2 import (
    Siglip2Config,
    Siglip2ImageProcessor,
    Siglip2Model,
    Siglip2Processor,
    Siglip2Tokenizer,
)

Family = Literal["clip", "siglip", "siglip2"]

_WORDS = [
    "a photo of a cat",
    "a photo of a dog",
    "two cats asleep on a red sofa",
    "the quick brown fox jumps over the lazy dog",
    "a blue car parked in the street at night",
    "green trees and white clouds",
]
_TOWER = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2}


def tiny_clip(path: Path, *, seed: int = 0, size: Literal["tiny", "full"] = "tiny") -> Path:
    """A CLIP with its processor: 2-layer towers of width 32 on 32-pixel images in 8-pixel patches
    (``size="tiny"``), or the openai/clip-vit-base-patch32 shapes (``"full"``: 12 layers of 512 and
    768, 224 pixels in 32-pixel patches, 512 dimensions) with random weights."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in alphabet:
        vocab[char] = len(vocab)
    for char in alphabet:
        vocab[char + "</w>"] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in {word for line in _WORDS for word in line.split()}:
        # Whole words as merges left to right: "cat" -> c a, ca t</w>.
        piece = word[0]
        for index, char in enumerate(word[1:], start=1):
            last = index == len(word) - 1
            right = char + "</w>" if last else char
            if (piece, right) not in merges:
                merges.append((piece, right))
            piece += right
            vocab.setdefault(piece, len(vocab))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    full = size == "full"
    torch.manual_seed(seed)
    text = {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12}
    vision = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12}
    config = CLIPConfig(
        text_config={
            **(text if full else _TOWER),
            "num_attention_heads": 8 if full else 2,
            "vocab_size": 49408 if full else len(vocab),
            "max_position_embeddings": 77,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },
        vision_config={
            **(vision if full else _TOWER),
            "num_attention_heads": 12 if full else 2,
            "image_size": 224 if full else 32,
            "patch_size": 32 if full else 8,
        },
        projection_dim=512 if full else 16,
    )
    CLIPModel(config).save_pretrained(path)
    pixels = 224 if full else 32
    CLIPProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": pixels}, crop_size={"height": pixels, "width": pixels}
        ),
        tokenizer=tokenizer,
    ).save_pretrained(path)
    return path


def tiny_siglip(path: Path, *, seed: int = 0) -> Path:
    """A SigLIP with its processor: 2-layer towers of width 32, 32-pixel images in 8-pixel
    patches (16 positions), texts padded to 64 tokens, a SentencePiece vocabulary of ~40 pieces."""
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_WORDS * 4),
        model_writer=buffer,
        vocab_size=48,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    path.mkdir(parents=True, exist_ok=True)
    spiece = path / "spiece.model"
    spiece.write_bytes(buffer.getvalue())
    tokenizer = SiglipTokenizer(vocab_file=str(spiece), model_max_length=64)
    torch.manual_seed(seed)
    config = SiglipConfig(
        text_config={
            **_TOWER,
            "num_attention_heads": 2,
            "vocab_size": tokenizer.vocab_size,
            "max_position_embeddings": 64,
            "projection_size": 32,
            "pad_token_id": 0,
            "bos_token_id": None,
            "eos_token_id": 1,
        },
        vision_config={**_TOWER, "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
    )
    SiglipModel(config).save_pretrained(path)
    SiglipProcessor(
        image_processor=SiglipImageProcessor(size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
    ).save_pretrained(path)
    return path


def tiny_siglip2(path: Path, *, seed: int = 0) -> Path:
    """A SigLIP 2 (NaFlex) with its processor: 2-layer towers of width 32, images cut into at most
    256 patches of 16 pixels at their own aspect ratio (the processor's defaults), texts padded to
    64 tokens by a small byte-fallback BPE vocabulary."""
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for char in sorted({char for line in _WORDS for char in line.replace(" ", "▁")}):
        vocab.setdefault(char, len(vocab))
    merges = [("▁", "a"), ("c", "a"), ("ca", "t"), ("o", "g"), ("d", "og")]
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    tokenizer = Siglip2Tokenizer(vocab=vocab, merges=merges, model_max_length=64)
    torch.manual_seed(seed)
    config = Siglip2Config(
        text_config={
            **_TOWER,
            "num_attention_heads": 2,
            "vocab_size": len(vocab),
            "max_position_embeddings": 64,
            "projection_size": 32,
            "pad_token_id": 0,
            "bos_token_id": 2,
            "eos_token_id": 1,
        },
        vision_config={**_TOWER, "num_attention_heads": 2, "num_patches": 256, "patch_size": 16},
    )
    Siglip2Model(config).save_pretrained(path)
    Siglip2Processor(image_processor=Siglip2ImageProcessor(), tokenizer=tokenizer).save_pretrained(
        path
    )
    return path


BUILDERS = {"clip": tiny_clip, "siglip": tiny_siglip, "siglip2": tiny_siglip2}


def multimodal_models_file(path: Path, models: dict[str, Path]) -> Path:
    """A models file adding each ``name: folder`` as a multimodal model."""
    lines = ["models:"]
    for name, folder in models.items():
        lines += [f"  - name: {name}", f"    source: {folder}", "    modality: multimodal"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
