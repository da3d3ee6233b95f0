"""``emb-model-provider embed`` with a multimodal model: an image folder and a query file embedded
in separate runs are one vector space, equal to transformers' features and to the server's."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import openai
import pytest

from emb_model_provider.cli import main
from tests.live import live_server, test_settings
from tests.test_multimodal import Reference, _png
from tests.test_offline_cli import _errors, _read
from tests.tiny_multimodal import multimodal_models_file, tiny_clip

QUERIES = ["a photo of a cat", "a blue car parked in the street at night", "green trees"]


def _embed(*args: str | Path) -> int:
    return main(["embed", *(str(arg) for arg in args), "--device", "cpu"])


def test_image_folder_and_query_file_are_comparable(tmp_path: Path) -> None:
    model_dir = tiny_clip(tmp_path / "tiny-clip")
    models = multimodal_models_file(tmp_path / "models.yaml", {"tiny-clip": model_dir})
    flags = ["--model", "tiny-clip", "--models-file", str(models)]
    photos = tmp_path / "photos"
    (photos / "more").mkdir(parents=True)
    images = {"a.png": _png(1), "b.png": _png(2, (30, 60)), "more/c.png": _png(3, (64, 20))}
    for name, data in images.items():
        (photos / name).write_bytes(data)
    (photos / "broken.png").write_bytes(b"not a png")
    queries = tmp_path / "queries.txt"
    queries.write_text("\n".join(QUERIES) + "\n", encoding="utf-8")

    assert _embed(photos, "-o", tmp_path / "images.parquet", *flags) == 0
    assert _embed(queries, "-o", tmp_path / "queries.parquet", *flags) == 0

    image_ids, image_vectors = _read(tmp_path / "images.parquet")
    query_ids, query_vectors = _read(tmp_path / "queries.parquet")
    assert image_ids == ["a.png", "b.png", "more/c.png"]
    assert list(_errors(tmp_path / "images.parquet")) == ["broken.png"]
    assert query_ids == ["1", "2", "3"]
    reference = Reference("clip", model_dir)
    expected_images = reference.images([images[name] for name in image_ids])
    expected_queries = reference.texts(QUERIES)
    np.testing.assert_allclose(image_vectors, expected_images, atol=1e-5)
    np.testing.assert_allclose(query_vectors, expected_queries, atol=1e-5)
    # One space: the query-image cosines are transformers' own.
    np.testing.assert_allclose(
        query_vectors @ image_vectors.T, expected_queries @ expected_images.T, atol=1e-5
    )

    # The same from one JSONL file with both kinds of line, and through a server (--url).
    listing = tmp_path / "both.jsonl"
    data_uri = "data:image/png;base64," + base64.b64encode(images["b.png"]).decode()
    lines = [
        {"id": "q1", "text": QUERIES[0]},
        {"id": "img-a", "image": "photos/a.png"},
        {"id": "img-b", "image": data_uri},
        {"id": "nothing", "caption": "neither text nor image"},
    ]
    listing.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    assert _embed(listing, "-o", tmp_path / "both.parquet", *flags) == 0
    both_ids, both = _read(tmp_path / "both.parquet")
    assert both_ids == ["q1", "img-a", "img-b"]
    assert list(_errors(tmp_path / "both.parquet")) == ["nothing"]
    np.testing.assert_allclose(
        both, np.stack([query_vectors[0], image_vectors[0], image_vectors[1]]), atol=1e-6
    )

    with live_server(test_settings(models_file=models)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0)
        api = client.embeddings.create(model="tiny-clip", input=QUERIES).data
        np.testing.assert_allclose(
            np.array([item.embedding for item in api]), query_vectors, atol=1e-6
        )
        remote = ["--model", "tiny-clip", "--url", url, "--batch-size", "2"]
        assert main(["embed", str(photos), "-o", str(tmp_path / "r-images.parquet"), *remote]) == 0
        assert main(["embed", str(listing), "-o", str(tmp_path / "r-both.parquet"), *remote]) == 0
    remote_ids, remote_images = _read(tmp_path / "r-images.parquet")
    assert remote_ids == image_ids
    np.testing.assert_allclose(remote_images, image_vectors, atol=1e-6)
    assert list(_errors(tmp_path / "r-images.parquet")) == ["broken.png"]
    remote_both_ids, remote_both = _read(tmp_path / "r-both.parquet")
    assert remote_both_ids == both_ids
    np.testing.assert_allclose(remote_both, both, atol=1e-6)


def test_ray_engine_refuses_multimodal_models(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_dir = tiny_clip(tmp_path / "tiny-clip")
    models = multimodal_models_file(tmp_path / "models.yaml", {"tiny-clip": model_dir})
    queries = tmp_path / "queries.txt"
    queries.write_text("a cat\n", encoding="utf-8")
    flags = ["--model", "tiny-clip", "--models-file", str(models), "--engine", "ray"]
    assert _embed(queries, "-o", tmp_path / "out.parquet", *flags) != 0
    assert "not --engine ray" in capsys.readouterr().err
