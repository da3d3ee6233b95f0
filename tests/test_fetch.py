"""The SSRF-safe image fetcher against real local HTTP(S) servers on 127.0.0.1 and ::1.

Each server counts the connections it accepts, so a refused URL is shown to have made none.
Private and link-local addresses have no listener here: they must be refused before any connect.
Every fetch goes through ``LoopbackOnly``, which wraps the fetcher's real transport and raises
before connecting anywhere but the IP literals 127.0.0.1 and ::1, so even a broken fetcher
sends no packet elsewhere; it also records the URL each request was sent to, which shows the
connection went to the checked address and not to a name resolved again.
"""

from __future__ import annotations

import asyncio
import io
import ipaddress
import socket
import ssl
import threading
from collections.abc import Callable, Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
import trustme
from PIL import Image

from emb_model_provider.security.fetch import (
    FetchError,
    FetchFailed,
    FetchPolicy,
    FetchRefused,
    FetchTimeout,
    FetchTooLarge,
    FetchUnsupportedContent,
    ImageFetcher,
    IPAddress,
    Resolver,
    blocked_reason,
    default_transport,
    parse_allowlist,
)

pytestmark = pytest.mark.timeout(60)

DEADLINE_S = 10
LOOPBACK_V4 = ("127.0.0.1/32",)

Route = Callable[["_Handler"], None]


# --- the outside network: local servers ------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    server: _CountingServer

    def setup(self) -> None:
        owner = self.server.owner
        if owner.tls is not None:
            self.request = owner.tls.wrap_socket(self.request, server_side=True)
        super().setup()

    def do_GET(self) -> None:
        owner = self.server.owner
        with owner.lock:
            owner.requests.append((self.path, self.headers.get("Host")))
        route = owner.routes.get(self.path.split("?", 1)[0])
        if route is None:
            self.send_error(404)
            return
        route(self)

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the tests assert on what the server recorded."""


class _CountingServer(ThreadingHTTPServer):
    daemon_threads = True
    owner: LocalServer

    def verify_request(self, request: object, client_address: object) -> bool:
        with self.owner.lock:
            self.owner.connections += 1
        return True

    def handle_error(self, request: object, client_address: object) -> None:
        """A client that gave up (TLS refused, body cut off) is expected here, not an error."""


class _CountingServer6(_CountingServer):
    address_family = socket.AF_INET6


class LocalServer:
    """A threaded HTTP(S) server on a free loopback port with per-path routes."""

    def __init__(self, host: str = "127.0.0.1", tls: ssl.SSLContext | None = None) -> None:
        self.host = host
        self.tls = tls
        self.routes: dict[str, Route] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.connections = 0
        self.lock = threading.Lock()
        #: Set at teardown so handlers that pace or stall return.
        self.stop = threading.Event()
        server_class = _CountingServer6 if ":" in host else _CountingServer
        self._httpd = server_class((host, 0), _Handler)
        self._httpd.owner = self
        self.port: int = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def url(self, path: str, *, host: str | None = None, scheme: str = "http") -> str:
        name = host if host is not None else self.host
        authority = f"[{name}]" if ":" in name else name
        return f"{scheme}://{authority}:{self.port}{path}"

    def close(self) -> None:
        self.stop.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(DEADLINE_S)


def respond(
    body: bytes,
    *,
    status: int = 200,
    content_type: str | None = "image/png",
    headers: Sequence[tuple[str, str]] = (),
    content_length: bool = True,
) -> Route:
    def route(handler: _Handler) -> None:
        handler.send_response(status)
        if content_type is not None:
            handler.send_header("Content-Type", content_type)
        if content_length:
            handler.send_header("Content-Length", str(len(body)))
        for name, value in headers:
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(body)

    return route


def redirect(location: str, status: int = 302) -> Route:
    return respond(b"", status=status, content_type=None, headers=[("Location", location)])


class Firehose:
    """Streams ``total_bytes`` with no Content-Length (HTTP/1.0, ended by closing)."""

    def __init__(self, total_bytes: int, chunk_bytes: int = 64 * 1024) -> None:
        self.total_bytes = total_bytes
        self.chunk = b"\x89" * chunk_bytes
        self.sent = 0
        self.completed = False
        self.finished = threading.Event()

    def __call__(self, handler: _Handler) -> None:
        try:
            handler.send_response(200)
            handler.send_header("Content-Type", "image/png")
            handler.end_headers()
            while self.sent < self.total_bytes:
                handler.wfile.write(self.chunk)
                self.sent += len(self.chunk)
            self.completed = True
        except OSError:
            pass  # The client hung up: what the test wants.
        finally:
            self.finished.set()


class Trickle:
    """Sends a 200-byte body one byte per ``pace_s``, each well within a read timeout: a server
    slow in total (10 s), not in any one read. Bounded, so a fetcher without a total timeout
    fails the test by succeeding late rather than hanging it."""

    body_bytes = 200

    def __init__(self, stop: threading.Event, pace_s: float = 0.05) -> None:
        self.stop = stop
        self.pace_s = pace_s

    def __call__(self, handler: _Handler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "image/png")
        handler.send_header("Content-Length", str(self.body_bytes))
        handler.end_headers()
        try:
            for _ in range(self.body_bytes):
                # Event.wait paces the simulated slow remote; it returns early at teardown.
                if self.stop.wait(self.pace_s):
                    return
                handler.wfile.write(b"x")
        except OSError:
            pass


def stall(stop: threading.Event) -> Route:
    """Reads the request and never answers (until teardown)."""

    def route(_handler: _Handler) -> None:
        stop.wait(DEADLINE_S)

    return route


@pytest.fixture
def server() -> Iterator[LocalServer]:
    local = LocalServer()
    yield local
    local.close()


@pytest.fixture
def server6() -> Iterator[LocalServer]:
    try:
        local = LocalServer("::1")
    except OSError:
        pytest.skip("no IPv6 loopback here")
    yield local
    local.close()


@pytest.fixture(scope="module")
def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 8), (255, 0, 0)).save(buffer, "PNG")
    return buffer.getvalue()


# --- helpers ---------------------------------------------------------------------------------


class LoopbackOnly(httpx.AsyncBaseTransport):
    """The test network's edge: passes a request to the real transport only if it targets an
    IP-literal loopback address, and records the URLs it passed."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.sent_to: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        if host not in ("127.0.0.1", "::1"):
            raise RuntimeError(f"test network guard: refused to connect to {host!r}")
        self.sent_to.append(host)
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


def policy(
    allowlist: Sequence[str] = (),
    *,
    max_bytes: int = 1_000_000,
    total_timeout_s: float = 5.0,
    max_redirects: int = 3,
    allow_urls: bool = True,
) -> FetchPolicy:
    return FetchPolicy(
        allow_urls=allow_urls,
        allowlist=tuple(allowlist),
        max_bytes=max_bytes,
        connect_timeout_s=1.0,
        total_timeout_s=total_timeout_s,
        max_redirects=max_redirects,
    )


def fetch(
    url: str,
    rules: FetchPolicy,
    *,
    resolver: Resolver | None = None,
    ssl_context: ssl.SSLContext | None = None,
    network: list[LoopbackOnly] | None = None,
) -> bytes:
    """Fetch ``url`` with a fresh fetcher; ``network`` receives the guard, to read after."""
    guard = LoopbackOnly(default_transport(ssl_context))
    if network is not None:
        network.append(guard)

    async def go() -> bytes:
        async with ImageFetcher(
            rules,
            resolver=resolver,
            transport=guard,
        ) as fetcher:
            return await fetcher.fetch(url)

    return asyncio.run(go())


def fetch_error(
    url: str,
    rules: FetchPolicy,
    *,
    resolver: Resolver | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> FetchError:
    with pytest.raises(FetchError) as info:
        fetch(url, rules, resolver=resolver, ssl_context=ssl_context)
    return info.value


def static_resolver(table: dict[str, list[str]]) -> Resolver:
    """Stands in for DNS with fixed answers (the guard still allows loopback only)."""

    async def resolve(host: str, _port: int) -> list[IPAddress]:
        return [ipaddress.ip_address(text) for text in table[host]]

    return resolve


def free_port() -> int:
    """A 127.0.0.1 port with nothing listening (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# --- the address policy ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("127.255.255.254", "loopback"),
        ("10.0.0.1", "private"),
        ("172.16.0.1", "private"),
        ("172.31.255.255", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "link-local"),
        ("100.64.0.1", "carrier-grade NAT"),
        ("0.0.0.0", "'this network'"),
        ("0.1.2.3", "'this network'"),
        ("224.0.0.1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("255.255.255.255", "reserved"),
        ("192.0.2.10", "documentation"),
        ("198.18.0.1", "benchmarking"),
        ("::1", "loopback"),
        ("::", "unspecified"),
        ("fd00::1", "unique-local"),
        ("fc00::1", "unique-local"),
        ("fe80::1", "link-local"),
        ("ff02::1", "multicast"),
        ("2001:db8::1", "documentation"),
        ("::ffff:127.0.0.1", "IPv4-mapped form of a loopback"),
        ("::ffff:10.0.0.1", "IPv4-mapped form of a private"),
        ("::ffff:169.254.169.254", "IPv4-mapped form of a link-local"),
        ("::10.0.0.1", "IPv4-compatible"),
        ("64:ff9b::a00:1", "NAT64 form of a private"),
        ("64:ff9b::7f00:1", "NAT64 form of a loopback"),
        ("2002:a00:1::1", "6to4 form of a private"),
        ("2002:a9fe:a9fe::1", "6to4 form of a link-local"),
        ("2001::1", "IETF protocol"),
    ],
)
def test_blocked_addresses(address: str, reason: str) -> None:
    found = blocked_reason(ipaddress.ip_address(address))
    assert found is not None
    assert reason in found


@pytest.mark.parametrize(
    "address",
    ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808"],
)
def test_public_addresses_pass(address: str) -> None:
    assert blocked_reason(ipaddress.ip_address(address)) is None


def test_allowlist_parsing() -> None:
    allowed = parse_allowlist([" 10.1.0.0/16 ", "127.0.0.1", "Images.Internal.", "", "fd00::/8"])
    assert allowed.permits_address(ipaddress.ip_address("10.1.2.3"))
    assert allowed.permits_address(ipaddress.ip_address("127.0.0.1"))
    assert not allowed.permits_address(ipaddress.ip_address("127.0.0.2"))
    assert allowed.permits_address(ipaddress.ip_address("fd00::5"))
    # The literal address only: a mapped form of an allowed IPv4 address is not allowed.
    assert not allowed.permits_address(ipaddress.ip_address("::ffff:127.0.0.1"))
    assert allowed.permits_host("images.internal")
    assert not allowed.permits_host("x.images.internal")
    for bad in ["10.0.0.0/33", "not a host", "http://x"]:
        with pytest.raises(ValueError, match="allowlist entry"):
            parse_allowlist([bad])


def test_policy_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        FetchPolicy(max_bytes=0)
    with pytest.raises(ValueError, match="timeouts"):
        FetchPolicy(total_timeout_s=0)
    with pytest.raises(ValueError, match="allowlist entry"):
        FetchPolicy(allowlist=("300.0.0.0/8",))


# --- refused before any connection -----------------------------------------------------------


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "localhost", "::ffff:127.0.0.1", "0.0.0.0", "::", "127.1", "2130706433"],
)
def test_loopback_is_refused_without_connecting(server: LocalServer, png: bytes, host: str) -> None:
    server.routes["/image.png"] = respond(png)
    error = fetch_error(server.url("/image.png?token=secret", host=host), policy())
    assert isinstance(error, FetchRefused)
    assert error.status == 400
    assert "not allowed" in error.message
    assert "secret" not in error.message
    assert "image.png" not in error.message
    assert server.connections == 0


def test_ipv6_loopback_is_refused_without_connecting(server6: LocalServer, png: bytes) -> None:
    server6.routes["/image.png"] = respond(png)
    error = fetch_error(server6.url("/image.png"), policy())
    assert isinstance(error, FetchRefused)
    assert "loopback" in error.message
    assert server6.connections == 0


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://10.0.0.1/a.png", "private"),
        ("http://192.168.1.1/a.png", "private"),
        ("http://172.16.0.1/a.png", "private"),
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://[fd00::1]/a.png", "unique-local"),
        ("http://[fe80::1]/a.png", "link-local"),
        ("http://[::ffff:10.0.0.1]/a.png", "IPv4-mapped form of a private"),
        ("http://[::ffff:169.254.169.254]/", "IPv4-mapped form of a link-local"),
        ("http://[64:ff9b::a9fe:a9fe]/", "NAT64 form of a link-local"),
        ("http://[2002:a00:1::1]/", "6to4 form of a private"),
        ("http://100.64.0.1/a.png", "carrier-grade NAT"),
        ("https://224.0.0.1/a.png", "multicast"),
    ],
)
def test_private_addresses_are_refused(url: str, reason: str) -> None:
    # Loopback is allowlisted so the refusal is the address policy's, not a blanket one.
    error = fetch_error(url, policy(LOOPBACK_V4))
    assert isinstance(error, FetchRefused)
    assert reason in error.message


def test_name_resolving_to_loopback_is_refused_when_another_range_is_allowed(
    server: LocalServer, png: bytes
) -> None:
    server.routes["/image.png"] = respond(png)
    error = fetch_error(server.url("/image.png", host="localhost"), policy(["192.0.2.0/24"]))
    assert isinstance(error, FetchRefused)
    assert "'localhost' resolves to a loopback address" in error.message
    # The resolved address is for the log, not the client.
    assert "127.0.0.1" not in error.message
    assert server.connections == 0


def test_one_blocked_answer_refuses_the_name(server: LocalServer, png: bytes) -> None:
    # DNS answers an allowed address and a private one: the private one decides.
    server.routes["/image.png"] = respond(png)
    resolver = static_resolver({"localhost": ["127.0.0.1", "10.0.0.1"]})
    url = f"http://localhost:{server.port}/image.png"
    error = fetch_error(url, policy(LOOPBACK_V4), resolver=resolver)
    assert isinstance(error, FetchRefused)
    assert "private" in error.message
    assert server.connections == 0


def test_name_allowlist_does_not_cover_ip_literals(server: LocalServer, png: bytes) -> None:
    server.routes["/image.png"] = respond(png)
    error = fetch_error(server.url("/image.png"), policy(["localhost"]))
    assert isinstance(error, FetchRefused)
    assert server.connections == 0


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("file:///etc/passwd", "not 'file'"),
        ("ftp://127.0.0.1/a.png", "not 'ftp'"),
        ("gopher://127.0.0.1:70/_GET", "not 'gopher'"),
        ("//127.0.0.1/a.png", "not 'no scheme'"),
        ("http:///a.png", "no host"),
        ("http://user:pw@127.0.0.1/a.png", "credentials"),
        ("http://[::1/a.png", "not a valid URL"),
        ("http://example.com/" + "a" * 9000, "longer than 8192"),
    ],
)
def test_bad_urls_are_refused(url: str, message: str) -> None:
    error = fetch_error(url, policy(LOOPBACK_V4))
    assert isinstance(error, FetchRefused)
    assert message in error.message


def test_disabled_fetching_refuses_everything(server: LocalServer, png: bytes) -> None:
    server.routes["/image.png"] = respond(png)
    error = fetch_error(server.url("/image.png"), policy(LOOPBACK_V4, allow_urls=False))
    assert isinstance(error, FetchRefused)
    assert "disabled" in error.message
    assert server.connections == 0


# --- allowed fetches --------------------------------------------------------------------------


def test_allowlisted_png_is_fetched_intact(server: LocalServer, png: bytes) -> None:
    server.routes["/image.png"] = respond(png)
    assert fetch(server.url("/image.png?size=large"), policy(LOOPBACK_V4)) == png
    assert server.requests == [("/image.png?size=large", f"127.0.0.1:{server.port}")]
    assert server.connections == 1


def test_allowlisted_name_connects_to_the_checked_address(server: LocalServer, png: bytes) -> None:
    server.routes["/image.png"] = respond(png)
    network: list[LoopbackOnly] = []
    url = server.url("/image.png", host="localhost")
    assert fetch(url, policy(["localhost"]), network=network) == png
    # Sent to the address checked, while the server still sees the name the client used.
    assert network[0].sent_to == ["127.0.0.1"]
    assert server.requests == [("/image.png", f"localhost:{server.port}")]


def test_connection_goes_to_the_resolved_address_only(server: LocalServer, png: bytes) -> None:
    # The stand-in DNS answers 127.0.0.1 for a name the system cannot resolve; fetching works
    # only because the connection goes to that answer, not to a second lookup of the name.
    server.routes["/image.png"] = respond(png)
    network: list[LoopbackOnly] = []
    resolver = static_resolver({"images.invalid": ["127.0.0.1"]})
    url = f"http://images.invalid:{server.port}/image.png"
    assert fetch(url, policy(LOOPBACK_V4), resolver=resolver, network=network) == png
    assert network[0].sent_to == ["127.0.0.1"]
    assert server.requests == [("/image.png", f"images.invalid:{server.port}")]


def test_one_redirect_is_followed(server: LocalServer, png: bytes) -> None:
    server.routes["/start"] = redirect("/image.png")
    server.routes["/image.png"] = respond(png)
    assert fetch(server.url("/start"), policy(LOOPBACK_V4)) == png
    assert [path for path, _ in server.requests] == ["/start", "/image.png"]
    assert server.connections == 2


@pytest.mark.parametrize("content_type", [None, "application/octet-stream", "image/jpeg; q=1"])
def test_octet_stream_or_no_type_is_left_to_the_decoder(
    server: LocalServer, png: bytes, content_type: str | None
) -> None:
    server.routes["/blob"] = respond(png, content_type=content_type)
    assert fetch(server.url("/blob"), policy(LOOPBACK_V4)) == png


def test_body_of_exactly_the_cap_is_accepted(server: LocalServer, png: bytes) -> None:
    server.routes["/image.png"] = respond(png, content_length=False)
    assert fetch(server.url("/image.png"), policy(LOOPBACK_V4, max_bytes=len(png))) == png


# --- refused or failed after connecting --------------------------------------------------------


def test_redirect_to_private_address_is_refused(server: LocalServer) -> None:
    server.routes["/start"] = redirect("http://10.0.0.1/image.png")
    error = fetch_error(server.url("/start"), policy(LOOPBACK_V4))
    assert isinstance(error, FetchRefused)
    assert "'10.0.0.1' is a private address" in error.message
    assert server.connections == 1


def test_redirect_to_metadata_endpoint_is_refused(server: LocalServer) -> None:
    server.routes["/start"] = redirect("http://169.254.169.254/latest/meta-data/", status=301)
    error = fetch_error(server.url("/start"), policy(LOOPBACK_V4))
    assert isinstance(error, FetchRefused)
    assert "link-local" in error.message


def test_redirect_to_non_allowlisted_loopback_is_refused(
    server: LocalServer, server6: LocalServer, png: bytes
) -> None:
    server6.routes["/image.png"] = respond(png)
    server.routes["/start"] = redirect(server6.url("/image.png"), status=307)
    error = fetch_error(server.url("/start"), policy(LOOPBACK_V4))
    assert isinstance(error, FetchRefused)
    assert "loopback" in error.message
    assert server.connections == 1
    assert server6.connections == 0


def test_redirect_to_file_scheme_is_refused(server: LocalServer) -> None:
    server.routes["/start"] = redirect("file:///etc/passwd", status=308)
    error = fetch_error(server.url("/start"), policy(LOOPBACK_V4))
    assert isinstance(error, FetchRefused)
    assert "not 'file'" in error.message


def test_too_many_redirects(server: LocalServer) -> None:
    server.routes["/loop"] = redirect("/loop")
    error = fetch_error(server.url("/loop"), policy(LOOPBACK_V4, max_redirects=2))
    assert isinstance(error, FetchFailed)
    assert error.status == 502
    assert "more than 2 times" in error.message
    assert server.connections == 3


def test_redirect_without_location(server: LocalServer) -> None:
    server.routes["/start"] = respond(b"", status=302, content_type=None)
    error = fetch_error(server.url("/start"), policy(LOOPBACK_V4))
    assert isinstance(error, FetchFailed)
    assert "without a Location" in error.message


def test_oversize_stream_is_cut_off_while_streaming(server: LocalServer) -> None:
    firehose = Firehose(total_bytes=256 * 1024 * 1024)
    server.routes["/huge"] = firehose
    error = fetch_error(server.url("/huge"), policy(LOOPBACK_V4, max_bytes=100_000))
    assert isinstance(error, FetchTooLarge)
    assert error.status == 400
    assert "over the limit of 100000 bytes" in error.message
    assert firehose.finished.wait(DEADLINE_S)
    # We hung up long before the server could send it all (socket buffers hold a few MB at most).
    assert not firehose.completed
    assert firehose.sent < firehose.total_bytes


def test_oversize_content_length_is_refused_before_reading(server: LocalServer) -> None:
    def liar(handler: _Handler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "image/png")
        handler.send_header("Content-Length", str(10**9))
        handler.end_headers()
        handler.wfile.write(b"x" * 10)

    server.routes["/big"] = liar
    error = fetch_error(server.url("/big"), policy(LOOPBACK_V4, max_bytes=100_000))
    assert isinstance(error, FetchTooLarge)
    assert "1000000000 bytes, over the limit of 100000" in error.message


def test_body_one_byte_over_the_cap_is_refused(server: LocalServer, png: bytes) -> None:
    server.routes["/image.png"] = respond(png, content_length=False)
    error = fetch_error(server.url("/image.png"), policy(LOOPBACK_V4, max_bytes=len(png) - 1))
    assert isinstance(error, FetchTooLarge)


@pytest.mark.parametrize("content_type", ["text/html", "application/json", "text/plain"])
def test_wrong_content_type_is_refused(server: LocalServer, png: bytes, content_type: str) -> None:
    server.routes["/page"] = respond(png, content_type=content_type)
    error = fetch_error(server.url("/page"), policy(LOOPBACK_V4))
    assert isinstance(error, FetchUnsupportedContent)
    assert error.status == 400
    assert content_type in error.message


def test_compressed_reply_is_refused(server: LocalServer, png: bytes) -> None:
    server.routes["/image.png"] = respond(png, headers=[("Content-Encoding", "gzip")])
    error = fetch_error(server.url("/image.png"), policy(LOOPBACK_V4))
    assert isinstance(error, FetchFailed)
    assert "compressed" in error.message


@pytest.mark.parametrize("status", [404, 403, 500, 503])
def test_remote_error_status_is_a_bad_gateway(server: LocalServer, status: int) -> None:
    server.routes["/image.png"] = respond(b"nope", status=status, content_type="text/plain")
    error = fetch_error(server.url("/image.png"), policy(LOOPBACK_V4))
    assert isinstance(error, FetchFailed)
    assert error.status == 502
    assert f"HTTP {status}" in error.message
    assert error.host == "127.0.0.1"


def test_connection_refused_is_a_bad_gateway() -> None:
    error = fetch_error(f"http://127.0.0.1:{free_port()}/image.png", policy(LOOPBACK_V4))
    assert isinstance(error, FetchFailed)
    assert error.status == 502
    assert "could not connect to the image host '127.0.0.1'" in error.message


def test_slow_body_hits_the_total_timeout(server: LocalServer) -> None:
    server.routes["/slow"] = Trickle(server.stop)
    error = fetch_error(server.url("/slow"), policy(LOOPBACK_V4, total_timeout_s=0.5))
    assert isinstance(error, FetchTimeout)
    assert error.status == 502
    assert "longer than 0.5 s" in error.message


def test_silent_server_times_out(server: LocalServer) -> None:
    server.routes["/silent"] = stall(server.stop)
    error = fetch_error(server.url("/silent"), policy(LOOPBACK_V4, total_timeout_s=0.5))
    assert isinstance(error, FetchTimeout)
    assert error.status == 502


# --- https: connect to the pinned address, verify the certificate against the name ----------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def client_tls(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


def tls_server(ca: trustme.CA, name: str, seen_sni: list[str | None]) -> LocalServer:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(name).configure_cert(context)

    def record(_sock: ssl.SSLObject, server_name: str, _ctx: ssl.SSLContext) -> None:
        seen_sni.append(server_name)  # None when the client sent no SNI

    context.sni_callback = record
    return LocalServer(tls=context)


def test_https_verifies_the_host_name_on_the_pinned_address(
    ca: trustme.CA, client_tls: ssl.SSLContext, png: bytes
) -> None:
    seen_sni: list[str | None] = []
    local = tls_server(ca, "localhost", seen_sni)
    try:
        local.routes["/image.png"] = respond(png)
        url = local.url("/image.png", host="localhost", scheme="https")
        network: list[LoopbackOnly] = []
        assert fetch(url, policy(LOOPBACK_V4), ssl_context=client_tls, network=network) == png
        # The request went to 127.0.0.1 by address, yet TLS sent and checked the name (the
        # certificate holds only "localhost"), and the Host header carried it.
        assert network[0].sent_to == ["127.0.0.1"]
        assert seen_sni == ["localhost"]
        assert local.requests == [("/image.png", f"localhost:{local.port}")]
    finally:
        local.close()


def test_https_by_address_does_not_match_a_name_certificate(
    ca: trustme.CA, client_tls: ssl.SSLContext, png: bytes
) -> None:
    local = tls_server(ca, "localhost", [])
    try:
        local.routes["/image.png"] = respond(png)
        url = local.url("/image.png", scheme="https")
        error = fetch_error(url, policy(LOOPBACK_V4), ssl_context=client_tls)
        assert isinstance(error, FetchFailed)
        assert "TLS certificate verification failed" in error.message
        assert local.requests == []
    finally:
        local.close()


def test_https_certificate_for_another_name_is_refused(
    ca: trustme.CA, client_tls: ssl.SSLContext, png: bytes
) -> None:
    local = tls_server(ca, "images.example", [])
    try:
        local.routes["/image.png"] = respond(png)
        url = local.url("/image.png", host="localhost", scheme="https")
        error = fetch_error(url, policy(LOOPBACK_V4), ssl_context=client_tls)
        assert isinstance(error, FetchFailed)
        assert error.status == 502
        assert "TLS certificate verification failed" in error.message
        assert local.requests == []
    finally:
        local.close()


def test_https_untrusted_ca_is_refused(ca: trustme.CA, png: bytes) -> None:
    local = tls_server(ca, "localhost", [])
    try:
        local.routes["/image.png"] = respond(png)
        url = local.url("/image.png", host="localhost", scheme="https")
        error = fetch_error(url, policy(LOOPBACK_V4))
        assert isinstance(error, FetchFailed)
        assert "TLS" in error.message
    finally:
        local.close()
