"""Rate limits per API key and per client address: OpenAI's 429 and x-ratelimit headers.

The live servers use a window of 2 s instead of a minute (``rate_limit_window_s``), so that a
refused caller recovers within a test; recovery is polled under a deadline.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator

import httpx
import openai
import pytest

from emb_model_provider.security.keys import hash_key
from emb_model_provider.security.rate_limits import RateLimiter, format_duration
from tests.conftest import DEFAULT_MODEL
from tests.live import live_server, test_settings

WINDOW_S = 2.0
RPM = 3
TPM = 1000
KEYS = [f"sk-rate-test-{n}-0123456789" for n in range(4)]
RECOVERY_DEADLINE_S = 30
_DURATION = re.compile(r"^(\d+h)?(\d+m)?(\d+(\.\d+)?s|\d+ms)$")
_LIMIT_HEADERS = ("limit", "remaining", "reset")


@pytest.fixture(scope="module")
def keyed_url() -> Iterator[str]:
    settings = test_settings(
        api_key_hashes=",".join(hash_key(key) for key in KEYS),
        rate_limit_rpm=RPM,
        rate_limit_tpm=TPM,
        rate_limit_window_s=WINDOW_S,
    )
    with live_server(settings) as url:
        yield url


@pytest.fixture(scope="module")
def open_url() -> Iterator[str]:
    """No keys: one budget per client address, read behind a trusted proxy (the tests)."""
    settings = test_settings(
        rate_limit_rpm=2, rate_limit_window_s=WINDOW_S, trusted_proxies="127.0.0.1"
    )
    with live_server(settings) as url:
        yield url


def _client(url: str, key: str, **headers: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{url}/v1", api_key=key, max_retries=0, default_headers=headers or None
    )


def _until_served(call: Callable[[], object]) -> object:
    """Call until it is not rate limited, under a deadline; the last refusal if it never is."""
    deadline = time.monotonic() + RECOVERY_DEADLINE_S
    while True:
        try:
            return call()
        except openai.RateLimitError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.05)  # polling interval under a deadline, not a fixed wait


def _assert_limit_headers(headers: httpx.Headers, kinds: tuple[str, ...]) -> None:
    for kind in kinds:
        for name in _LIMIT_HEADERS:
            assert f"x-ratelimit-{name}-{kind}" in headers, (name, kind, headers)
        assert _DURATION.match(headers[f"x-ratelimit-reset-{kind}"])


def test_every_answer_carries_the_limits(keyed_url: str) -> None:
    raw = _client(keyed_url, KEYS[0]).embeddings.with_raw_response.create(
        model=DEFAULT_MODEL, input="hello there"
    )
    usage = raw.parse().usage.prompt_tokens
    _assert_limit_headers(raw.headers, ("requests", "tokens"))
    assert raw.headers["x-ratelimit-limit-requests"] == str(RPM)
    assert raw.headers["x-ratelimit-limit-tokens"] == str(TPM)
    assert int(raw.headers["x-ratelimit-remaining-requests"]) == RPM - 1
    # The tokens of this request are charged before its headers are written.
    assert int(raw.headers["x-ratelimit-remaining-tokens"]) <= TPM - usage


def test_requests_limit_refuses_then_recovers(keyed_url: str) -> None:
    client = _client(keyed_url, KEYS[1])
    for _ in range(RPM):
        client.models.list()
    with pytest.raises(openai.RateLimitError) as caught:
        client.models.list()
    error = caught.value
    assert error.status_code == 429
    assert error.code == "rate_limit_exceeded"
    assert error.type == "requests"
    assert f"Limit {RPM}" in error.message
    headers = error.response.headers
    assert int(headers["retry-after"]) >= 1
    assert int(headers["retry-after-ms"]) >= 1
    _assert_limit_headers(headers, ("requests", "tokens"))
    assert headers["x-ratelimit-remaining-requests"] == "0"
    # Another key has its own budget.
    assert _client(keyed_url, KEYS[2]).models.list().data
    _until_served(client.models.list)


def test_tokens_limit_refuses_after_an_overdraft_then_recovers(keyed_url: str) -> None:
    client = _client(keyed_url, KEYS[3])
    long_text = " ".join(["tokens"] * 300)  # truncated to the model's 256 tokens each
    reply = client.embeddings.create(model=DEFAULT_MODEL, input=[long_text] * 5)
    assert reply.usage.prompt_tokens > TPM  # allowed: its cost was unknown until it ran
    with pytest.raises(openai.RateLimitError) as caught:
        client.embeddings.create(model=DEFAULT_MODEL, input="hi")
    assert caught.value.type == "tokens"
    assert caught.value.code == "rate_limit_exceeded"
    assert caught.value.response.headers["x-ratelimit-remaining-tokens"] == "0"
    _until_served(lambda: client.embeddings.create(model=DEFAULT_MODEL, input="hi"))


def test_open_server_limits_each_client_address(open_url: str) -> None:
    first = _client(open_url, "unused", **{"X-Forwarded-For": "203.0.113.7"})
    second = _client(open_url, "unused", **{"X-Forwarded-For": "203.0.113.8"})
    for _ in range(2):
        first.models.list()
    with pytest.raises(openai.RateLimitError):
        first.models.list()
    raw = second.models.with_raw_response.list()
    _assert_limit_headers(raw.headers, ("requests",))
    assert "x-ratelimit-limit-tokens" not in raw.headers  # only the limits that are on
    # A spoofed left-most address does not buy a new budget: the proxy's entry counts.
    spoofing = _client(open_url, "unused", **{"X-Forwarded-For": "198.51.100.1, 203.0.113.7"})
    with pytest.raises(openai.RateLimitError):
        spoofing.models.list()
    _until_served(first.models.list)


def test_public_paths_are_not_limited(open_url: str) -> None:
    for _ in range(5):
        assert httpx.get(f"{open_url}/health", timeout=30).status_code == 200


# -- the limiter itself, on a clock the test moves --


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (0.02, "20ms"), (1, "1s"), (1.5, "1.5s"), (360, "6m0s"), (3723, "1h2m3s")],
)
def test_durations_are_written_as_openai_does(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_buckets_refill_over_the_window() -> None:
    clock = _Clock()
    limiter = RateLimiter(requests_per_window=2, tokens_per_window=10, clock=clock)
    assert limiter.acquire("a") is None
    limiter.debit_tokens("a", 25)
    refusal = limiter.acquire("a")
    assert refusal is not None and refusal.kind == "tokens"
    assert refusal.retry_after_s == pytest.approx(15 * 60 / 10, abs=0.01)
    clock.now += refusal.retry_after_s  # long enough for the request bucket to be full again
    assert limiter.acquire("a") is None
    assert limiter.acquire("a") is None
    refusal = limiter.acquire("a")
    assert refusal is not None and refusal.kind == "requests"


def test_buckets_are_bounded_and_idle_ones_dropped() -> None:
    clock = _Clock()
    limiter = RateLimiter(requests_per_window=5, tokens_per_window=0, max_buckets=3, clock=clock)
    for caller in "abcdef":
        limiter.acquire(caller)
    assert len(limiter) == 3
    clock.now += 60  # every bucket is full again: nothing worth keeping
    limiter.acquire("g")
    assert len(limiter) == 1
