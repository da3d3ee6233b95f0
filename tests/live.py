"""A real uvicorn server in a thread, on a free 127.0.0.1 port, for tests (as httpx's tests do)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx
import uvicorn
from fastapi import FastAPI

from emb_model_provider.core.config import Settings
from emb_model_provider.main import create_app


def test_settings(**overrides: object) -> Settings:
    """Settings that ignore the developer's environment and .env file."""
    values: dict[str, object] = {"host": "127.0.0.1", "port": 9000, "device": "cpu", **overrides}
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
    config = uvicorn.Config(app, log_config=None, log_level="warning", timeout_graceful_shutdown=5)
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


test_settings.__test__ = False  # type: ignore[attr-defined]  # a helper, not a test
