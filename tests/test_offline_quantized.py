"""``embed --encoding-format``: the bulk command writes int8/uint8/binary/ubinary vectors, as the
server's ``encoding_format`` and sentence-transformers' ``quantize_embeddings`` give them, locally
and through ``--url``."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sentence_transformers import SentenceTransformer
from sentence_transformers.util.quantization import quantize_embeddings

from emb_model_provider.cli import main
from emb_model_provider.core.config import ENV_PREFIX
from emb_model_provider.core.quantization import calibration_texts, ranges_of
from tests.conftest import DEFAULT_MODEL
from tests.live import live_server, test_settings

TEXTS = [f"text number {index}: {word}" for index, word in enumerate(["fox", "dog", "index"] * 7)]


@pytest.fixture(autouse=True)
def _settings_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith(ENV_PREFIX):
            monkeypatch.delenv(key)
    monkeypatch.setenv(f"{ENV_PREFIX}NUM_THREADS", "1")


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("offline-quantized") / "corpus.txt"
    path.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    return path


def _read(path: Path) -> np.ndarray:
    return np.asarray(pq.read_table(path).column("embedding").to_pylist())


@pytest.mark.parametrize("precision", ["int8", "ubinary"])
def test_local_engine_writes_the_librarys_integers(
    source: Path, tmp_path: Path, reference: SentenceTransformer, precision: str
) -> None:
    output = tmp_path / "vectors.parquet"
    status = main(
        ["embed", str(source), "-o", str(output), "--encoding-format", precision, "--device", "cpu"]
    )
    assert status == 0
    schema = pq.read_schema(output)
    expected_type = pa.int8() if precision == "int8" else pa.uint8()
    assert schema.field("embedding").type.value_type == expected_type
    assert schema.metadata[b"encoding_format"] == precision.encode()
    ours = _read(output)
    floats = np.asarray(reference.encode(TEXTS, normalize_embeddings=True))
    ranges = (
        ranges_of(np.asarray(reference.encode(calibration_texts(), normalize_embeddings=True)))
        if precision == "int8"
        else None
    )
    theirs = quantize_embeddings(floats, precision, ranges=ranges)  # type: ignore[arg-type]
    assert isinstance(theirs, np.ndarray)
    assert ours.shape == theirs.shape
    difference = np.abs(ours - theirs.astype(np.int64))
    assert difference.max() <= (1 if precision == "int8" else 255)
    assert (difference == 0).mean() > 0.99


def test_url_engine_writes_the_servers_integers(source: Path, tmp_path: Path) -> None:
    output = tmp_path / "vectors.npy"
    with live_server(test_settings()) as url:
        status = main(
            ["embed", str(source), "-o", str(output), "--url", url, "--encoding-format", "uint8"]
        )
        online = httpx.post(
            f"{url}/v1/embeddings",
            json={"model": DEFAULT_MODEL, "input": TEXTS, "encoding_format": "uint8"},
            timeout=120,
        ).json()
    assert status == 0
    ours = np.load(output)
    assert ours.dtype == np.uint8 and ours.shape == (len(TEXTS), 384)
    served = np.array([item["embedding"] for item in online["data"]])
    # The command calibrates through the server's float vectors: the same ranges up to float32
    # rounding, so at most a bucket apart at a bucket's edge.
    assert np.abs(ours.astype(np.int64) - served).max() <= 1
    assert (ours == served).mean() > 0.99


def test_bad_encoding_format_is_a_usage_error(source: Path, tmp_path: Path) -> None:
    status = main(
        ["embed", str(source), "-o", str(tmp_path / "x.parquet"), "--encoding-format", "int4"]
    )
    assert status == 2
