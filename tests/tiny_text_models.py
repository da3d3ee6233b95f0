"""Tiny text models for tests beyond ``benchmarks/families.py``: a model that ships its own
code (``auto_map``), and a models file for text entries."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from tests.conftest import BUNDLED_DIR

_MODELING = '''"""A tiny model with its own code, for tests of trust_remote_code."""

from pathlib import Path

import torch
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput

# Proof, for the tests, that this file ran.
Path({sentinel!r}).touch()


class TinyCustomConfig(PretrainedConfig):
    model_type = "tiny-custom"

    def __init__(self, vocab_size=30522, hidden_size=16, max_position_embeddings=512, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.max_position_embeddings = max_position_embeddings
        super().__init__(**kwargs)


class TinyCustomModel(PreTrainedModel):
    config_class = TinyCustomConfig
    base_model_prefix = "tiny"

    def __init__(self, config):
        super().__init__(config)
        self.embed = torch.nn.Embedding(config.vocab_size, config.hidden_size)
        self.mix = torch.nn.Linear(config.hidden_size, config.hidden_size)
        self.post_init()

    def _init_weights(self, module):
        pass

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return BaseModelOutput(last_hidden_state=torch.tanh(self.mix(self.embed(input_ids))))
'''


def tiny_custom_code_model(path: Path) -> tuple[Path, Path]:
    """A plain transformers directory whose model class is in its own ``modeling_tiny.py``;
    returns the directory and the file that code creates when it runs."""
    path.mkdir(parents=True, exist_ok=True)
    sentinel = path.parent / f"{path.name}-code-ran"
    (path / "modeling_tiny.py").write_text(
        _MODELING.replace("{sentinel!r}", repr(str(sentinel))), encoding="utf-8"
    )
    config = {
        "model_type": "tiny-custom",
        "architectures": ["TinyCustomModel"],
        "auto_map": {
            "AutoConfig": "modeling_tiny.TinyCustomConfig",
            "AutoModel": "modeling_tiny.TinyCustomModel",
        },
        "vocab_size": 30522,
        "hidden_size": 16,
        "max_position_embeddings": 512,
    }
    (path / "config.json").write_text(json.dumps(config), encoding="utf-8")
    generator = torch.Generator().manual_seed(0)
    save_file(
        {
            "embed.weight": torch.randn(30522, 16, generator=generator),
            "mix.weight": torch.randn(16, 16, generator=generator) / 4,
            "mix.bias": torch.randn(16, generator=generator) / 4,
        },
        str(path / "model.safetensors"),
    )
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (BUNDLED_DIR / name).is_file():
            shutil.copy(BUNDLED_DIR / name, path / name)
    return path, sentinel


def text_models_file(path: Path, entries: list[dict[str, object]]) -> Path:
    """A models file with these entries (text models unless they say otherwise)."""
    path.write_text(json.dumps({"models": entries}), encoding="utf-8")  # JSON is YAML
    return path
