"""``emb-model-provider embed``: every input format, both output formats, bad inputs, a real
kill and resume, and ``--url`` against a live server; vectors checked against
sentence-transformers and transformers on the same weights, and against the server.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from sentence_transformers import SentenceTransformer
from transformers import AutoImageProcessor, AutoModel

from emb_model_provider.cli import main
from emb_model_provider.core.config import ENV_PREFIX
from tests.live import live_server, test_settings
from tests.tiny_models import image_models_file, tiny_dinov3_vit

SCRIPT = Path(sys.executable).parent / "emb-model-provider"
WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "vectors",
    "index",
    "every",
    "corpus",
]
RUN_DEADLINE_S = 180


def _texts(count: int, seed: int = 0, *, max_words: int = 30) -> list[str]:
    rng = np.random.default_rng(seed)
    return [
        " ".join(rng.choice(WORDS, size=int(rng.integers(2, max_words)))) + f" #{index}"
        for index in range(count)
    ]


def _embed(*args: str | Path) -> int:
    return main(["embed", *(str(arg) for arg in args), "--device", "cpu"])


def _read(path: Path) -> tuple[list[str], npt.NDArray[np.float32]]:
    table = pq.read_table(path)
    vectors = np.asarray(table.column("embedding").to_pylist(), dtype=np.float32)
    return [str(id_) for id_ in table.column("id").to_pylist()], vectors


def _errors(output: Path) -> dict[str, str]:
    path = output.with_name(output.name + ".errors.jsonl")
    if not path.exists():
        return {}
    lines = path.read_text(encoding="utf-8").splitlines()
    return {json.loads(line)["id"]: json.loads(line)["error"] for line in lines}


def _reference(reference: SentenceTransformer, texts: list[str]) -> npt.NDArray[np.float32]:
    return np.asarray(reference.encode(texts, normalize_embeddings=True), dtype=np.float32)


@pytest.fixture(autouse=True)
def _settings_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """``embed`` reads EMB_PROVIDER_* like ``serve``: none of the developer's, and one torch
    thread (two on a busy 2-core machine spin against each other and run several times slower)."""
    for key in list(os.environ):
        if key.startswith(ENV_PREFIX):
            monkeypatch.delenv(key)
    monkeypatch.setenv(f"{ENV_PREFIX}NUM_THREADS", "1")


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return _texts(40)


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "csv", "parquet"])
def test_each_text_format_gives_the_reference_vectors(
    fmt: str, texts: list[str], tmp_path: Path, reference: SentenceTransformer
) -> None:
    ids = [f"doc-{index}" for index in range(len(texts))]
    source = tmp_path / f"corpus.{fmt}"
    extra: list[str] = []
    if fmt == "txt":
        source.write_text("".join(f"{text}\n" for text in texts), encoding="utf-8")
        ids = [str(number) for number in range(1, len(texts) + 1)]  # line numbers
    elif fmt == "jsonl":
        lines = [
            json.dumps({"id": id_, "text": text}) for id_, text in zip(ids, texts, strict=True)
        ]
        source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    elif fmt == "csv":
        with source.open("w", newline="", encoding="utf-8") as file:
            writer = csv.writer(file)
            writer.writerow(["key", "body"])
            writer.writerows(zip(ids, texts, strict=True))
        extra = ["--column", "body", "--id-column", "key"]
    else:
        pq.write_table(pa.table({"body": texts}), source)
        ids = [str(row) for row in range(len(texts))]  # row numbers
        extra = ["--column", "body"]
    output = tmp_path / "vectors.parquet"

    assert _embed(source, "-o", output, "--chunk-size", "16", "--batch-size", "8", *extra) == 0

    schema = pq.read_schema(output)
    assert schema.field("id").type == pa.string()
    assert schema.field("embedding").type == pa.list_(pa.float32(), 384)
    assert schema.metadata[b"model"] == b"all-MiniLM-L6-v2"
    assert schema.metadata[b"dimensions"] == b"384"
    got_ids, vectors = _read(output)
    assert got_ids == ids
    np.testing.assert_allclose(vectors, _reference(reference, texts), atol=2e-5)
    assert not output.with_name(output.name + ".parts").exists()  # parts gone once assembled
    assert _errors(output) == {}


def test_npy_output_with_dimensions(
    texts: list[str], tmp_path: Path, reference: SentenceTransformer
) -> None:
    source = tmp_path / "corpus.txt"
    source.write_text("\n".join(texts) + "\n", encoding="utf-8")
    output = tmp_path / "vectors.npy"

    assert _embed(source, "-o", output, "--dimensions", "64") == 0

    vectors = np.load(output)
    assert vectors.dtype == np.float32 and vectors.shape == (len(texts), 64)
    full = _reference(reference, texts)[:, :64]
    np.testing.assert_allclose(
        vectors, full / np.linalg.norm(full, axis=1, keepdims=True), atol=2e-5
    )
    ids = [json.loads(line) for line in (tmp_path / "vectors.ids.jsonl").read_text().splitlines()]
    assert ids == [str(number) for number in range(1, len(texts) + 1)]


def test_bad_lines_go_to_the_errors_file_and_the_rest_goes_on(
    tmp_path: Path, reference: SentenceTransformer
) -> None:
    lines = [
        json.dumps({"id": "a", "text": "a fine first line"}),
        "{not json",
        json.dumps({"text": "no id here"}),
        json.dumps({"id": "img", "image": "cat.png"}),
        json.dumps({"id": "empty", "text": "  "}),
        json.dumps({"id": 7, "text": "a number as id"}),
        json.dumps(["a", "list"]),
    ]
    source = tmp_path / "corpus.jsonl"
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    output = tmp_path / "out.parquet"

    assert _embed(source, "-o", output, "--chunk-size", "3") == 0

    ids, vectors = _read(output)
    assert ids == ["a", "7"]
    np.testing.assert_allclose(
        vectors, _reference(reference, ["a fine first line", "a number as id"]), atol=2e-5
    )
    errors = _errors(output)
    assert set(errors) == {"line 2", "line 3", "img", "empty", "line 7"}
    assert "not JSON" in errors["line 2"]
    assert '"id"' in errors["line 3"]
    assert "takes texts" in errors["img"]
    assert "empty" in errors["empty"]


def _png(color: tuple[int, int, int], size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_image_directory_and_jsonl(tmp_path: Path) -> None:
    model_dir = tiny_dinov3_vit(tmp_path / "tiny-vit")
    models = image_models_file(tmp_path / "models.yaml", {"tiny-vit": model_dir})
    photos = tmp_path / "photos"
    (photos / "2024" / "summer").mkdir(parents=True)
    images = {
        "a.png": _png((255, 0, 0), (40, 30)),
        "2024/b.png": _png((0, 200, 0), (64, 64)),
        "2024/summer/c.PNG": _png((10, 20, 250), (31, 77)),
    }
    for name, data in images.items():
        (photos / name).write_bytes(data)
    (photos / "2024" / "broken.png").write_bytes(b"not a png at all")
    (photos / "notes.txt").write_text("not an image, not an input")
    output = tmp_path / "photos.parquet"

    assert _embed(photos, "-o", output, "--model", "tiny-vit", "--models-file", models) == 0

    ids, vectors = _read(output)
    assert ids == ["2024/b.png", "2024/summer/c.PNG", "a.png"]
    assert list(_errors(output)) == ["2024/broken.png"]
    # The reference: the model's own processor and pooled output, L2-normalised.
    processor = AutoImageProcessor.from_pretrained(str(model_dir))
    model = AutoModel.from_pretrained(str(model_dir)).eval()
    pictures = [Image.open(io.BytesIO(images[id_])).convert("RGB") for id_ in ids]
    with torch.inference_mode():
        pooled = model(**processor(images=pictures, return_tensors="pt")).pooler_output.numpy()
    np.testing.assert_allclose(
        vectors, pooled / np.linalg.norm(pooled, axis=1, keepdims=True), atol=1e-5
    )

    # The same images from JSONL: a path relative to the file, and a data URI.
    data_uri = "data:image/png;base64," + base64.b64encode(images["a.png"]).decode()
    listing = tmp_path / "images.jsonl"
    listing.write_text(
        json.dumps({"id": "b", "image": "photos/2024/b.png"})
        + "\n"
        + json.dumps({"id": "a", "image": data_uri})
        + "\n"
        + json.dumps({"id": "t", "text": "a text for an image model"})
        + "\n",
        encoding="utf-8",
    )
    second = tmp_path / "listing.parquet"
    assert _embed(listing, "-o", second, "--model", "tiny-vit", "--models-file", models) == 0
    got_ids, got = _read(second)
    assert got_ids == ["b", "a"]
    np.testing.assert_allclose(got, vectors[[0, 2]], atol=1e-6)
    assert list(_errors(second)) == ["t"]

    # The folder through a server: files sent as data URIs, the broken one isolated from its
    # request by the server's 400.
    remote = tmp_path / "remote.parquet"
    with live_server(test_settings(models_file=models)) as url:
        flags = ["--model", "tiny-vit", "--url", url, "--batch-size", "4"]
        assert main(["embed", str(photos), "-o", str(remote), *flags]) == 0
    remote_ids, remote_vectors = _read(remote)
    assert remote_ids == ids
    np.testing.assert_allclose(remote_vectors, vectors, atol=1e-6)
    assert list(_errors(remote)) == ["2024/broken.png"]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--chunk-size", "many"], "--chunk-size must be a number"),
        (["--engine", "spark"], "--engine must be local or ray"),
        (["--column", "text"], "apply to csv and parquet"),
        (["--device", "tpu"], "EMB_PROVIDER_DEVICE"),
        (["--url", "ftp://x"], "--url must be an http(s) URL"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(
    args: list[str], fragment: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "c.txt"
    source.write_text("one\n")

    assert main(["embed", str(source), "-o", str(tmp_path / "o.parquet"), *args]) == 2

    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and fragment in lines[0], lines


def test_bad_inputs_and_outputs_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "c.csv"
    source.write_text("a,b\n1,2\n")
    existing = tmp_path / "done.parquet"
    existing.write_bytes(b"")
    cases = [
        ([str(tmp_path / "missing.txt"), "-o", str(tmp_path / "o.parquet")], "input not found", 2),
        ([str(source), "-o", str(tmp_path / "o.parquet")], "--column is required", 2),
        ([str(source), "-o", str(tmp_path / "o.parquet"), "--column", "c"], "no column 'c'", 2),
        ([str(source), "-o", str(tmp_path / "o.csv"), "--column", "a"], ".parquet or .npy", 1),
        ([str(source), "-o", str(existing), "--column", "a"], "--overwrite", 1),
        (
            [str(source), "-o", str(tmp_path / "o.parquet"), "--column", "a", "--model", "nope"],
            "unknown model 'nope'",
            1,
        ),
    ]
    for args, fragment, status in cases:
        assert main(["embed", *args, "--device", "cpu"]) == status, args
        lines = capsys.readouterr().err.splitlines()
        assert len(lines) == 1 and fragment in lines[0], (args, lines)


# -- a real kill, then a resume ------------------------------------------------------------------


def _env() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(ENV_PREFIX)}
    env["HF_HUB_OFFLINE"] = "1"
    env[f"{ENV_PREFIX}NUM_THREADS"] = "1"
    return env


def _parts(output: Path) -> list[Path]:
    return sorted(output.with_name(output.name + ".parts").glob("part-*.parquet"))


@pytest.fixture
def long_corpus(tmp_path: Path) -> Iterator[tuple[Path, list[str]]]:
    texts = _texts(240, seed=1, max_words=6)
    source = tmp_path / "long.txt"
    source.write_text("\n".join(texts[:100]) + "\n\n" + "\n".join(texts[100:]) + "\n")
    yield source, texts


def test_kill_then_resume_equals_an_uninterrupted_run(
    long_corpus: tuple[Path, list[str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The console script is killed (SIGKILL) once three chunks are on disk; the same command
    run again (here in-process, the same code path) finishes the rest."""
    source, _ = long_corpus
    flags = ["--chunk-size", "10", "--batch-size", "10", "--device", "cpu"]
    output = tmp_path / "killed.parquet"
    command = [str(SCRIPT), "embed", str(source), "-o", str(output), *flags]
    process = subprocess.Popen(
        command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + RUN_DEADLINE_S
        while len(_parts(output)) < 3:  # wait for three finished chunks, then kill
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            assert time.monotonic() < deadline, "no parts were written in time"
            time.sleep(0.02)  # polling interval under a deadline
        process.send_signal(signal.SIGKILL)
        process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)
    finished = len(_parts(output))
    assert 3 <= finished < 24, finished  # killed part-way: 241 lines are 25 chunks
    assert not output.exists()  # no half-written output

    capsys.readouterr()
    # Another chunk size would cut other chunks: refused, and the parts are kept.
    other = [arg if arg != "10" else "12" for arg in command[1:]]
    assert main(other) == 1
    assert "another chunk_size" in capsys.readouterr().err
    assert len(_parts(output)) == finished

    assert main(command[1:]) == 0
    summary = capsys.readouterr().err.splitlines()[-1]
    done = finished * 10
    assert f"{done} done by an earlier run, not recomputed" in summary, summary
    assert re.search(r"241 inputs, 240 embedded, 1 errors", summary), summary

    uninterrupted = tmp_path / "whole.parquet"
    assert main(["embed", str(source), "-o", str(uninterrupted), *flags]) == 0
    assert pq.read_table(output).equals(pq.read_table(uninterrupted))
    assert pq.read_schema(output).metadata == pq.read_schema(uninterrupted).metadata
    assert _errors(output) == _errors(uninterrupted) == {"101": "the input is empty"}


# -- the same job through a running server -------------------------------------------------------


def test_url_engine_matches_the_server_and_isolates_bad_inputs(
    tmp_path: Path, reference: SentenceTransformer
) -> None:
    texts = _texts(50, seed=2)
    long_text = " ".join(["word"] * 400)  # over 256 tokens: a 400 when truncation is off
    texts[17] = long_text
    source = tmp_path / "corpus.txt"
    source.write_text("\n".join(texts) + "\n", encoding="utf-8")
    output = tmp_path / "remote.parquet"

    with live_server(test_settings(truncate=False)) as url:
        status = main(
            [
                "embed",
                str(source),
                "-o",
                str(output),
                "--url",
                url,
                "--batch-size",
                "8",
                "--concurrency",
                "3",
                "--chunk-size",
                "20",
                "--dimensions",
                "128",
            ]
        )

    assert status == 0
    ids, vectors = _read(output)
    expected_ids = [str(number) for number in range(1, 51) if number != 18]
    assert ids == expected_ids
    assert list(_errors(output)) == ["18"]
    assert "maximum context length is 256 tokens" in _errors(output)["18"]
    good = [text for index, text in enumerate(texts) if index != 17]
    full = _reference(reference, good)[:, :128]
    np.testing.assert_allclose(
        vectors, full / np.linalg.norm(full, axis=1, keepdims=True), atol=2e-5
    )
    assert pq.read_schema(output).metadata[b"dimensions"] == b"128"
