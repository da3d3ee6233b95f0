"""A real uvicorn server in a thread, on a free 127.0.0.1 port, for tests (as httpx's tests do)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn
from fastapi import FastAPI

from emb_model_provider.cli import uvicorn_options
from emb_model_provider.core.config import ENV_PREFIX, Settings
from emb_model_provider.main import create_app


def test_settings(**overrides: object) -> Settings:
    """Settings that ignore the developer's environment and .env file."""
    values: dict[str, object] = {"host": "127.0.0.1", "port": 9000, "device": "cpu", **overrides}
    # The Batch API's store is created on first use only; never the developer's ./data.
    values.setdefault("data_dir", Path(tempfile.gettempdir()) / f"emb-provider-{uuid.uuid4().hex}")
    # The result cache answers repeated inputs without the model, and the batching, load and
    # timeout tests send the same text many times to make work: they get no cache unless they
    # ask for one (tests/test_cache.py does).
    values.setdefault("cache", "off")
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@contextmanager
def live_server(
    settings: Settings, *, wait_ready: bool = True, deadline_s: float = 180
) -> Iterator[str]:
    with live_app(settings, wait_ready=wait_ready, deadline_s=deadline_s) as (url, _):
        yield url


@contextmanager
def live_app(
    settings: Settings, *, wait_ready: bool = True, deadline_s: float = 180
) -> Iterator[tuple[str, FastAPI]]:
    """The server's URL and its app (whose state tests may read, never replace)."""
    app = create_app(settings)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    options = {**uvicorn_options(settings), "log_level": "warning", "access_log": False}
    config = uvicorn.Config(app, **{**options, "timeout_graceful_shutdown": 5})
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ok(
            f"{base_url}{'/ready' if wait_ready else '/health'}",
            deadline_s=deadline_s,
            alive=lambda: None if thread.is_alive() else "its thread ended",
        )
        yield base_url, app
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def wait_until_ok(
    url: str, *, deadline_s: float, alive: Callable[[], str | None], interval_s: float = 0.05
) -> None:
    """Poll ``url`` until it answers 200, under a deadline. ``alive`` returns why the server can
    no longer answer (it stopped), or None while it runs."""
    deadline = time.monotonic() + deadline_s
    last = "no answer"
    with httpx.Client(timeout=5) as client:
        while time.monotonic() < deadline:
            gone = alive()
            if gone is not None:
                raise RuntimeError(f"the server stopped during start-up: {gone}")
            try:
                response = client.get(url)
                if response.status_code == 200:
                    return
                last = response.text
            except httpx.TransportError as exc:
                last = repr(exc)
            time.sleep(interval_s)  # polling interval while waiting on a deadline, not a fixed wait
    raise TimeoutError(f"{url} not ready after {deadline_s} s: {last}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class ServeProcess:
    """``emb-model-provider serve`` running in its own process (for signals and its RSS)."""

    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def rss_bytes(self) -> int:
        status = Path(f"/proc/{self.process.pid}/status").read_text(encoding="ascii")
        line = next(line for line in status.splitlines() if line.startswith("VmRSS:"))
        return int(line.split()[1]) * 1024


@contextmanager
def serve_process(
    folder: Path, *flags: str, deadline_s: float = 180, **settings: str
) -> Iterator[ServeProcess]:
    """Start the console script on a free 127.0.0.1 port with ``EMB_PROVIDER_*`` = ``settings``
    (the caller's own cleared), in ``folder``, and wait for /ready; kill it on the way out."""
    script = Path(sys.executable).parent / "emb-model-provider"
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith(ENV_PREFIX)}
    env["HF_HUB_OFFLINE"] = "1"
    env[f"{ENV_PREFIX}CACHE"] = "off"  # as in test_settings: load tests repeat their texts
    env.update({f"{ENV_PREFIX}{key.upper()}": value for key, value in settings.items()})
    log = folder / "serve.log"
    command = [str(script), "serve", "--port", str(port), "--device", "cpu", *flags]
    with log.open("wb") as stderr:
        process = subprocess.Popen(
            command, cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=stderr
        )
        served = ServeProcess(process, f"http://127.0.0.1:{port}", log)
        try:

            def exited() -> str | None:
                if process.poll() is None:
                    return None
                return f"exit {process.returncode}: {log.read_text(errors='replace')}"

            wait_until_ok(f"{served.url}/ready", deadline_s=deadline_s, alive=exited)
            yield served
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(60)


test_settings.__test__ = False  # type: ignore[attr-defined]  # a helper, not a test
