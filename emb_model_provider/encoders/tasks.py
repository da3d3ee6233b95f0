"""What task a model directory was built for, read from its own files (no torch).

sentence-transformers and transformers say it in three places, read in this order:

1. ``config_sentence_transformers.json``: ``model_type`` is ``CrossEncoder`` for a reranker
   (sentence-transformers >= 4 writes it; ``SentenceTransformer`` for an embedder,
   ``SparseEncoder`` for a sparse model), or ``modules.json`` names a ``SpladePooling``;
2. ``sentence_bert_config.json`` (beside ``modules.json`` or in the Transformer module's
   folder): ``transformer_task: sequence-classification``;
3. failing those, ``config.json``: a ``*ForSequenceClassification`` architecture. One with more
   than one label (an NLI classifier) is read as a reranker too, so that it is never mean-pooled
   as an embedder; the rerank routes refuse it with a 400 naming its labels.

Anything else is an embedder, as before tasks existed. A new task is a line in ``detect_task``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from emb_model_provider.core.kinds import Task


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _transformer_configs(model_dir: Path) -> list[dict[str, Any]]:
    """The ``sentence_bert_config.json`` files: the top one and each Transformer module's."""
    configs = [_json(model_dir / "sentence_bert_config.json")]
    modules = model_dir / "modules.json"
    if modules.is_file():
        try:
            listed = json.loads(modules.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            listed = []
        for module in listed if isinstance(listed, list) else []:
            if isinstance(module, dict) and str(module.get("type", "")).endswith(".Transformer"):
                path = str(module.get("path", ""))
                if path:
                    configs.append(_json(model_dir / path / "sentence_bert_config.json"))
    return configs


#: Modules only a ``SparseEncoder`` has (a save without ``model_type`` is known by them).
_SPARSE_MODULES = (".SpladePooling", ".SparseStaticEmbedding", ".Router", ".SparseAutoEncoder")


def _has_module(model_dir: Path, suffixes: tuple[str, ...]) -> bool:
    """``modules.json`` lists a module whose type ends with one of ``suffixes``."""
    try:
        listed = json.loads((model_dir / "modules.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return any(
        isinstance(module, dict) and str(module.get("type", "")).endswith(suffixes)
        for module in (listed if isinstance(listed, list) else [])
    )


def detect_task(model_dir: Path) -> Task:
    """The task ``model_dir``'s files say the model serves."""
    st_type = _json(model_dir / "config_sentence_transformers.json").get("model_type")
    if st_type == "CrossEncoder":
        return "rerank"
    if st_type == "SentenceTransformer":
        return "embed"
    if st_type == "SparseEncoder":
        return "sparse"
    if _has_module(model_dir, _SPARSE_MODULES):
        return "sparse"
    if any(
        config.get("transformer_task") == "sequence-classification"
        for config in _transformer_configs(model_dir)
    ):
        return "rerank"
    architectures = _json(model_dir / "config.json").get("architectures") or []
    if any(str(name).endswith("ForSequenceClassification") for name in architectures):
        return "rerank"
    return "embed"


def is_causal_lm(model_dir: Path) -> bool:
    """A ``*ForCausalLM`` checkpoint: as a reranker, it scores by its yes/no logits."""
    architectures = _json(model_dir / "config.json").get("architectures") or []
    return any(str(name).endswith("ForCausalLM") for name in architectures)


def local_task(source: str) -> Task | None:
    """The task of a local model directory; None when ``source`` is not one (a hub id is read
    at load, once downloaded)."""
    path = Path(source).expanduser()
    return detect_task(path) if path.is_dir() else None
