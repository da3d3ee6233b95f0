"""Matryoshka defaults: a model's saved ``truncate_dim`` and a models-file ``dimensions`` are the
size a request gets without ``dimensions``; a request may still ask for up to the model's full
size. Compared with ``SentenceTransformer(dir, truncate_dim=...)`` on tiny random models, through
a live server and the OpenAI SDK."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from sentence_transformers import SentenceTransformer

from benchmarks.families import build
from tests.live import live_server, test_settings
from tests.tiny_text_models import text_models_file

TEXTS = ["a short one", "Matryoshka vectors keep their meaning in a prefix.", "ünïcödé 🙂"]
FULL = 32  # the tiny models' hidden size


def _save_truncate_dim(path: Path, size: int) -> Path:
    config_file = path / "config_sentence_transformers.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config_file.write_text(json.dumps({**config, "truncate_dim": size}), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("matryoshka")
    return {
        "saved": _save_truncate_dim(build("bert", root / "saved", "tiny", seed=1), 16),
        "plain": build("bert", root / "plain", "tiny", seed=2),
    }


@pytest.fixture(scope="module")
def server(dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    models = text_models_file(
        tmp_path_factory.mktemp("matryoshka-models") / "models.yaml",
        [
            {"name": "mat-saved", "source": str(dirs["saved"])},
            # The models file overrides the saved size.
            {"name": "mat-saved-12", "source": str(dirs["saved"]), "dimensions": 12},
            {"name": "mat-file", "source": str(dirs["plain"]), "dimensions": 8},
            {"name": "mat-too-big", "source": str(dirs["plain"]), "dimensions": FULL + 1},
        ],
    )
    with live_server(test_settings(models_file=models)) as url:
        yield url


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


def _ours(client: openai.OpenAI, model: str, dimensions: int | None = None) -> np.ndarray:
    if dimensions is None:
        response = client.embeddings.create(model=model, input=TEXTS)
    else:
        response = client.embeddings.create(model=model, input=TEXTS, dimensions=dimensions)
    return np.array([item.embedding for item in response.data], dtype=np.float32)


def _reference(path: Path, truncate_dim: int | None = None) -> np.ndarray:
    model = SentenceTransformer(str(path), device="cpu", truncate_dim=truncate_dim)
    return np.asarray(model.encode(TEXTS, normalize_embeddings=True))


@pytest.mark.parametrize(
    "case",
    [
        ("mat-saved", "saved", None, 16),  # the library reads truncate_dim from the directory
        ("mat-saved-12", "saved", 12, 12),
        ("mat-file", "plain", 8, 8),
    ],
)
def test_default_size_matches_sentence_transformers(
    client: openai.OpenAI, dirs: dict[str, Path], case: tuple[str, str, int | None, int]
) -> None:
    model, source, truncate_dim, size = case
    ours = _ours(client, model)
    reference = _reference(dirs[source], truncate_dim)
    assert ours.shape == reference.shape == (len(TEXTS), size)
    np.testing.assert_allclose(ours, reference, atol=1e-5)


@pytest.mark.parametrize("dimensions", [4, 20, FULL])
def test_request_dimensions_override_up_to_the_full_size(
    client: openai.OpenAI, dirs: dict[str, Path], dimensions: int
) -> None:
    ours = _ours(client, "mat-file", dimensions)
    np.testing.assert_allclose(ours, _reference(dirs["plain"], dimensions), atol=1e-5)


def test_past_the_full_size_is_refused(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match=f"ask for 1 to {FULL}") as caught:
        _ours(client, "mat-file", FULL + 1)
    assert caught.value.status_code == 400


def test_a_default_larger_than_the_model_fails_its_load(client: openai.OpenAI) -> None:
    with pytest.raises(openai.APIStatusError, match=f"dimensions is {FULL + 1}.*{FULL}") as caught:
        _ours(client, "mat-too-big")
    assert caught.value.status_code == 503
    assert len(_ours(client, "mat-file")[0]) == 8  # the server serves on


def test_models_shows_both_sizes(client: openai.OpenAI, server: str) -> None:
    _ours(client, "mat-file")
    _ours(client, "mat-saved")
    cards = {card["id"]: card for card in httpx.get(f"{server}/v1/models").json()["data"]}
    assert (cards["mat-file"]["dimensions"], cards["mat-file"]["max_dimensions"]) == (8, FULL)
    assert (cards["mat-saved"]["dimensions"], cards["mat-saved"]["max_dimensions"]) == (16, FULL)
