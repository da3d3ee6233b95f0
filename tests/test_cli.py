"""``emb-model-provider serve`` as users run it: the installed console script in a subprocess,
with its own environment (``EMB_PROVIDER_*`` cleared, then set per case) and a fresh working
directory, so that neither the developer's settings nor a ``.env`` file leak in.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import torch
from sentence_transformers import SentenceTransformer

from emb_model_provider.core.config import ENV_PREFIX
from tests.conftest import BUNDLED_DIR, DEFAULT_MODEL
from tests.live import wait_until_ok

SCRIPT = Path(sys.executable).parent / "emb-model-provider"
#: A process that fails a setting must do so before it loads anything.
FAIL_DEADLINE_S = 120
START_DEADLINE_S = 180
STOP_DEADLINE_S = 60


def _env(**settings: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(ENV_PREFIX)}
    # Nothing here needs the hub (the default model ships in a package); never reach it.
    env["HF_HUB_OFFLINE"] = "1"
    env.update({f"{ENV_PREFIX}{key.upper()}": value for key, value in settings.items()})
    return env


def _command(*args: str) -> list[str]:
    assert SCRIPT.is_file(), f"the console script is not installed at {SCRIPT}"
    return [str(SCRIPT), "serve", *args]


def _serve_fails(cwd: Path, env: dict[str, str], *args: str) -> str:
    """Run ``serve`` that must refuse its settings; the one line it wrote on stderr."""
    result = subprocess.run(
        _command(*args),
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=FAIL_DEADLINE_S,
        check=False,
    )
    assert result.returncode != 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert result.stdout == ""
    return lines[0]


#: case -> (environment, flags, the setting the line names, another fragment it holds)
INVALID: dict[str, tuple[dict[str, str], list[str], str, str]] = {
    "port not a number": ({"port": "abc"}, [], "EMB_PROVIDER_PORT", "'abc'"),
    "port out of range flag": ({}, ["--port", "70000"], "EMB_PROVIDER_PORT", "65535"),
    "unknown device": ({"device": "tpu"}, [], "EMB_PROVIDER_DEVICE", "'tpu'"),
    "half precision on the CPU": (
        {"device": "cpu", "dtype": "float16"},
        [],
        "EMB_PROVIDER_DTYPE",
        "float16",
    ),
    "missing models file": (
        {"models_file": "/nonexistent"},
        [],
        "EMB_PROVIDER_MODELS_FILE",
        "/nonexistent",
    ),
    "unknown default model flag": (
        {},
        ["--default-model", "nope"],
        "EMB_PROVIDER_DEFAULT_MODEL",
        "'nope'",
    ),
    "unknown log level": ({"log_level": "loud"}, [], "EMB_PROVIDER_LOG_LEVEL", "'loud'"),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_setting_stops_with_one_line(tmp_path: Path, case: str) -> None:
    settings, flags, setting, fragment = INVALID[case]
    line = _serve_fails(tmp_path, _env(**settings), *flags)
    assert line.startswith(f"emb-model-provider: invalid setting {setting}"), line
    assert fragment in line, line


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
@pytest.mark.parametrize(
    ("settings", "setting", "fragment"),
    [
        ({"device": "cuda"}, "EMB_PROVIDER_DEVICE", "CUDA is not available"),
        # device=auto picks the CPU here (and logs that it did: not before the error line).
        ({"dtype": "float16"}, "EMB_PROVIDER_DTYPE", "not supported on the CPU"),
    ],
    ids=["cuda", "float16 on auto"],
)
def test_settings_this_cpu_only_machine_cannot_honour_stop_with_one_line(
    tmp_path: Path, settings: dict[str, str], setting: str, fragment: str
) -> None:
    line = _serve_fails(tmp_path, _env(**settings))
    assert line.startswith(f"emb-model-provider: invalid setting {setting}"), line
    assert fragment in line


def test_invalid_models_file_stops_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "models.yaml"
    path.write_text("models:\n  - name: x\n    sourse: /tmp\n", encoding="utf-8")
    line = _serve_fails(tmp_path, _env(models_file=str(path)))
    assert line.startswith("emb-model-provider: invalid setting EMB_PROVIDER_MODELS_FILE"), line
    assert "sourse" in line


# Which source wins is told by which setting the error names: pydantic reports the fields in
# their order (port before log_level), so a bad port that won would be named instead.


def test_dotenv_in_the_working_directory_is_read(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("EMB_PROVIDER_LOG_LEVEL=loud\n", encoding="utf-8")
    line = _serve_fails(tmp_path, _env())
    assert "EMB_PROVIDER_LOG_LEVEL='loud'" in line


def test_environment_beats_dotenv(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(
        "EMB_PROVIDER_PORT=abc\nEMB_PROVIDER_LOG_LEVEL=loud\n", encoding="utf-8"
    )
    line = _serve_fails(tmp_path, _env(port="9001"))
    assert "EMB_PROVIDER_LOG_LEVEL='loud'" in line


def test_flags_beat_environment_and_dotenv(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("EMB_PROVIDER_PORT=abc\n", encoding="utf-8")
    line = _serve_fails(tmp_path, _env(port="xyz", log_level="loud"), "--port", "9001")
    assert "EMB_PROVIDER_LOG_LEVEL='loud'" in line
    env = _env(log_level="loud", device="tpu")
    line = _serve_fails(tmp_path, env, "--port", "9001", "--log-level", "debug")
    assert "EMB_PROVIDER_DEVICE='tpu'" in line


# -- one real start -------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def started(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[subprocess.Popen[bytes], str, float, Path]]:
    """``serve`` whose environment says a port and a default model that cannot work, overridden
    by flags; its ``.env`` adds a models file. Yields the process, its URL, the seconds from the
    start to /ready, and its stderr log."""
    cwd = tmp_path_factory.mktemp("serve")
    (cwd / "models.yaml").write_text(
        f"models:\n  - name: dotenv-minilm\n    source: {BUNDLED_DIR}\n", encoding="utf-8"
    )
    (cwd / ".env").write_text("EMB_PROVIDER_MODELS_FILE=models.yaml\n", encoding="utf-8")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = cwd / "stderr.log"
    env = _env(port="abc", default_model="nope")
    flags = ["--port", str(port), "--default-model", DEFAULT_MODEL, "--device", "cpu"]
    with log.open("wb") as stderr:
        begun = time.monotonic()
        process = subprocess.Popen(
            _command(*flags), cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=stderr
        )
        try:
            _wait_ready(process, url, log)
            yield process, url, time.monotonic() - begun, log
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(STOP_DEADLINE_S)


def _wait_ready(process: subprocess.Popen[bytes], url: str, log: Path) -> None:
    def exited() -> str | None:
        if process.poll() is None:
            return None
        return f"serve exited with {process.returncode}: {log.read_text()}"

    wait_until_ok(f"{url}/ready", deadline_s=START_DEADLINE_S, alive=exited, interval_s=0.1)


def test_serve_starts_answers_and_stops_cleanly_on_sigterm(
    started: tuple[subprocess.Popen[bytes], str, float, Path],
    reference: SentenceTransformer,
    record_property: Callable[[str, object], None],
) -> None:
    process, url, start_s, log = started
    record_property("cli_start_to_ready_s", round(start_s, 2))

    ready = httpx.get(f"{url}/ready", timeout=10).json()
    assert ready["default_model"] == DEFAULT_MODEL  # the flag, not the environment's "nope"
    listed = {card["id"] for card in httpx.get(f"{url}/v1/models", timeout=10).json()["data"]}
    assert "dotenv-minilm" in listed  # the models file that .env named

    text = "The console script serves the OpenAI API."
    with openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0) as sdk:
        response = sdk.embeddings.create(model=DEFAULT_MODEL, input=text)
    ours = np.asarray(response.data[0].embedding, dtype=np.float32)
    ref = reference.encode([text], normalize_embeddings=True, convert_to_numpy=True)[0]
    assert float(ours @ ref / (np.linalg.norm(ours) * np.linalg.norm(ref))) >= 0.99999

    process.send_signal(signal.SIGTERM)
    returncode = process.wait(STOP_DEADLINE_S)
    output = log.read_text(encoding="utf-8")
    assert returncode == 0, output
    assert "Traceback" not in output, output
    assert "Application shutdown complete" in output, output
