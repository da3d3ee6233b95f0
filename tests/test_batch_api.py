"""The Batch API (/v1/files, /v1/batches) on live servers through the real OpenAI SDK: vectors
against sentence-transformers, bad lines in the error file, validation, cancel, limits, privacy
between API keys, wire format against OpenAI's specification, and a server killed mid-job that
resumes with every line exactly once.
"""

from __future__ import annotations

import base64
import json
import signal
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import yaml
from openai.types import Batch, BatchRequestCounts
from sentence_transformers import SentenceTransformer

from emb_model_provider.security.keys import generate_key, hash_key
from tests.conftest import DEFAULT_MODEL
from tests.live import live_server, serve_process, test_settings
from tests.test_openapi_conformance import REFERENCE_DIR, _validators

MAX_LINES = 3000
MAX_FILE_BYTES = 1_000_000
MAX_REQUEST_BYTES = 200_000  # below the file limit: uploads have their own
KEY_A = generate_key()
KEY_B = generate_key()
KEY_L12_ONLY = generate_key()  # may use all-MiniLM-L12-v2 only
TERMINAL = {"completed", "failed", "expired", "cancelled"}
SPEC_PATH = REFERENCE_DIR / "openai-openapi-batch.yaml"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    keys_file = tmp_path_factory.mktemp("keys") / "keys.yaml"
    restricted = {"hash": hash_key(KEY_L12_ONLY), "models": ["all-MiniLM-L12-v2"]}
    keys_file.write_text(yaml.safe_dump({"keys": [restricted]}), encoding="utf-8")
    settings = test_settings(
        data_dir=tmp_path_factory.mktemp("batch-data"),
        api_key_hashes=f"{hash_key(KEY_A)},{hash_key(KEY_B)}",
        api_keys_file=keys_file,
        batch_max_lines=MAX_LINES,
        batch_max_file_bytes=MAX_FILE_BYTES,
        max_request_bytes=MAX_REQUEST_BYTES,
    )
    with live_server(settings) as url:
        yield url


def _client(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def client_a(server: str) -> openai.OpenAI:
    return _client(server, KEY_A)


@pytest.fixture(scope="module")
def client_b(server: str) -> openai.OpenAI:
    return _client(server, KEY_B)


def _line(custom_id: str, body: dict[str, Any], url: str = "/v1/embeddings") -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def _jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def _upload(client: openai.OpenAI, lines: list[dict[str, Any]]) -> str:
    return client.files.create(file=("input.jsonl", _jsonl(lines)), purpose="batch").id


def _run(client: openai.OpenAI, lines: list[dict[str, Any]]) -> Batch:
    batch = client.batches.create(
        input_file_id=_upload(client, lines),
        endpoint="/v1/embeddings",
        completion_window="24h",
        metadata={"test": "batch-api"},
    )
    assert batch.status == "validating"
    return _wait(client, batch.id)


def _start_until(
    client: openai.OpenAI, lines: list[dict[str, Any]], *, completed: int, deadline_s: float = 60
) -> tuple[Batch, BatchRequestCounts | None]:
    """Start a batch of ``lines`` and return once at least ``completed`` of them are done (or
    the deadline passed), with the counts last seen."""
    batch = client.batches.create(
        input_file_id=_upload(client, lines), endpoint="/v1/embeddings", completion_window="24h"
    )
    counts = None
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        counts = client.batches.retrieve(batch.id).request_counts
        if counts is not None and counts.completed >= completed:
            break
        time.sleep(0.02)  # polling interval under a deadline
    return batch, counts


def _wait(client: openai.OpenAI, batch_id: str, deadline_s: float = 90) -> Batch:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if batch.status in TERMINAL:
            return batch
        time.sleep(0.05)  # polling interval under a deadline
    raise TimeoutError(f"batch {batch_id} not finished after {deadline_s} s: {batch.status}")


def _lines_of(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    text = client.files.content(file_id).text
    return [json.loads(line) for line in text.splitlines()]


def _vector(item: dict[str, Any]) -> np.ndarray:
    value = item["embedding"]
    if isinstance(value, str):
        return np.frombuffer(base64.b64decode(value), dtype="<f4")
    return np.asarray(value, dtype=np.float32)


def _unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)


TEXTS = ["The quick brown fox jumps over the lazy dog.", "ünïcödé 日本語 🙂", "a", "batch me"]


def test_round_trip_matches_sentence_transformers(
    client_a: openai.OpenAI, reference: SentenceTransformer
) -> None:
    lines = [
        _line("one", {"model": DEFAULT_MODEL, "input": TEXTS[0]}),
        _line("many", {"model": DEFAULT_MODEL, "input": TEXTS}),
        _line("b64", {"model": DEFAULT_MODEL, "input": TEXTS[1:3], "encoding_format": "base64"}),
        _line("dims", {"model": DEFAULT_MODEL, "input": [TEXTS[3]], "dimensions": 64}),
        _line("empty", {"model": DEFAULT_MODEL, "input": ""}),  # 400, as online
        _line("nomodel", {"model": "no-such-model", "input": "x"}),  # 404, as online
        _line("toobig", {"model": DEFAULT_MODEL, "input": "x", "dimensions": 385}),  # 400
    ]
    batch = _run(client_a, lines)
    assert batch.status == "completed", batch
    assert batch.request_counts is not None
    assert (batch.request_counts.total, batch.request_counts.completed) == (7, 4)
    assert batch.request_counts.failed == 3
    assert batch.model is None  # its lines name two models
    assert batch.metadata == {"test": "batch-api"}
    assert batch.created_at <= (batch.in_progress_at or 0) <= (batch.completed_at or 0)
    assert batch.expires_at == batch.created_at + 24 * 3600

    outputs = {line["custom_id"]: line for line in _lines_of(client_a, batch.output_file_id)}
    assert set(outputs) == {"one", "many", "b64", "dims"}
    expected = {
        "one": [TEXTS[0]],
        "many": TEXTS,
        "b64": TEXTS[1:3],
        "dims": [TEXTS[3]],
    }
    for custom_id, texts in expected.items():
        line = outputs[custom_id]
        assert set(line) == {"id", "custom_id", "response", "error"}
        assert line["error"] is None and line["id"].startswith("batch_req_")
        assert set(line["response"]) == {"status_code", "request_id", "body"}
        assert line["response"]["status_code"] == 200
        body = line["response"]["body"]
        assert body["object"] == "list" and body["model"] == DEFAULT_MODEL
        assert body["usage"]["prompt_tokens"] > 0
        got = np.stack([_vector(item) for item in body["data"]])
        want = reference.encode(texts, normalize_embeddings=True)
        if custom_id == "dims":
            want = _unit(want[:, :64])
        np.testing.assert_allclose(got, want, atol=2e-5)
    assert isinstance(outputs["b64"]["response"]["body"]["data"][0]["embedding"], str)

    errors = {line["custom_id"]: line for line in _lines_of(client_a, batch.error_file_id)}
    assert set(errors) == {"empty", "nomodel", "toobig"}
    statuses = {key: line["response"]["status_code"] for key, line in errors.items()}
    assert statuses == {"empty": 400, "nomodel": 404, "toobig": 400}
    for line in errors.values():
        assert line["error"] is None
        error = line["response"]["body"]["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] == "invalid_request_error"
    assert errors["nomodel"]["response"]["body"]["error"]["code"] == "model_not_found"
    assert errors["toobig"]["response"]["body"]["error"]["param"] == "dimensions"
    # The online route answers the same error for the same body.
    with pytest.raises(openai.BadRequestError) as online:
        client_a.embeddings.create(model=DEFAULT_MODEL, input="")
    assert online.value.body == errors["empty"]["response"]["body"]["error"]

    output_file = client_a.files.retrieve(batch.output_file_id or "")
    assert output_file.purpose == "batch_output"
    assert output_file.filename == f"batch_{batch.id}_output.jsonl"


@pytest.mark.parametrize("encoding_format", ["int8", "uint8", "binary", "ubinary"])
def test_quantised_lines_equal_the_online_answer(
    client_a: openai.OpenAI, encoding_format: str
) -> None:
    body = {"model": DEFAULT_MODEL, "input": TEXTS, "encoding_format": encoding_format}
    batch = _run(client_a, [_line("q", body)])
    assert batch.status == "completed", batch
    (line,) = _lines_of(client_a, batch.output_file_id)
    got = [item["embedding"] for item in line["response"]["body"]["data"]]
    online = client_a.embeddings.create(**body)  # type: ignore[call-overload]
    assert got == [item.embedding for item in online.data]
    assert all(isinstance(value, int) for value in got[0])


def test_malformed_lines_fail_the_batch_with_their_line_numbers(client_a: openai.OpenAI) -> None:
    good = _line("ok", {"model": DEFAULT_MODEL, "input": "x"})
    raw = b"\n".join(
        [
            json.dumps(good).encode(),
            b"{not json",
            json.dumps(good).encode(),  # duplicate custom_id
            json.dumps(_line("url", {"model": DEFAULT_MODEL, "input": "x"}, "/v1/chat")).encode(),
            json.dumps({"custom_id": "nobody", "method": "POST", "url": "/v1/embeddings"}).encode(),
        ]
    )
    file_id = client_a.files.create(file=("bad.jsonl", raw), purpose="batch").id
    batch = client_a.batches.create(
        input_file_id=file_id, endpoint="/v1/embeddings", completion_window="24h"
    )
    batch = _wait(client_a, batch.id)
    assert batch.status == "failed" and batch.failed_at is not None
    assert batch.output_file_id is None and batch.error_file_id is None
    assert batch.errors is not None and batch.errors.data is not None
    found = {(error.line, error.code) for error in batch.errors.data}
    assert found == {
        (2, "invalid_json_line"),
        (3, "duplicate_custom_id"),
        (4, "invalid_url"),
        (5, "missing_required_parameter"),
    }


def test_cancel_keeps_partial_output(client_a: openai.OpenAI) -> None:
    text = " ".join(["a longer sentence to keep the model busy for a while"] * 4)
    lines = [_line(f"c{i}", {"model": DEFAULT_MODEL, "input": f"{i} {text}"}) for i in range(2000)]
    batch = client_a.batches.create(
        input_file_id=_upload(client_a, lines), endpoint="/v1/embeddings", completion_window="24h"
    )
    cancelling = client_a.batches.cancel(batch.id)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at is not None
    assert client_a.batches.cancel(batch.id).status in {"cancelling", "cancelled"}
    batch = _wait(client_a, batch.id, deadline_s=30)
    assert batch.status == "cancelled" and batch.cancelled_at is not None
    assert batch.request_counts is not None
    done = batch.request_counts.completed
    assert done < 2000
    outputs = _lines_of(client_a, batch.output_file_id)
    assert len(outputs) == done
    unrun = _lines_of(client_a, batch.error_file_id)
    assert all(line["response"] is None for line in unrun)
    assert {line["error"]["code"] for line in unrun} == {"batch_cancelled"}
    seen = [line["custom_id"] for line in outputs + unrun]
    assert sorted(seen) == sorted(line["custom_id"] for line in lines)
    with pytest.raises(openai.ConflictError):
        client_a.batches.cancel(batch.id)


def test_limits_and_bad_requests(client_a: openai.OpenAI) -> None:
    line = json.dumps(_line("x", {"model": DEFAULT_MODEL, "input": "x"})).encode() + b"\n"
    with pytest.raises(openai.BadRequestError) as too_many:
        client_a.files.create(file=("many.jsonl", line * (MAX_LINES + 1)), purpose="batch")
    assert too_many.value.code == "too_many_lines"
    with pytest.raises(openai.BadRequestError) as too_big:
        client_a.files.create(file=("big.jsonl", b" " * (MAX_FILE_BYTES + 1)), purpose="batch")
    assert too_big.value.code == "file_too_large"
    # A file over the request body limit but within the file limit is taken; other routes keep
    # the request limit.
    padded = json.dumps(_line("p", {"model": DEFAULT_MODEL, "input": "y" * 240})).encode() + b"\n"
    big_file = padded * (3 * MAX_REQUEST_BYTES // len(padded))
    assert MAX_REQUEST_BYTES < len(big_file) < MAX_FILE_BYTES
    uploaded = client_a.files.create(file=("big-ok.jsonl", big_file), purpose="batch")
    assert uploaded.bytes == len(big_file)
    with pytest.raises(openai.APIStatusError) as body_limit:
        client_a.embeddings.create(model=DEFAULT_MODEL, input=["z" * MAX_REQUEST_BYTES])
    assert body_limit.value.status_code == 413
    with pytest.raises(openai.BadRequestError) as purpose:
        client_a.files.create(file=("x.jsonl", line), purpose="fine-tune")
    assert purpose.value.param == "purpose"
    file_id = client_a.files.create(file=("x.jsonl", line), purpose="batch").id
    with pytest.raises(openai.BadRequestError) as endpoint:
        client_a.batches.create(
            input_file_id=file_id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
        )
    assert endpoint.value.param == "endpoint"
    with pytest.raises(openai.BadRequestError) as window:
        client_a.batches.create(
            input_file_id=file_id,
            endpoint="/v1/embeddings",
            completion_window="1h",  # type: ignore[arg-type]
        )
    assert window.value.param == "completion_window"
    with pytest.raises(openai.NotFoundError):
        client_a.batches.create(
            input_file_id="file-nope", endpoint="/v1/embeddings", completion_window="24h"
        )
    with pytest.raises(openai.NotFoundError):
        client_a.batches.retrieve("batch_nope")
    # The server is still serving.
    assert client_a.embeddings.create(model=DEFAULT_MODEL, input="alive").data


def test_files_and_batches_are_private_to_their_key(
    server: str, client_a: openai.OpenAI, client_b: openai.OpenAI
) -> None:
    lines = [_line("p", {"model": DEFAULT_MODEL, "input": "private"})]
    file_id = _upload(client_a, lines)
    batch = client_a.batches.create(
        input_file_id=file_id, endpoint="/v1/embeddings", completion_window="24h"
    )
    for call in (
        lambda: client_b.files.retrieve(file_id),
        lambda: client_b.files.content(file_id),
        lambda: client_b.files.delete(file_id),
        lambda: client_b.batches.retrieve(batch.id),
        lambda: client_b.batches.cancel(batch.id),
        lambda: client_b.batches.create(
            input_file_id=file_id, endpoint="/v1/embeddings", completion_window="24h"
        ),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    assert file_id not in {item.id for item in client_b.files.list()}
    assert batch.id not in {item.id for item in client_b.batches.list()}
    assert batch.id in {item.id for item in client_a.batches.list()}
    with pytest.raises(openai.AuthenticationError):
        _client(server, "sk-wrong").files.retrieve(file_id)
    assert _wait(client_a, batch.id).status == "completed"
    # The job keeps its input when the file is deleted.
    deleted = client_a.files.delete(file_id)
    assert deleted.deleted and deleted.id == file_id
    with pytest.raises(openai.NotFoundError):
        client_a.files.retrieve(file_id)


def test_a_batch_runs_with_the_model_permissions_of_its_key(server: str) -> None:
    client = _client(server, KEY_L12_ONLY)
    batch = _run(client, [_line("denied", {"model": DEFAULT_MODEL, "input": "x"})])
    assert batch.status == "completed"
    assert batch.request_counts is not None and batch.request_counts.failed == 1
    (line,) = _lines_of(client, batch.error_file_id)
    assert line["response"]["status_code"] == 404
    assert line["response"]["body"]["error"]["code"] == "model_not_found"


def test_list_pagination(client_a: openai.OpenAI) -> None:
    ids = []
    for index in range(3):
        lines = [_line(f"l{index}", {"model": DEFAULT_MODEL, "input": "page"})]
        ids.append(
            client_a.batches.create(
                input_file_id=_upload(client_a, lines),
                endpoint="/v1/embeddings",
                completion_window="24h",
            ).id
        )
    first = client_a.batches.list(limit=2)
    assert [item.id for item in first.data] == ids[::-1][:2]
    assert first.has_more
    second = client_a.batches.list(limit=2, after=first.data[-1].id)
    assert second.data[0].id == ids[0]
    newest_first = [item.id for item in client_a.batches.list(limit=2)]  # follows `after`
    assert newest_first[:3] == ids[::-1]
    assert len(newest_first) == len(set(newest_first)) > 3
    files = client_a.files.list(purpose="batch", limit=2, order="asc")
    assert len(files.data) == 2 and files.has_more
    for batch_id in ids:
        finished = _wait(client_a, batch_id)
        assert finished.status == "completed" and finished.model == DEFAULT_MODEL


# -- the wire format against OpenAI's specification ---------------------------------------------


def test_responses_conform_to_the_specification(server: str) -> None:
    if not SPEC_PATH.is_file():
        pytest.skip(f"OpenAI's specification is not at {SPEC_PATH}")
    validator = _validators(yaml.safe_load(SPEC_PATH.read_text(encoding="utf-8")))

    def check(name: str, response: httpx.Response, status: int = 200) -> Any:
        assert response.status_code == status, response.text
        body = response.json()
        validator(name).validate(body)
        return body

    headers = {"Authorization": f"Bearer {KEY_A}"}
    with httpx.Client(base_url=server, headers=headers, timeout=30) as http:
        lines = [_line("s", {"model": DEFAULT_MODEL, "input": "spec"})]
        uploaded = check(
            "OpenAIFile",
            http.post(
                "/v1/files",
                files={"file": ("in.jsonl", _jsonl(lines))},
                data={"purpose": "batch"},
            ),
        )
        check("OpenAIFile", http.get(f"/v1/files/{uploaded['id']}"))
        check("ListFilesResponse", http.get("/v1/files"))
        sent = {
            "input_file_id": uploaded["id"],
            "endpoint": "/v1/embeddings",
            "completion_window": "24h",
        }
        validator("CreateBatchRequest").validate(sent)
        batch = check("Batch", http.post("/v1/batches", json=sent))
        deadline = time.monotonic() + 60
        while batch["status"] not in TERMINAL and time.monotonic() < deadline:
            batch = check("Batch", http.get(f"/v1/batches/{batch['id']}"))
        assert batch["status"] == "completed"
        check("ListBatchesResponse", http.get("/v1/batches", params={"limit": 2}))
        assert http.get(f"/v1/files/{batch['output_file_id']}/content").status_code == 200
        check("DeleteFileResponse", http.delete(f"/v1/files/{uploaded['id']}"))
        for response, status in (
            (http.get("/v1/files/file-nope"), 404),
            (http.get("/v1/batches/batch_nope"), 404),
            (http.post(f"/v1/batches/{batch['id']}/cancel"), 409),
            (http.post("/v1/batches", json={**sent, "endpoint": "/v1/nope"}), 400),
            (http.post("/v1/batches", json={"endpoint": "/v1/embeddings"}), 400),
            (http.post("/v1/files", data={"purpose": "batch"}), 400),
            (http.get("/v1/batches", params={"limit": 101}), 400),
        ):
            check("ErrorResponse", response, status)


# -- a restart mid-job --------------------------------------------------------------------------


@pytest.mark.slow
def test_killed_server_resumes_the_job_with_every_line_once(
    tmp_path: Path, reference: SentenceTransformer
) -> None:
    total = 600
    lines = [_line(f"r{i}", {"model": DEFAULT_MODEL, "input": f"line {i}"}) for i in range(total)]
    data_dir = tmp_path / "data"
    # Small batches and few lines in flight make a slow job, so the kill lands in its middle.
    slow = {"max_batch_size": 4, "batch_line_concurrency": 4}
    with serve_process(
        tmp_path, data_dir=str(data_dir), warmup="false", **{k: str(v) for k, v in slow.items()}
    ) as first:
        assert not data_dir.exists()  # created on first use of the Batch API only
        batch, counts = _start_until(_client(first.url, "unused"), lines, completed=20)
        first.process.send_signal(signal.SIGKILL)
        first.process.wait(30)
    assert counts is not None and 20 <= counts.completed < total, counts
    # The restart: a server in this process (torch is loaded already) on the same data dir.
    with live_server(test_settings(data_dir=data_dir, **slow)) as second:
        client = _client(second, "unused")
        resumed = client.batches.retrieve(batch.id)
        assert resumed.request_counts is not None
        assert resumed.request_counts.completed >= counts.completed  # nothing finished was lost
        done = _wait(client, batch.id, deadline_s=120)
        assert done.status == "completed", done
        assert done.request_counts is not None
        assert (done.request_counts.completed, done.request_counts.failed) == (total, 0)
        outputs = _lines_of(client, done.output_file_id)
    assert sorted(line["custom_id"] for line in outputs) == sorted(f"r{i}" for i in range(total))
    assert len({line["id"] for line in outputs}) == total
    sample = [0, counts.completed - 1, total - 1]
    got = np.stack(
        [_vector(outputs[i]["response"]["body"]["data"][0]) for i in sample]  # input order
    )
    want = reference.encode([f"line {i}" for i in sample], normalize_embeddings=True)
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_a_job_past_its_window_expires_with_partial_output(tmp_path: Path) -> None:
    """Stopped mid-job, then started again after its 24 h window (moved into the past in the
    store): the job ends ``expired``, keeping its finished lines and listing the others."""
    total = 2000
    lines = [_line(f"e{i}", {"model": DEFAULT_MODEL, "input": f"item {i}"}) for i in range(total)]
    settings = test_settings(data_dir=tmp_path, max_batch_size=4, batch_line_concurrency=4)
    with live_server(settings) as url:
        batch, _ = _start_until(_client(url, "unused"), lines, completed=10)
    # A graceful stop leaves the job in progress, for the next start to resume.
    with sqlite3.connect(tmp_path / "batches.sqlite3") as db:
        status = db.execute("SELECT status FROM batches WHERE id = ?", (batch.id,)).fetchone()
        assert status == ("in_progress",)
        db.execute("UPDATE batches SET expires_at = 1 WHERE id = ?", (batch.id,))
    with live_server(settings) as url:
        client = _client(url, "unused")
        expired = _wait(client, batch.id)
        assert expired.status == "expired" and expired.expired_at is not None
        assert expired.request_counts is not None
        done = expired.request_counts.completed
        assert 10 <= done < total
        outputs = _lines_of(client, expired.output_file_id)
        unrun = _lines_of(client, expired.error_file_id)
    assert len(outputs) == done
    assert {line["error"]["code"] for line in unrun} == {"batch_expired"}
    seen = sorted(line["custom_id"] for line in outputs + unrun)
    assert seen == sorted(line["custom_id"] for line in lines)
