"""Who the client is: its address behind trusted proxies, and whether it may call at all.

``X-Forwarded-For`` is written by whoever sends the request, so only the addresses that trusted
proxies appended can be believed. Each proxy appends the address it received from, so the list is
read from the right: the right-most address that is not a trusted proxy is the client. When the
connection itself does not come from a trusted proxy the header is ignored (anyone can send it).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_networks(text: str) -> tuple[Network, ...]:
    """CIDRs (or single addresses) from a comma-separated list; ``ValueError`` names a bad one."""
    networks: list[Network] = []
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError as exc:
            raise ValueError(f"not an IP address or CIDR: {entry!r}") from exc
    return tuple(networks)


def parse_address(text: str) -> Address | None:
    value = text.strip()
    if value.startswith("[") and "]" in value:  # "[::1]:443" as some proxies write IPv6
        value = value[1 : value.index("]")]
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # "::ffff:10.0.0.1" from a dual-stack socket is 10.0.0.1
    return address


def contains(networks: Iterable[Network], address: Address) -> bool:
    return any(address.version == net.version and address in net for net in networks)


def client_address(
    peer: str | None, forwarded_for: Sequence[str], trusted: Sequence[Network]
) -> Address | None:
    """The client's address: ``peer``, or when ``peer`` is a trusted proxy, the right-most
    address of ``X-Forwarded-For`` (every header value, in order) that is not a trusted proxy.

    None when the address that would be believed is not an IP address (then no allowlist can
    admit it). All hops trusted: the left-most one is the client.
    """
    address = parse_address(peer) if peer is not None else None
    if address is None or not trusted or not contains(trusted, address):
        return address
    hops = [hop for value in forwarded_for for hop in value.split(",") if hop.strip()]
    for hop in reversed(hops):
        address = parse_address(hop)
        if address is None or not contains(trusted, address):
            return address
    return address
