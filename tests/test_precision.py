"""``precision: fast`` and its accuracy gate (``encoders/fast.py``), against
``SentenceTransformer.encode`` on the same weights: the gate keeps a good fast path and refuses a
bad one (float32 then serves, saying why), the export and the decision are cached, a shipped ONNX
graph is used as it is, ``exact`` is float32 byte for byte, every text family's fast vectors are
within the gate, and ``fast`` never runs float32 where a faster path passed."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import torch
from safetensors.torch import load_file, save_file
from sentence_transformers import SentenceTransformer

from benchmarks.families import FAMILIES, Family, build
from emb_model_provider.encoders import fast
from emb_model_provider.encoders.base import EXACT_PATH, LoadOptions
from emb_model_provider.encoders.text import TextEncoder, load_text_encoder
from emb_model_provider.offline.local import LocalConfig, LocalEmbedder
from emb_model_provider.offline.records import Record
from tests.live import live_app, test_settings
from tests.tiny_text_models import text_models_file

TEXTS = [
    "a",
    "Hello World, how ARE you today?",
    "ünïcödé 日本語 🙂 — ça va?",
    "word " * 200,
    "A medium sentence about embeddings and vector search.",
]
PROMPTS = {"query": "query: "}

#: The bfloat16 paths run only on a CPU that computes in bfloat16 (AVX-512 BF16 or AMX); on
#: another their tests skip, and `fast` there gets openvino-float32 (tested everywhere).
_CPU_BF16 = bool(fast._bf16_features())
_OPENVINO_BF16 = fast.openvino_available() and fast._openvino_bf16()
needs_bf16 = pytest.mark.skipif(
    not (_CPU_BF16 and _OPENVINO_BF16), reason="this CPU has no bfloat16 instructions"
)


def _options(export_dir: Path, **overrides: object) -> LoadOptions:
    values: dict[str, object] = {
        "device": "cpu",
        "dtype": "float32",
        "precision": "fast",
        "export_dir": str(export_dir),
        **overrides,
    }
    return LoadOptions(**values)  # type: ignore[arg-type]


def _load(path: Path, options: LoadOptions) -> TextEncoder:
    return load_text_encoder(
        str(path), revision=None, max_input_tokens=None, pooling=None, options=options
    )


def _encode(encoder: TextEncoder, texts: list[str]) -> np.ndarray:
    vectors = encoder.encode(encoder.prepare(texts, truncate=True))
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _least_cosine(got: np.ndarray, reference: np.ndarray) -> float:
    return float(np.sum(got * reference, axis=1).min())


def bf16_fragile(path: Path) -> Path:
    """A tiny BERT that bfloat16 cannot run: its FFN input weights are 1 + 1e-4 noise, which
    bfloat16 (8 bits of mantissa) rounds to 1, and the layer norm before them makes every row
    of inputs sum to 0, so float32 keeps only the small part and bfloat16 only rounding noise;
    the next layer scales it back up. Float32 (torch or OpenVINO) runs it exactly."""
    build("bert", path, "tiny")
    weights = load_file(str(path / "model.safetensors"))
    generator = torch.Generator().manual_seed(0)
    for name in list(weights):
        if "intermediate.dense.weight" in name:
            shape = weights[name].shape
            weights[name] = 1.0 + 1e-4 * torch.randn(shape, generator=generator)
            bias = name.replace("weight", "bias")
            weights[bias] = torch.zeros_like(weights[bias])
        elif name.endswith("output.dense.weight") and "attention" not in name:
            weights[name] = weights[name] * 1e4
    save_file(weights, str(path / "model.safetensors"))
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("precision")


@pytest.fixture(scope="module")
def good(root: Path) -> Path:
    return build("bert", root / "good", "tiny", prompts=PROMPTS)


@pytest.fixture(scope="module")
def bad(root: Path) -> Path:
    return bf16_fragile(root / "bad")


def test_the_dev_environment_has_a_fast_path() -> None:
    # The `fast` extra is in the dev group, so CI runs the OpenVINO path; without it every
    # test below would pass on float32 alone.
    assert fast.openvino_available()
    found, why = fast.candidates("cpu", backend=None, dtype=None)
    assert found, why


def test_the_openvino_path_sends_no_telemetry(good: Path, tmp_path: Path) -> None:
    """openvino-telemetry (a dependency of the openvino wheel) reports ``import openvino`` and
    every conversion to Google Analytics unless the home folder holds an opt-out file or
    ``CI=true``, and writes a client id into the home folder first. A fresh interpreter outside
    CI, with an empty home, loads a model on the OpenVINO path (conversion included): the
    conversion tools run their no-op stub and nothing is written to the home folder."""
    home = tmp_path / "home"
    home.mkdir()
    script = f"""
import sys
from emb_model_provider.encoders.base import LoadOptions
from emb_model_provider.encoders.text import load_text_encoder
options = LoadOptions(device="cpu", dtype="float32", precision="fast",
                      export_dir={str(tmp_path / "export")!r})
encoder = load_text_encoder({str(good)!r}, revision=None, max_input_tokens=None, pooling=None,
                            options=options)
assert encoder.precision.path.startswith("openvino"), encoder.precision
import openvino.tools.ovc.convert_impl as convert_impl
print(convert_impl.tm.__name__, sys.modules.get("openvino_telemetry"))
"""
    env = {key: value for key, value in os.environ.items() if key != "CI"}
    env["HOME"] = str(home)
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["openvino.tools.ovc.telemetry_stub", "None"]
    assert list(home.iterdir()) == []


def test_fast_never_silently_runs_float32(good: Path, tmp_path: Path) -> None:
    """Where a fast path exists and passes, ``fast`` serves it: the first candidate (the
    fastest) passes on a well-behaved model, and it is what serves."""
    found, _ = fast.candidates("cpu", backend=None, dtype=None)
    encoder = _load(good, _options(tmp_path))
    assert encoder.precision.path == found[0].path != EXACT_PATH
    assert encoder.precision.reason is None
    assert encoder.precision.min_cosine is not None
    assert encoder.precision.min_cosine >= 0.99
    assert found[0].path in encoder.placement
    reference = SentenceTransformer(str(good), device="cpu")
    expected = reference.encode(TEXTS, normalize_embeddings=True)
    assert _least_cosine(_encode(encoder, TEXTS), expected) >= 0.99
    # The float32 torch weights are freed: the fast path serves alone.
    assert all(p.is_meta for p in encoder._model.parameters())


def test_exact_is_float32_byte_for_byte(good: Path, tmp_path: Path) -> None:
    default = _load(good, LoadOptions(device="cpu", dtype="float32"))
    exact = _load(good, _options(tmp_path, precision="exact"))
    assert exact.precision.path == EXACT_PATH
    assert exact.precision.min_cosine is None
    assert _encode(exact, TEXTS).tobytes() == _encode(default, TEXTS).tobytes()
    assert not list(tmp_path.iterdir())  # exact exports nothing
    reference = SentenceTransformer(str(good), device="cpu")
    np.testing.assert_allclose(
        _encode(exact, TEXTS), reference.encode(TEXTS, normalize_embeddings=True), atol=1e-5
    )


@needs_bf16
def test_gate_refuses_a_bad_path_and_serves_float32(
    bad: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    exact = _load(bad, LoadOptions(device="cpu", dtype="float32"))
    with caplog.at_level(logging.WARNING, logger="emb_model_provider.encoders.fast"):
        encoder = _load(bad, _options(tmp_path, fast_dtype="bfloat16"))
    report = encoder.precision
    assert report.path == EXACT_PATH
    assert report.min_cosine is not None
    assert report.min_cosine < 0.99
    assert report.reason is not None
    assert "openvino-bfloat16 least cosine" in report.reason
    assert "torch-bfloat16 least cosine" in report.reason
    assert any("precision fast refused" in r.getMessage() for r in caplog.records)
    # What serves is float32, exactly.
    assert _encode(encoder, TEXTS).tobytes() == _encode(exact, TEXTS).tobytes()


def test_gate_falls_through_to_the_next_path_that_passes(bad: Path, tmp_path: Path) -> None:
    encoder = _load(bad, _options(tmp_path))
    assert encoder.precision.path == "openvino-float32"
    reference = SentenceTransformer(str(bad), device="cpu")
    expected = reference.encode(TEXTS, normalize_embeddings=True)
    assert _least_cosine(_encode(encoder, TEXTS), expected) >= 0.999


def test_min_cosine_is_the_gate(good: Path, tmp_path: Path) -> None:
    # Nothing but float32 itself reaches a cosine above 1.
    encoder = _load(good, _options(tmp_path, min_cosine=1.000001))
    assert encoder.precision.path == EXACT_PATH
    assert encoder.precision.gate == 1.000001


def test_export_and_decision_are_cached(
    good: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = _load(good, _options(tmp_path, fast_backend="openvino"))
    (folder,) = tmp_path.iterdir()
    files = {path.name: path.stat().st_mtime_ns for path in folder.iterdir()}
    assert "openvino_model.xml" in files
    assert f"decision-{first.precision.path}.json" in files
    with caplog.at_level(logging.INFO, logger="emb_model_provider.encoders.fast"):
        second = _load(good, _options(tmp_path, fast_backend="openvino"))
    assert {path.name: path.stat().st_mtime_ns for path in folder.iterdir()} == files
    assert any("gate decision read from" in r.getMessage() for r in caplog.records)
    assert second.precision == first.precision
    assert _encode(second, TEXTS).tobytes() == _encode(first, TEXTS).tobytes()


def test_a_shipped_onnx_graph_is_used_as_it_is(good: Path, tmp_path: Path) -> None:
    shipped = tmp_path / "model"
    shutil.copytree(good, shipped)
    model = SentenceTransformer(str(good), device="cpu")[0].auto_model.eval()
    example = (torch.tensor([[101, 2054, 102]]), torch.tensor([[1, 1, 1]]))
    (shipped / "onnx").mkdir()
    with torch.inference_mode():
        torch.onnx.export(
            fast._Wrapped(model),
            example,
            str(shipped / "onnx" / "model.onnx"),
            dynamo=False,
            input_names=["input_ids", "attention_mask"],
            output_names=["last_hidden_state"],
            dynamic_axes={
                "input_ids": {0: "batch", 1: "tokens"},
                "attention_mask": {0: "batch", 1: "tokens"},
                "last_hidden_state": {0: "batch", 1: "tokens"},
            },
        )
    exports = tmp_path / "exports"
    encoder = _load(shipped, _options(exports, fast_backend="openvino"))
    assert encoder.precision.path.startswith("openvino-")
    (folder,) = exports.iterdir()
    assert not (folder / "openvino_model.xml").exists()  # read from onnx/, not converted
    decision = fast.read_decision(folder, encoder.precision.path)
    assert decision is not None
    assert decision.graph == "onnx/model.onnx"
    reference = SentenceTransformer(str(good), device="cpu")
    expected = reference.encode(TEXTS, normalize_embeddings=True)
    assert _least_cosine(_encode(encoder, TEXTS), expected) >= 0.99


@pytest.fixture(scope="module")
def families(root: Path) -> dict[Family, Path]:
    return {
        family: build(family, root / f"family-{family}", "tiny", seed=index)
        for index, family in enumerate(FAMILIES)
    }


@pytest.mark.parametrize(
    ("backend", "dtype"),
    [
        pytest.param("openvino", "bfloat16", marks=needs_bf16),
        ("openvino", "float32"),
        pytest.param("torch", "bfloat16", marks=needs_bf16),
    ],
)
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_within_the_gate(
    families: dict[Family, Path], root: Path, family: Family, backend: str, dtype: str
) -> None:
    path = families[family]
    options = _options(root / "family-exports", fast_backend=backend, fast_dtype=dtype)
    encoder = _load(path, options)
    assert encoder.precision.path == f"{backend}-{dtype}", encoder.precision.reason
    reference = SentenceTransformer(str(path), device="cpu")
    expected = reference.encode(TEXTS, normalize_embeddings=True)
    assert _least_cosine(_encode(encoder, TEXTS), expected) >= 0.99


# -- through the server and the embed command ---------------------------------------------------


@pytest.fixture(scope="module")
def server(root: Path, good: Path, bad: Path) -> Iterator[tuple[str, object]]:
    models_file = text_models_file(
        root / "models.yaml",
        [
            {"name": "fast-bert", "source": str(good), "precision": "fast"},
            {"name": "fast-query", "base": "fast-bert", "prompt_name": "query"},
            {"name": "bad-bert", "source": str(bad), "precision": "fast", "dtype": "bfloat16"},
            {"name": "exact-bert", "source": str(good)},
        ],
    )
    settings = test_settings(models_file=models_file, cache="memory", cache_dir=root / "hub")
    with live_app(settings) as (url, app):
        yield url, app


@needs_bf16
def test_server_serves_fast_and_reports_it(
    server: tuple[str, object], good: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url, app = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    reference = SentenceTransformer(str(good), device="cpu")
    with caplog.at_level(logging.WARNING, logger="emb_model_provider.encoders.fast"):
        for name in ("fast-bert", "bad-bert", "exact-bert"):
            client.embeddings.create(model=name, input="load it")
    assert any("precision fast refused" in r.getMessage() for r in caplog.records)

    # dimensions and prompts on the fast path, against sentence-transformers.
    got = client.embeddings.create(model="fast-query", input=TEXTS, dimensions=16)
    vectors = np.array([item.embedding for item in got.data], dtype=np.float32)
    expected = reference.encode(TEXTS, prompt_name="query", normalize_embeddings=False)[:, :16]
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    assert _least_cosine(vectors, expected) >= 0.99

    cards = {card["id"]: card for card in httpx.get(f"{url}/v1/models").json()["data"]}
    fast_card = cards["fast-bert"]["precision"]
    assert fast_card["requested"] == "fast"
    assert fast_card["path"].startswith("openvino-")
    assert fast_card["min_cosine"] >= 0.99
    assert fast_card["gate"] == 0.99
    assert cards["fast-query"]["precision"] == fast_card  # the base's model
    bad_card = cards["bad-bert"]["precision"]
    assert bad_card["path"] == EXACT_PATH
    assert bad_card["min_cosine"] < 0.99
    assert "least cosine" in bad_card["reason"]
    assert cards["exact-bert"]["precision"] == {
        "requested": "exact",
        "path": EXACT_PATH,
        "min_cosine": None,
        "mean_cosine": None,
        "gate": None,
        "reason": None,
        "cpu_features": None,
    }

    metrics = httpx.get(f"{url}/metrics").text
    path = fast_card["path"]
    assert (
        f'emb_provider_precision_cosine{{model="fast-bert",path="{path}",requested="fast",'
        'stat="min"}' in metrics
    )
    assert (
        'emb_provider_precision_cosine{model="bad-bert",path="torch-float32",requested="fast"'
        in metrics
    )

    # The result cache keys the fast path's vectors apart from float32's.
    models = app.state.models  # type: ignore[attr-defined]
    assert models.loaded("fast-bert").fingerprint.endswith(f"+{path}")
    assert "+" not in models.loaded("exact-bert").fingerprint
    assert "+" not in models.loaded("bad-bert").fingerprint  # refused: float32's vectors


def test_embed_command_takes_the_fast_path(root: Path, good: Path) -> None:
    models_file = text_models_file(
        root / "offline.yaml", [{"name": "fast-bert", "source": str(good)}]
    )
    config = LocalConfig(
        model="fast-bert",
        device="cpu",
        models_file=str(models_file),
        precision="fast",
        cache_dir=str(root / "hub"),
    )
    embedder = LocalEmbedder(config)
    try:
        records = [Record(id=str(i), value=text, kind="text") for i, text in enumerate(TEXTS)]
        result = embedder.embed(records)
    finally:
        embedder.close()
    reference = SentenceTransformer(str(good), device="cpu")
    expected = reference.encode(TEXTS, normalize_embeddings=True)
    assert _least_cosine(np.asarray(result.vectors), expected) >= 0.99
    assert embedder._encoder.precision.path.startswith("openvino-")  # type: ignore[attr-defined]
