"""API keys, admin keys and the client allowlist, through live servers and the OpenAI SDK.

Rate limits are in ``test_rate_limits.py``. Every server here is module-scoped: each loads the
bundled model once.
"""

from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from emb_model_provider.api.auth import AdminDep, install_access_control
from emb_model_provider.api.exceptions import install_error_handlers
from emb_model_provider.core.errors import ConfigError
from emb_model_provider.main import create_app
from emb_model_provider.security.keys import hash_key
from tests.conftest import DEFAULT_MODEL
from tests.live import live_server, test_settings

SCRIPT = Path(sys.executable).parent / "emb-model-provider"

FULL_KEY = "sk-test-full-access-0123456789"
LIMITED_KEY = "sk-test-only-minilm-l6-0123456789"
OTHER_MODEL_KEY = "sk-test-only-minilm-l12-0123456789"
ADMIN_KEY = "sk-test-admin-0123456789"


def _hash_key_cli(*args: str) -> list[str]:
    """``emb-model-provider hash-key`` as users run it: its stdout lines."""
    result = subprocess.run(
        [str(SCRIPT), "hash-key", *args], capture_output=True, text=True, check=True, timeout=60
    )
    return result.stdout.splitlines()


@pytest.fixture(scope="module")
def generated_key() -> str:
    key, digest = _hash_key_cli()
    return f"{key}\n{digest}"


@pytest.fixture(scope="module")
def keyed_url(tmp_path_factory: pytest.TempPathFactory, generated_key: str) -> Iterator[str]:
    keys_file = tmp_path_factory.mktemp("keys") / "keys.yaml"
    keys_file.write_text(
        "keys:\n"
        f"  - hash: {hash_key(LIMITED_KEY)}\n"
        "    name: l6-only\n"
        # An alias: the key may use the model under every one of its names.
        "    models: [sentence-transformers/all-MiniLM-L6-v2]\n"
        f"  - hash: {hash_key(OTHER_MODEL_KEY)}\n"
        "    models: [all-MiniLM-L12-v2]\n",
        encoding="utf-8",
    )
    settings = test_settings(
        api_key_hashes=f"{hash_key(FULL_KEY)}, {generated_key.splitlines()[1]}",
        api_keys_file=keys_file,
        admin_key_hashes=hash_key(ADMIN_KEY),
    )
    with live_server(settings) as url:
        yield url


def _client(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


def test_no_key_is_refused_as_openai_does(keyed_url: str) -> None:
    response = httpx.post(
        f"{keyed_url}/v1/embeddings", json={"model": DEFAULT_MODEL, "input": "hi"}, timeout=30
    )
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "invalid_api_key"
    assert "Authorization: Bearer" in error["message"]


def test_wrong_key_is_authentication_error(keyed_url: str) -> None:
    with pytest.raises(openai.AuthenticationError) as caught:
        _client(keyed_url, "sk-not-a-configured-key-42").embeddings.create(
            model=DEFAULT_MODEL, input="hi"
        )
    assert caught.value.status_code == 401
    assert caught.value.code == "invalid_api_key"
    assert "Incorrect API key provided" in caught.value.message
    assert "sk-not-a-configured-key-42" not in caught.value.message  # echoed masked only


@pytest.mark.parametrize("authorization", [f"Basic {FULL_KEY}", "Bearer", FULL_KEY])
def test_malformed_authorization_is_refused(keyed_url: str, authorization: str) -> None:
    response = httpx.get(
        f"{keyed_url}/v1/models", headers={"Authorization": authorization}, timeout=30
    )
    assert response.status_code == 401


def test_right_key_is_served(keyed_url: str) -> None:
    reply = _client(keyed_url, FULL_KEY).embeddings.create(model=DEFAULT_MODEL, input="hi")
    assert len(reply.data[0].embedding) == 384


def test_key_made_by_hash_key_is_served(keyed_url: str, generated_key: str) -> None:
    key, digest = generated_key.splitlines()
    assert key.startswith("sk-") and len(key) > 40
    assert digest == "sha256:" + hashlib.sha256(key.encode()).hexdigest()
    reply = _client(keyed_url, key).embeddings.create(model=DEFAULT_MODEL, input="hi")
    assert reply.model == DEFAULT_MODEL


def test_hash_key_of_a_given_key_and_from_stdin() -> None:
    expected = "sha256:" + hashlib.sha256(b"sk-given").hexdigest()
    assert _hash_key_cli("sk-given") == [expected]
    piped = subprocess.run(
        [str(SCRIPT), "hash-key", "-"],
        input="sk-given\n",
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert piped.stdout.splitlines() == [expected]


def test_admin_key_is_also_an_api_key(keyed_url: str) -> None:
    reply = _client(keyed_url, ADMIN_KEY).embeddings.create(model=DEFAULT_MODEL, input="hi")
    assert reply.model == DEFAULT_MODEL


@pytest.mark.parametrize("path", ["/health", "/ready", "/"])
def test_public_paths_need_no_key(keyed_url: str, path: str) -> None:
    assert httpx.get(f"{keyed_url}{path}", timeout=30).status_code == 200


def test_key_file_key_with_its_model_alias_is_served(keyed_url: str) -> None:
    reply = _client(keyed_url, LIMITED_KEY).embeddings.create(model=DEFAULT_MODEL, input="hi")
    assert reply.model == DEFAULT_MODEL


def test_model_not_allowed_for_the_key_is_not_found(keyed_url: str) -> None:
    client = _client(keyed_url, OTHER_MODEL_KEY)
    with pytest.raises(openai.NotFoundError) as caught:
        client.embeddings.create(model=DEFAULT_MODEL, input="hi")
    assert caught.value.code == "model_not_found"
    assert caught.value.param == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve(DEFAULT_MODEL)
    assert [model.id for model in client.models.list()] == ["all-MiniLM-L12-v2"]
    # A key limited to some models still gets the same 404 for a model that does not exist.
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="no-such-model", input="hi")


def test_unrestricted_key_lists_every_model(keyed_url: str) -> None:
    names = [model.id for model in _client(keyed_url, FULL_KEY).models.list()]
    assert DEFAULT_MODEL in names and "all-MiniLM-L12-v2" in names


# -- admin dependency: a throwaway app holds only the dependency (no model, in-process) --


def _admin_app(**settings: object) -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)
    install_access_control(app, test_settings(**settings))

    @app.get("/admin/whoami")
    async def whoami(admin: AdminDep) -> dict[str, str]:
        return {"name": admin.name}

    return app


def test_admin_routes_are_off_until_an_admin_key_is_set() -> None:
    with TestClient(_admin_app()) as client:
        response = client.get("/admin/whoami", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert response.status_code == 403
    error = response.json()["error"]
    assert "EMB_PROVIDER_ADMIN_KEY_HASHES" in error["message"]
    assert error["code"] == "admin_disabled"


def test_admin_routes_need_an_admin_key() -> None:
    app = _admin_app(admin_key_hashes=hash_key(ADMIN_KEY), api_key_hashes=hash_key(FULL_KEY))
    with TestClient(app) as client:
        assert client.get("/admin/whoami").status_code == 401
        ordinary = client.get("/admin/whoami", headers={"Authorization": f"Bearer {FULL_KEY}"})
        assert ordinary.status_code == 401
        assert ordinary.json()["error"]["code"] == "invalid_api_key"
        admin = client.get("/admin/whoami", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        assert admin.status_code == 200
        assert admin.json() == {"name": hash_key(ADMIN_KEY)[: len("sha256:") + 8]}


def test_open_server_says_so_once_at_start_up(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO), TestClient(_admin_app()):
        pass
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "no API key configured" in warnings[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.INFO), TestClient(_admin_app(api_key_hashes=hash_key("k"))):
        pass
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# -- settings that cannot work stop the start with a ConfigError naming them --


@pytest.mark.parametrize(
    ("field", "value", "setting"),
    [
        ("api_key_hashes", "sk-a-clear-text-key", "EMB_PROVIDER_API_KEY_HASHES"),
        ("api_key_hashes", "sha256:abc", "EMB_PROVIDER_API_KEY_HASHES"),
        ("admin_key_hashes", "md5:00", "EMB_PROVIDER_ADMIN_KEY_HASHES"),
        ("client_allowlist", "10.0.0.0/33", "EMB_PROVIDER_CLIENT_ALLOWLIST"),
        ("trusted_proxies", "proxy.local", "EMB_PROVIDER_TRUSTED_PROXIES"),
    ],
)
def test_bad_access_settings_are_config_errors(field: str, value: str, setting: str) -> None:
    with pytest.raises(ConfigError) as caught:
        create_app(test_settings(**{field: value}))
    assert caught.value.setting == setting
    assert "sk-a-clear-text-key" not in str(caught.value)  # a pasted key is not echoed whole


@pytest.mark.parametrize(
    "text",
    [
        "- sha256:00\n",
        "keys:\n  - hash: sha256:zz\n",
        "keys:\n  - hash: {h}\n    colour: red\n",
        "keys:\n  - hash: {h}\n    models: all\n",
        "keys:\n  - {h}\n  - {h}\n",
    ],
)
def test_bad_keys_file_is_a_config_error(tmp_path: Path, text: str) -> None:
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(text.format(h=hash_key("k")), encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        create_app(test_settings(api_keys_file=keys_file))
    assert caught.value.setting == "EMB_PROVIDER_API_KEYS_FILE"


# -- client allowlist --


@pytest.fixture(scope="module")
def behind_proxy_url() -> Iterator[str]:
    """Clients from 10.1.0.0/16 only, behind a trusted proxy on 127.0.0.1 (the tests)."""
    settings = test_settings(client_allowlist="10.1.0.0/16", trusted_proxies="127.0.0.1/32")
    with live_server(settings) as url:
        yield url


@pytest.fixture(scope="module")
def direct_url() -> Iterator[str]:
    """Clients from 10.0.0.0/8 only, no trusted proxy: X-Forwarded-For means nothing."""
    with live_server(test_settings(client_allowlist="10.0.0.0/8")) as url:
        yield url


def _forwarded_client(url: str, forwarded_for: str | None) -> openai.OpenAI:
    headers = {"X-Forwarded-For": forwarded_for} if forwarded_for is not None else None
    return openai.OpenAI(
        base_url=f"{url}/v1", api_key="unused", max_retries=0, default_headers=headers
    )


@pytest.mark.parametrize(
    "forwarded_for",
    [
        "10.1.2.3",
        "8.8.8.8, 10.1.2.3",  # the left-most entry is the client's claim; the proxy wrote 10.1.2.3
        "10.1.2.3, 127.0.0.1",  # a chain of trusted proxies is skipped from the right
    ],
)
def test_allowed_client_behind_trusted_proxy(behind_proxy_url: str, forwarded_for: str) -> None:
    reply = _forwarded_client(behind_proxy_url, forwarded_for).embeddings.create(
        model=DEFAULT_MODEL, input="hi"
    )
    assert reply.model == DEFAULT_MODEL


@pytest.mark.parametrize(
    "forwarded_for",
    [
        None,  # the proxy itself is not an allowed client
        "10.1.2.3, 8.8.8.8",  # spoofed allowed address on the left, the real one on the right
        "not-an-address",
        "127.0.0.1",  # all hops trusted: the left-most, the proxy, is the client
    ],
)
def test_refused_client_behind_trusted_proxy(
    behind_proxy_url: str, forwarded_for: str | None
) -> None:
    with pytest.raises(openai.PermissionDeniedError) as caught:
        _forwarded_client(behind_proxy_url, forwarded_for).embeddings.create(
            model=DEFAULT_MODEL, input="hi"
        )
    assert caught.value.status_code == 403
    assert caught.value.code == "client_not_allowed"
    body = caught.value.response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"}


def test_forwarded_for_from_an_untrusted_peer_is_ignored(direct_url: str) -> None:
    with pytest.raises(openai.PermissionDeniedError):
        _forwarded_client(direct_url, "10.1.2.3").embeddings.create(model=DEFAULT_MODEL, input="hi")
    # Probes still reach the public paths.
    assert httpx.get(f"{direct_url}/health", timeout=30).status_code == 200
    assert httpx.get(f"{direct_url}/ready", timeout=30).status_code == 200
