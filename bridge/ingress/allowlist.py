"""The optional allow-list of source networks: a request from elsewhere is refused with 403
before its body is read. X-Forwarded-For counts only when the peer is a trusted proxy."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address

import structlog
from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware

from bridge.ingress.state import METRICS

log = structlog.get_logger(__name__)

Address = IPv4Address | IPv6Address
Network = IPv4Network | IPv6Network

# Orchestrators probe these from wherever they run; they reveal nothing and publish nothing.
OPEN_PATHS = frozenset({"/healthz", "/readyz"})


def parse_address(text: str) -> Address:
    """One address as a peer or a proxy writes it: ``192.0.2.7``, ``192.0.2.7:443``,
    ``2001:db8::1`` or ``[2001:db8::1]:443``. An IPv4-mapped IPv6 address (a dual-stack
    socket's view of an IPv4 peer) is read as the IPv4 address, so IPv4 networks match it."""
    text = text.strip()
    if text.startswith("["):
        text = text[1 : text.find("]")] if "]" in text else ""
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    address = ip_address(text)  # ValueError for anything else, "unknown" included
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def within(address: Address, networks: Iterable[Network]) -> bool:
    return any(address in network for network in networks)


def caller(request: web.Request, trusted_proxies: Sequence[Network]) -> str:
    """The caller's address as logs show it: the source (see :func:`source_address`), else the
    peer, else ``"-"`` when neither can be read."""
    peername = request.transport.get_extra_info("peername") if request.transport else None
    peer = peername[0] if isinstance(peername, tuple) else ""
    try:
        return str(
            source_address(peer, request.headers.getall(hdrs.X_FORWARDED_FOR, []), trusted_proxies)
        )
    except ValueError:
        return peer or "-"


def source_address(
    peer: str, forwarded_for: Sequence[str], trusted_proxies: Sequence[Network]
) -> Address:
    """Where a request came from: the peer, unless the peer is a trusted proxy.

    Each proxy appends the address it received from, so X-Forwarded-For is read from the right,
    past the trusted proxies; the first untrusted hop is the source. Whatever a client wrote
    further left is its own claim and is never believed. Raises ``ValueError`` for an
    unreadable peer or hop, so that a garbled header refuses rather than admits."""
    address = parse_address(peer)
    if not within(address, trusted_proxies):
        return address
    hops = [hop for value in forwarded_for for hop in value.split(",")]
    for hop in reversed(hops):
        address = parse_address(hop)
        if not within(address, trusted_proxies):
            return address
    # Every hop is a trusted proxy (or there was none): the farthest of them sent it.
    return address


def source_allowlist(
    allowed: Sequence[Network], trusted_proxies: Sequence[Network] = ()
) -> Middleware:
    """A middleware answering 403 ``forbidden_source`` to requests from outside ``allowed``,
    except on :data:`OPEN_PATHS`."""
    allowed = tuple(allowed)
    trusted = tuple(trusted_proxies)

    @web.middleware
    async def allowed_sources_only(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in OPEN_PATHS:
            return await handler(request)
        peername = request.transport.get_extra_info("peername") if request.transport else None
        peer = peername[0] if isinstance(peername, tuple) else ""
        try:
            source = source_address(peer, request.headers.getall(hdrs.X_FORWARDED_FOR, []), trusted)
        except ValueError:
            return refuse(request, peer, "the request's source address could not be read")
        if not within(source, allowed):
            return refuse(request, str(source), f"requests from {source} are not allowed")
        return await handler(request)

    return allowed_sources_only


def refuse(request: web.Request, source: str, detail: str) -> web.Response:
    """403 before the body is read: nothing was published."""
    log.warning("request_refused_source", source=source, path=request.path)
    request.app[METRICS].webhooks_rejected.labels("forbidden_source").inc()
    return web.json_response({"error": "forbidden_source", "detail": detail}, status=403)
