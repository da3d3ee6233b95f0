"""SSRF-safe fetching of image URLs sent by clients.

The server is exposed to the internet, so a client's URL must never make it reach something only
the server can see (the cloud metadata endpoint at 169.254.169.254, an admin port on loopback, a
database on the private network). Every hop goes through the same steps:

1. The URL must be ``http`` or ``https``, carry no credentials and be of bounded length.
2. The host is resolved once, with ``loop.getaddrinfo`` (no blocking DNS on the event loop); an IP
   literal is taken as it is. *Every* address it resolves to must pass ``blocked_reason`` (loopback,
   private, link-local, unique-local, CGNAT, multicast, reserved, and IPv4-mapped, NAT64 and 6to4
   forms that embed such an address) unless the allowlist permits it: one bad answer refuses the
   URL, so a name that resolves to a public and a private address cannot win a race.
3. The connection goes to the checked address itself: the request URL carries the IP, the ``Host``
   header the original name, and for https httpcore's ``sni_hostname`` request extension makes TLS
   send and verify the original name (httpcore ``_async/connection.py`` passes it as
   ``server_hostname`` to ``start_tls``). There is no second DNS lookup that a rebinding DNS server
   could answer differently.
4. Redirects are followed by hand (at most ``max_redirects``), each hop checked from step 1.
5. The body is streamed and cut off as soon as it passes ``max_bytes`` (a ``Content-Length`` over
   the cap is refused before reading); connect and total timeouts bound the time.

Choices, each deliberate:

- ``Content-Type`` must be ``image/*``; ``application/octet-stream`` (or ``binary/octet-stream``)
  and a missing type are accepted too, since object stores often serve images so, and the decoder
  (``inputs/images.py``) refuses non-images anyway. Anything else (``text/html``, JSON) is refused.
- ``Accept-Encoding: identity`` is sent and a compressed reply is refused, so the byte cap counts
  the bytes that arrive and a gzip bomb cannot expand past it.
- Keep-alive is off (``default_transport``): every fetch opens its own connection, so a TLS
  connection verified for one host name is never reused for another name on the same address.
  Proxies and ``.netrc`` from the environment are ignored (``trust_env=False``): a proxy would
  resolve the name again itself.
- A refused URL (bad scheme, blocked address, fetching disabled, too big, not an image, host that
  does not resolve) is the client's fault: ``status`` 400. A remote failure (cannot connect,
  timeout, TLS failure, an HTTP error status, a broken or endless redirect chain) is 502. A redirect
  *to* a blocked address is refused as if the client had sent that URL: 400.
- Messages name the URL's host, never its path or query (which may carry tokens), nor the address
  a name resolved to (that would let a client map the server's internal DNS).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal, Self

import httpx

logger = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Turns ``(host, port)`` into addresses. The default asks the system with ``loop.getaddrinfo``;
#: tests may pass their own, standing in for DNS.
Resolver = Callable[[str, int], Awaitable[Sequence[IPAddress]]]

MAX_URL_CHARS = 8192
_ALLOWED_SCHEMES = ("http", "https")
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_OCTET_STREAM_TYPES = frozenset({"application/octet-stream", "binary/octet-stream"})
_USER_AGENT = "emb-model-provider/image-fetch"


# --- errors ----------------------------------------------------------------------------------


class FetchError(Exception):
    """A URL that could not be turned into image bytes; ``status`` is the HTTP status to answer.

    ``api/`` maps these to OpenAI-style errors; ``code`` is the machine-readable reason.
    """

    status: ClassVar[Literal[400, 502]] = 502
    code: ClassVar[str] = "image_fetch_failed"

    def __init__(self, message: str, *, host: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.host = host


class FetchRefused(FetchError):
    """The URL is not allowed: fetching disabled, bad scheme, credentials, blocked address."""

    status = 400
    code = "image_url_refused"


class FetchTooLarge(FetchError):
    """The body is (or announces itself) bigger than ``max_bytes``."""

    status = 400
    code = "image_too_large"


class FetchUnsupportedContent(FetchError):
    """The remote answered with something that is not an image (by its ``Content-Type``)."""

    status = 400
    code = "image_url_not_an_image"


class FetchFailed(FetchError):
    """The remote side failed: could not connect, TLS, HTTP error status, redirects, bad reply."""

    status = 502
    code = "image_fetch_failed"


class FetchTimeout(FetchFailed):
    """Connecting or the whole fetch took longer than the policy allows."""

    code = "image_fetch_timeout"


# --- address policy --------------------------------------------------------------------------

_BLOCKED_V4: tuple[tuple[ipaddress.IPv4Network, str], ...] = tuple(
    (ipaddress.IPv4Network(cidr), label)
    for cidr, label in (
        ("0.0.0.0/8", "a 'this network' address"),
        ("10.0.0.0/8", "a private address"),
        ("100.64.0.0/10", "a carrier-grade NAT address"),
        ("127.0.0.0/8", "a loopback address"),
        ("169.254.0.0/16", "a link-local address"),
        ("172.16.0.0/12", "a private address"),
        ("192.0.0.0/24", "an IETF protocol address"),
        ("192.0.2.0/24", "a documentation address"),
        ("192.88.99.0/24", "a 6to4 relay address"),
        ("192.168.0.0/16", "a private address"),
        ("198.18.0.0/15", "a benchmarking address"),
        ("198.51.100.0/24", "a documentation address"),
        ("203.0.113.0/24", "a documentation address"),
        ("224.0.0.0/4", "a multicast address"),
        ("240.0.0.0/4", "a reserved address"),
    )
)

_BLOCKED_V6: tuple[tuple[ipaddress.IPv6Network, str], ...] = tuple(
    (ipaddress.IPv6Network(cidr), label)
    for cidr, label in (
        ("::/128", "the unspecified address"),
        ("::1/128", "a loopback address"),
        ("::/96", "an IPv4-compatible address"),
        ("64:ff9b:1::/48", "a local-use NAT64 address"),
        ("100::/64", "a discard-only address"),
        ("2001::/23", "an IETF protocol address"),
        ("2001:db8::/32", "a documentation address"),
        ("fc00::/7", "a unique-local address"),
        ("fe80::/10", "a link-local address"),
        ("fec0::/10", "a site-local address"),
        ("ff00::/8", "a multicast address"),
    )
)

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def blocked_reason(address: IPAddress) -> str | None:
    """Why ``address`` must not be fetched from (e.g. "a private address"), or None if it may.

    IPv6 forms that carry an IPv4 address (IPv4-mapped ``::ffff:a.b.c.d``, NAT64 ``64:ff9b::/96``,
    6to4 ``2002::/16``) are judged by that IPv4 address too. The explicit tables come first so the
    reason is precise; ``is_global`` is a last net for whatever Python knows and they do not.
    """
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            inner = blocked_reason(address.ipv4_mapped)
            return None if inner is None else f"an IPv4-mapped form of {inner}"
        if address in _NAT64:
            inner = blocked_reason(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
            return None if inner is None else f"a NAT64 form of {inner}"
        if address.sixtofour is not None:
            inner = blocked_reason(address.sixtofour)
            if inner is not None:
                return f"a 6to4 form of {inner}"
        for network6, label in _BLOCKED_V6:
            if address in network6:
                return label
    else:
        for network4, label in _BLOCKED_V4:
            if address in network4:
                return label
    if not address.is_global:
        return "not a globally routable address"
    return None


@dataclass(frozen=True)
class Allowlist:
    """Exceptions to the address policy: networks (CIDRs) and exact host names."""

    networks: tuple[IPNetwork, ...] = ()
    host_names: frozenset[str] = frozenset()

    def permits_host(self, host: str) -> bool:
        return _normalise_host(host) in self.host_names

    def permits_address(self, address: IPAddress) -> bool:
        # The address as resolved, not an IPv4 form unwrapped from it: ``127.0.0.1/32`` does not
        # let ``::ffff:127.0.0.1`` through; list that form too if it is really wanted.
        return any(address in network for network in self.networks)


def parse_allowlist(entries: Sequence[str]) -> Allowlist:
    """Parse ``EMB_PROVIDER_URL_ALLOWLIST`` items: CIDRs (``10.1.0.0/16``, ``127.0.0.1``) or host
    names (``images.internal``: any address that exact name resolves to; no wildcards).

    Raises ``ValueError`` naming the bad entry, for the settings validator to report.
    """
    networks: list[IPNetwork] = []
    names: set[str] = set()
    for raw in entries:
        entry = raw.strip()
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
            continue
        except ValueError:
            pass
        name = _normalise_host(entry)
        if not name or "/" in name or ":" in name or any(c.isspace() for c in name):
            raise ValueError(f"allowlist entry {entry!r} is neither a CIDR nor a host name")
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError as exc:
            raise ValueError(f"allowlist entry {entry!r} is not a valid host name") from exc
        names.add(name)
    return Allowlist(networks=tuple(networks), host_names=frozenset(names))


def _normalise_host(host: str) -> str:
    return host.strip().rstrip(".").lower()


@dataclass(frozen=True)
class FetchPolicy:
    """How URLs are fetched; built from ``Settings`` by ``main.py``."""

    allow_urls: bool = True
    #: CIDRs and host names that may be fetched although the address policy would refuse them.
    allowlist: tuple[str, ...] = ()
    max_bytes: int = 20 * 1024 * 1024
    connect_timeout_s: float = 5.0
    #: Everything for one URL: DNS, connecting, every redirect hop, reading the body.
    total_timeout_s: float = 20.0
    max_redirects: int = 3
    parsed_allowlist: Allowlist = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.max_bytes < 1:
            raise ValueError(f"max_bytes must be at least 1, got {self.max_bytes}")
        if self.connect_timeout_s <= 0 or self.total_timeout_s <= 0:
            raise ValueError("timeouts must be positive")
        if self.max_redirects < 0:
            raise ValueError(f"max_redirects must be >= 0, got {self.max_redirects}")
        object.__setattr__(self, "parsed_allowlist", parse_allowlist(self.allowlist))


# --- fetching --------------------------------------------------------------------------------


async def system_resolver(host: str, port: int) -> list[IPAddress]:
    """All TCP addresses of ``host`` from the system resolver, in its order, deduplicated."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    addresses: list[IPAddress] = []
    for family, _type, _proto, _name, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        text = sockaddr[0]
        if not isinstance(text, str):
            continue
        address = ipaddress.ip_address(text)
        if address not in addresses:
            addresses.append(address)
    return addresses


@dataclass(frozen=True)
class _Target:
    """One hop, checked: where to connect and what to tell the server."""

    url: httpx.URL
    host: str
    addresses: tuple[IPAddress, ...]


def default_transport(
    ssl_context: ssl.SSLContext | None = None, *, max_connections: int = 64
) -> httpx.AsyncHTTPTransport:
    """The transport ``ImageFetcher`` uses unless given one.

    Keep-alive is off (``max_keepalive_connections=0``): each fetch opens its own connection, so a
    TLS connection verified for one name is never reused for another name on the same address.
    ``ssl_context`` replaces the default CA bundle (tests pass one trusting a local CA).
    """
    return httpx.AsyncHTTPTransport(
        verify=ssl_context if ssl_context is not None else True,
        trust_env=False,
        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=0),
    )


class ImageFetcher:
    """Fetches image bytes from client URLs under a ``FetchPolicy``. One per server; async-safe.

    ``resolver`` replaces the system resolver and ``transport`` the ``default_transport()``: tests
    stand them in for DNS and wrap the real transport in a guard that lets only loopback through.
    """

    def __init__(
        self,
        policy: FetchPolicy,
        *,
        resolver: Resolver | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._policy = policy
        self._resolver: Resolver = resolver if resolver is not None else system_resolver
        self._client = httpx.AsyncClient(
            transport=transport if transport is not None else default_transport(),
            # No proxies or .netrc from the environment: a proxy would resolve the name itself.
            trust_env=False,
            follow_redirects=False,
        )
        self._timeout = httpx.Timeout(
            policy.total_timeout_s, connect=policy.connect_timeout_s
        ).as_dict()

    @property
    def policy(self) -> FetchPolicy:
        return self._policy

    async def aclose(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.aclose()

    async def fetch(self, url: str) -> bytes:
        """The body at ``url``, at most ``max_bytes`` long; raises a ``FetchError`` otherwise."""
        if not self._policy.allow_urls:
            raise FetchRefused("fetching image URLs is disabled on this server")
        current = _parse_url(url)
        try:
            async with asyncio.timeout(self._policy.total_timeout_s):
                return await self._fetch(current)
        except TimeoutError:
            raise FetchTimeout(
                f"fetching the image from {current.host!r} took longer than "
                f"{self._policy.total_timeout_s:g} s",
                host=current.host,
            ) from None

    async def _fetch(self, current: httpx.URL) -> bytes:
        for _hop in range(self._policy.max_redirects + 1):
            target = await self._check(current)
            response = await self._send(target)
            try:
                if response.status_code in _REDIRECT_STATUSES:
                    current = _redirect_url(target, response)
                    continue
                return await self._read_body(target, response)
            finally:
                await response.aclose()
        raise FetchFailed(
            f"the image URL redirected more than {self._policy.max_redirects} times "
            f"(last host {current.host!r})",
            host=current.host,
        )

    async def _check(self, url: httpx.URL) -> _Target:
        """Resolve the hop's host and refuse it unless every address passes (or is allowed)."""
        _check_url_shape(url)
        host = url.host
        ascii_host = url.raw_host.decode("ascii")
        allowlist = self._policy.parsed_allowlist
        port = url.port if url.port is not None else (443 if url.scheme == "https" else 80)
        literal = _ip_literal(host)
        if literal is not None:
            addresses: Sequence[IPAddress] = (literal,)
        else:
            try:
                addresses = await self._resolver(ascii_host, port)
            except socket.gaierror as exc:
                if exc.errno == socket.EAI_AGAIN:
                    raise FetchFailed(
                        f"the image host {host!r} could not be resolved right now",
                        host=host,
                    ) from None
                raise FetchRefused(f"the image host {host!r} does not resolve", host=host) from None
            except UnicodeError:
                raise FetchRefused(
                    f"the image host {host!r} is not a valid host name", host=host
                ) from None
            if not addresses:
                raise FetchRefused(f"the image host {host!r} does not resolve", host=host)
        if literal is None and allowlist.permits_host(ascii_host):
            return _Target(url=url, host=host, addresses=tuple(addresses))
        for address in addresses:
            reason = blocked_reason(address)
            if reason is not None and not allowlist.permits_address(address):
                logger.info("refused image URL host=%s address=%s: %s", host, address, reason)
                what = "is" if literal is not None else "resolves to"
                raise FetchRefused(
                    f"the image URL host {host!r} {what} {reason}; fetching it is not allowed",
                    host=host,
                )
        return _Target(url=url, host=host, addresses=tuple(addresses))

    async def _send(self, target: _Target) -> httpx.Response:
        """Open the hop's response (headers read, body not), trying each checked address."""
        url = target.url
        headers = {
            # The original authority, as httpx would have sent it had it connected by name.
            "Host": url.netloc.decode("ascii"),
            "User-Agent": _USER_AGENT,
            "Accept": "image/*",
            "Accept-Encoding": "identity",
        }
        extensions: dict[str, object] = {"timeout": self._timeout}
        if url.scheme == "https" and _ip_literal(url.host) is None:
            extensions["sni_hostname"] = url.raw_host.decode("ascii")
        last_error: httpx.TransportError | None = None
        for address in target.addresses:
            # A Request built here, not by client.build_request, so no client cookies ride along.
            request = httpx.Request(
                "GET", url.copy_with(host=str(address)), headers=headers, extensions=extensions
            )
            try:
                return await self._client.send(request, stream=True, follow_redirects=False)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                last_error = exc
                continue
            except httpx.TimeoutException as exc:
                raise FetchTimeout(
                    f"the image host {target.host!r} did not answer in time", host=target.host
                ) from exc
            except httpx.TransportError as exc:
                raise FetchFailed(
                    f"the connection to the image host {target.host!r} failed: {_why(exc)}",
                    host=target.host,
                ) from exc
        if isinstance(last_error, httpx.ConnectTimeout):
            raise FetchTimeout(
                f"connecting to the image host {target.host!r} took longer than "
                f"{self._policy.connect_timeout_s:g} s",
                host=target.host,
            ) from last_error
        raise FetchFailed(
            f"could not connect to the image host {target.host!r}: {_why(last_error)}",
            host=target.host,
        ) from last_error

    async def _read_body(self, target: _Target, response: httpx.Response) -> bytes:
        host = target.host
        if not response.is_success:
            raise FetchFailed(
                f"the image host {host!r} answered HTTP {response.status_code}", host=host
            )
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise FetchFailed(
                f"the image host {host!r} sent a compressed body ({encoding}) although "
                "none was asked for",
                host=host,
            )
        content_type = response.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if content_type and not (
            content_type.startswith("image/") or content_type in _OCTET_STREAM_TYPES
        ):
            raise FetchUnsupportedContent(
                f"the image URL on {host!r} returned {content_type!r}, not an image", host=host
            )
        max_bytes = self._policy.max_bytes
        declared = _content_length(response)
        if declared is not None and declared > max_bytes:
            raise FetchTooLarge(
                f"the image on {host!r} is {declared} bytes, over the limit of {max_bytes}",
                host=host,
            )
        body = bytearray()
        try:
            async for chunk in response.aiter_raw():
                if len(body) + len(chunk) > max_bytes:
                    raise FetchTooLarge(
                        f"the image on {host!r} is over the limit of {max_bytes} bytes",
                        host=host,
                    )
                body += chunk
        except httpx.TimeoutException as exc:
            raise FetchTimeout(
                f"the image host {host!r} stopped sending the image", host=host
            ) from exc
        except httpx.TransportError as exc:
            raise FetchFailed(
                f"reading the image from {host!r} failed: {_why(exc)}", host=host
            ) from exc
        return bytes(body)


def _parse_url(url: str) -> httpx.URL:
    if len(url) > MAX_URL_CHARS:
        raise FetchRefused(f"the image URL is longer than {MAX_URL_CHARS} characters")
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise FetchRefused(f"the image URL is not a valid URL: {exc}") from None
    _check_url_shape(parsed)
    return parsed


def _check_url_shape(url: httpx.URL) -> None:
    if url.scheme not in _ALLOWED_SCHEMES:
        raise FetchRefused(
            f"image URLs must use http or https, not {url.scheme or 'no scheme'!r}",
            host=url.host or None,
        )
    if not url.host:
        raise FetchRefused("the image URL has no host")
    if url.userinfo:
        raise FetchRefused(
            f"the image URL for {url.host!r} carries credentials, which are not allowed",
            host=url.host,
        )


def _redirect_url(target: _Target, response: httpx.Response) -> httpx.URL:
    location = response.headers.get("location")
    if not location:
        raise FetchFailed(
            f"the image host {target.host!r} answered HTTP {response.status_code} "
            "without a Location",
            host=target.host,
        )
    try:
        # Relative to the URL the client knows (by name), not to the pinned IP.
        redirected = target.url.join(location)
    except httpx.InvalidURL:
        raise FetchFailed(
            f"the image host {target.host!r} redirected to an invalid URL", host=target.host
        ) from None
    if len(str(redirected)) > MAX_URL_CHARS:
        raise FetchFailed(
            f"the image host {target.host!r} redirected to an overlong URL", host=target.host
        )
    return redirected


def _ip_literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _content_length(response: httpx.Response) -> int | None:
    value = response.headers.get("content-length")
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return None


def _why(exc: BaseException | None) -> str:
    """A short reason for a transport error, naming TLS failures (httpx wraps httpcore, which
    wraps the ``ssl`` error, so the chain is walked)."""
    if exc is None:
        return "no address to connect to"
    link: BaseException | None = exc
    for _depth in range(5):
        if link is None:
            break
        if isinstance(link, ssl.SSLCertVerificationError):
            return "TLS certificate verification failed"
        if isinstance(link, ssl.SSLError):
            return "TLS handshake failed"
        link = link.__cause__ or link.__context__
    return (str(exc) or type(exc).__name__)[:200]
