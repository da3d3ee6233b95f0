"""``embed --engine ray`` and ``embed_dataset`` on a local Ray instance (2 CPUs, loopback, no
dashboard): the same vectors, ids and errors as the in-process engine and sentence-transformers.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from sentence_transformers import SentenceTransformer

from emb_model_provider.cli import main
from emb_model_provider.core.config import ENV_PREFIX

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*")

TEXTS = [
    f"{subject} {verb} the {thing} #{index}"
    for index, (subject, verb, thing) in enumerate(
        (subject, verb, thing)
        for subject in ("a cat", "the team", "my laptop", "every index")
        for verb in ("finds", "embeds", "reads")
        for thing in ("corpus", "photo library", "vector", "long report on the quarterly figures")
    )
]


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ["HF_HUB_OFFLINE"] = "1"
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        _node_ip_address="127.0.0.1",
    )
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(autouse=True)
def _settings_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith(ENV_PREFIX):
            monkeypatch.delenv(key)
    monkeypatch.setenv(f"{ENV_PREFIX}NUM_THREADS", "1")


def test_ray_engine_equals_the_in_process_engine(
    local_ray: None, tmp_path: Path, reference: SentenceTransformer
) -> None:
    source = tmp_path / "corpus.txt"
    lines = [*TEXTS[:20], "", *TEXTS[20:]]  # line 21 is empty: an error in both engines
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    common = ["--batch-size", "8", "--chunk-size", "16", "--device", "cpu", "--dimensions", "256"]
    on_ray = tmp_path / "ray.parquet"
    in_process = tmp_path / "local.parquet"

    assert main(["embed", str(source), "-o", str(on_ray), "--engine", "ray", *common]) == 0
    assert main(["embed", str(source), "-o", str(in_process), *common]) == 0

    ray_table, local_table = pq.read_table(on_ray), pq.read_table(in_process)
    assert ray_table.schema.equals(local_table.schema, check_metadata=True)
    assert ray_table.column("id").to_pylist() == local_table.column("id").to_pylist()
    ray_vectors = np.asarray(ray_table.column("embedding").to_pylist(), dtype=np.float32)
    local_vectors = np.asarray(local_table.column("embedding").to_pylist(), dtype=np.float32)
    np.testing.assert_allclose(ray_vectors, local_vectors, atol=1e-6)
    full = reference.encode(TEXTS, normalize_embeddings=True)[:, :256]
    np.testing.assert_allclose(
        ray_vectors, full / np.linalg.norm(full, axis=1, keepdims=True), atol=2e-5
    )
    errors = [
        path.read_text()
        for path in (tmp_path / "ray.parquet.errors.jsonl", tmp_path / "local.parquet.errors.jsonl")
    ]
    assert errors[0] == errors[1] == '{"id": "21", "error": "the input is empty"}\n'
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "corpus.txt",
        "local.parquet",
        "local.parquet.errors.jsonl",
        "ray.parquet",
        "ray.parquet.errors.jsonl",
    ]


def test_embed_dataset_python_entry_point(local_ray: None, reference: SentenceTransformer) -> None:
    from emb_model_provider.offline.local import LocalConfig
    from emb_model_provider.offline.ray_engine import embed_dataset

    items = [{"key": index * 10, "body": text} for index, text in enumerate(TEXTS)]
    items[3]["body"] = ""
    ds = ray.data.from_items(items)
    config = LocalConfig.create("all-MiniLM-L6-v2", device="cpu", batch_size=8)

    rows = embed_dataset(ds, config, value_column="body", id_column="key", actors=1).take_all()

    by_id = {row["id"]: row for row in rows}
    assert sorted(by_id) == sorted(str(index * 10) for index in range(len(TEXTS)))
    assert by_id["30"]["error"] == "the input is empty"
    good = [index for index in range(len(TEXTS)) if index != 3]
    vectors = np.stack([by_id[str(index * 10)]["embedding"] for index in good])
    expected = reference.encode([TEXTS[index] for index in good], normalize_embeddings=True)
    np.testing.assert_allclose(vectors, expected, atol=2e-5)
    assert sum(int(row["tokens"]) for row in rows) > len(good) * 5
