"""The documentation cannot drift from the server.

- Every ```bash block of docs/api.md is run with curl against a live server (base URL swapped in),
  and its answer is checked against the "Response, status NNN:" block under it: the status code,
  then for JSON the same field names at every level, the same JSON types and the same values for
  the fixed fields (``object``, ``type``, ``code``, ...); arrays are checked item by item against
  the items shown (the docs shorten vectors and lists). Headers shown for ``curl -i`` must be there.
- docs/configuration.md is what scripts/configuration_doc.py generates from ``Settings`` now.
- Every route the app serves is named in the docs.
"""

from __future__ import annotations

import http.server
import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks.rerankers import build_cross_encoder
from benchmarks.sparse_models import build_splade
from emb_model_provider.main import create_app
from emb_model_provider.security.keys import hash_key
from tests.live import live_server, test_settings
from tests.tiny_models import tiny_dinov3_vit
from tests.tiny_multimodal import tiny_clip

ROOT = Path(__file__).resolve().parents[1]
API_DOC = ROOT / "docs" / "api.md"
DOCS_BASE_URL = "http://127.0.0.1:9000"
DOCS_IMAGE_HOST = "https://images.example.com"
API_KEY = "sk-docs-api-key-0123"
ADMIN_KEY = "sk-docs-admin-key-4567"
BLOCK_DEADLINE_S = 60

_FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
_RESPONSE = re.compile(r"Response, status (\d{3}):")
_STATUS_MARK = "\n@@status "
#: Keys whose values are part of the contract: the docs show them as they are.
_FIXED_KEYS = frozenset({"object", "type", "code", "param", "model", "model_id", "status", "state"})
#: Objects keyed by model name: every value has the shape of the first one shown.
_NAME_KEYED = frozenset({"models"})
#: Objects the docs show in part: another feature owns them and may add fields (the embedding
#: cache's statistics in /api/status); the fields shown must still be there, with their types.
_PARTIAL = frozenset({"cache"})
#: Headers whose value the docs show as sent back (the others vary from run to run).
_FIXED_HEADERS = frozenset({"content-type", "x-request-id"})


@dataclass(frozen=True)
class Example:
    line: int
    command: str
    status: int
    kind: str
    expected: str


def api_examples(text: str) -> list[Example]:
    """The ```bash blocks of ``text``, each with the response block that follows it."""
    blocks = list(_FENCE.finditer(text))
    examples = []
    for position, block in enumerate(blocks):
        if block.group(1) != "bash":
            continue
        line = text.count("\n", 0, block.start()) + 1
        after = blocks[position + 1] if position + 1 < len(blocks) else None
        status = _RESPONSE.search(text, block.end(), after.start()) if after else None
        if after is None or status is None or after.group(1) not in ("json", "text", "http"):
            raise AssertionError(
                f"docs/api.md:{line}: a bash example needs 'Response, status NNN:' and a json, "
                "text or http block after it"
            )
        examples.append(
            Example(line, block.group(2), int(status.group(1)), after.group(1), after.group(2))
        )
    return examples


def shape_mismatch(
    actual: object, expected: object, where: str = "$", *, partial: bool = False
) -> str | None:
    """Why ``actual`` does not have the shape of ``expected``, or None when it does."""
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return f"{where}: expected an object, got {actual!r:.80}"
        if not set(expected) <= set(actual) or (not partial and set(actual) != set(expected)):
            return (
                f"{where}: fields differ: missing {sorted(set(expected) - set(actual))}, "
                f"undocumented {sorted(set(actual) - set(expected))}"
            )
        for key, value in expected.items():
            if key in _NAME_KEYED and isinstance(value, dict) and value:
                template = next(iter(value.values()))
                for name, item in actual[key].items():
                    problem = shape_mismatch(item, template, f"{where}.{key}.{name}")
                    if problem:
                        return problem
                continue
            problem = shape_mismatch(actual[key], value, f"{where}.{key}", partial=key in _PARTIAL)
            if problem:
                return problem
            if key in _FIXED_KEYS and not isinstance(value, dict | list) and actual[key] != value:
                return f"{where}.{key}: expected {value!r}, got {actual[key]!r}"
        return None
    if isinstance(expected, list):
        if not isinstance(actual, list):
            return f"{where}: expected an array, got {actual!r:.80}"
        for index, item in enumerate(actual):
            if expected and all(shape_mismatch(item, shown) for shown in expected):
                return f"{where}[{index}]: {shape_mismatch(item, expected[0])}"
        return None
    if expected is None or isinstance(expected, bool | str):
        same = actual is None if expected is None else type(actual) is type(expected)
        return None if same else f"{where}: expected {expected!r}, got {actual!r:.80}"
    if isinstance(expected, int | float):
        number = isinstance(actual, int | float) and not isinstance(actual, bool)
        return None if number else f"{where}: expected a number, got {actual!r:.80}"
    return f"{where}: cannot compare with {expected!r}"


def _split_http(output: str) -> tuple[str, dict[str, str], str]:
    head, _, body = output.replace("\r\n", "\n").partition("\n\n")
    status_line, *lines = head.splitlines()
    headers = {}
    for header in lines:
        name, _, value = header.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status_line, headers, body


def check_answer(example: Example, output: str) -> None:
    where = f"docs/api.md:{example.line}"
    body, marks = output.rsplit(_STATUS_MARK, 1)[0], output.count(_STATUS_MARK)
    assert marks == 1, f"{where}: one curl call per example, ran {marks}"
    status = int(output.rsplit(_STATUS_MARK, 1)[1].strip())
    assert status == example.status, f"{where}: status {status}, docs say {example.status}: {body}"
    expected_body = example.expected
    if example.kind == "http":
        expected_status, expected_headers, expected_body = _split_http(example.expected)
        status_line, headers, body = _split_http(body)
        assert status_line.split()[1] == expected_status.split()[1], where
        for name, value in expected_headers.items():
            assert name in headers, f"{where}: no {name} header in {sorted(headers)}"
            if name in _FIXED_HEADERS:
                assert headers[name] == value, f"{where}: {name}: {headers[name]!r} != {value!r}"
    if example.kind == "text":
        lines = body.splitlines()
        for shown in example.expected.splitlines():
            if shown.startswith("#"):
                assert shown in lines, f"{where}: {shown!r} not in the answer"
            elif shown.strip() and shown.strip() != "...":
                metric = re.split(r"[{ ]", shown, maxsplit=1)[0]
                assert any(line.startswith(metric) for line in lines), f"{where}: no {metric}"
        return
    problem = shape_mismatch(json.loads(body), json.loads(expected_body))
    assert problem is None, f"{where}: {problem}\nanswer: {body[:2000]}"


def _image_bytes(seed: int, size: tuple[int, int], fmt: str) -> bytes:
    width, height = size
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def images() -> dict[str, bytes]:
    return {
        "cat.png": _image_bytes(1, (60, 40), "PNG"),
        "dog.jpg": _image_bytes(2, (30, 50), "JPEG"),
    }


@pytest.fixture(scope="module")
def image_host(images: dict[str, bytes]) -> Iterator[str]:
    """Stands in for https://images.example.com (the outside network) on 127.0.0.1."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = images.get(self.path.lstrip("/"))
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/png" if ".png" in self.path else "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@pytest.fixture(scope="module")
def docs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The server the docs describe: keys on, rate limits on, an image model `dinov3-vits16`
    (a tiny random DINOv3 standing in for the gated one), a reranker, a SPLADE model."""
    root = tmp_path_factory.mktemp("docs-models")
    vit = tiny_dinov3_vit(root / "vit")
    clip = tiny_clip(root / "clip")
    reranker = build_cross_encoder("bert", root / "reranker")
    splade = build_splade(root / "splade", prompts={"query": "", "document": ""})
    models = root / "models.yaml"
    models.write_text(
        "models:\n"
        "  - name: dinov3-vits16\n"
        f"    source: {vit}\n"
        "    modality: image\n"
        "    dimensions: 32\n"
        "    max_input_tokens: 201\n"
        "    owned_by: facebook\n"
        # A tiny random CLIP standing in for the built-in entry of the same name (on the hub).
        "  - name: clip-vit-base-patch32\n"
        f"    source: {clip}\n"
        "    modality: multimodal\n"
        "    dimensions: 16\n"
        "    max_input_tokens: 77\n"
        "    owned_by: openai\n"
        # A tiny random cross-encoder standing in for cross-encoder/ms-marco-MiniLM-L6-v2.
        "  - name: ms-marco-MiniLM-L6-v2\n"
        f"    source: {reranker}\n"
        # A tiny random SPLADE standing in for naver/splade-v3.
        "  - name: splade-v3\n"
        f"    source: {splade}\n",
        encoding="utf-8",
    )
    settings = test_settings(
        models_file=models,
        url_allowlist="127.0.0.1/32",
        api_key_hashes=hash_key(API_KEY),
        admin_key_hashes=hash_key(ADMIN_KEY),
        rate_limit_rpm=600,
        rate_limit_tpm=1_000_000,
        cache="memory",  # the shipped default, which the docs show (test_settings turns it off)
    )
    with live_server(settings) as url:
        yield url


def test_every_api_example_answers_as_documented(
    docs_server: str, image_host: str, images: dict[str, bytes], tmp_path: Path
) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.fail("curl is not installed: the docs examples need it")
    for name, data in images.items():
        (tmp_path / name).write_bytes(data)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "LC_ALL": "C",
        "EMB_API_KEY": API_KEY,
        "EMB_ADMIN_KEY": ADMIN_KEY,
    }
    # One status line per curl call, after its output; the docs' commands stay as users type them.
    prelude = "curl() { command curl -sS --max-time 30 -w '\\n@@status %{http_code}\\n' \"$@\"; }\n"
    examples = api_examples(API_DOC.read_text(encoding="utf-8"))
    assert len(examples) >= 20
    for example in examples:
        command = example.command.replace(DOCS_BASE_URL, docs_server)
        command = command.replace(DOCS_IMAGE_HOST, image_host)
        assert docs_server in command, f"docs/api.md:{example.line}: not aimed at the server"
        result = subprocess.run(
            ["bash", "-c", "set -euo pipefail\n" + prelude + command],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=BLOCK_DEADLINE_S,
            check=False,
        )
        assert result.returncode == 0, f"docs/api.md:{example.line}: {result.stderr}"
        check_answer(example, result.stdout)


def test_shape_check_catches_drift() -> None:
    """The comparison behind the examples test fails on what drift looks like."""
    shown = {"object": "list", "data": [{"index": 0, "embedding": [0.1, 0.2]}], "model": "m"}
    assert shape_mismatch({"object": "list", "data": [], "model": "m"}, shown) is None
    same = {"object": "list", "data": [{"index": 3, "embedding": [1, 2, 3]}], "model": "m"}
    assert shape_mismatch(same, shown) is None
    assert shape_mismatch({**same, "extra": 1}, shown) is not None  # undocumented field
    assert shape_mismatch({"object": "list", "data": []}, shown) is not None  # field gone
    assert shape_mismatch({**same, "object": "dict"}, shown) is not None  # fixed value changed
    renamed = {**same, "data": [{"idx": 0, "embedding": [0.1]}]}
    assert shape_mismatch(renamed, shown) is not None
    assert shape_mismatch({**same, "data": [{"index": "0", "embedding": []}]}, shown) is not None


def test_configuration_doc_is_current() -> None:
    script = ROOT / "scripts" / "configuration_doc.py"
    result = subprocess.run(
        [sys.executable, str(script), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_configuration_check_fails_on_a_stale_file(tmp_path: Path) -> None:
    stale = tmp_path / "configuration.md"
    current = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    stale.write_text(current.replace("EMB_PROVIDER_PORT", "EMB_PROVIDER_PORTS"), encoding="utf-8")
    script = ROOT / "scripts" / "configuration_doc.py"
    result = subprocess.run(
        [sys.executable, str(script), "--check", "--path", str(stale)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 1
    assert "+### EMB_PROVIDER_PORT\n" in result.stderr


def _documented(path: str, text: str) -> bool:
    pattern = re.escape(path)
    pattern = re.sub(r"\\\{[^}]*\\\}", r"\\{[^}]+\\}", pattern)  # /{model:path} as /{model}
    return re.search(rf"(?<![\w/]){pattern}(?![\w/])", text) is not None


def test_every_route_is_documented() -> None:
    """Every path of the OpenAPI schema (what the app serves) is named in docs/*.md."""
    paths = list(create_app(test_settings()).openapi()["paths"])
    assert {"/v1/embeddings", "/v1/models/{model}", "/api/models/{model}/load"} <= set(paths)
    text = "\n".join(path.read_text(encoding="utf-8") for path in sorted(ROOT.glob("docs/*.md")))
    undocumented = [path for path in paths if path != "/" and not _documented(path, text)]
    assert not undocumented, f"routes missing from docs/*.md: {undocumented}"
