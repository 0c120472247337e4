"""SSRF guard: which URLs a model-chosen (or search-result) URL may point at.

A text search reads pages whose URLs come from the web, and the model writes the query that picks them, so
a reader must never become a way into the trainer's own network. Only ``http``/``https`` are fetched, and
hosts that are, or resolve to, loopback, private, link-local, site-local, multicast, reserved or unspecified
addresses are refused unless ``allow_private`` is set (tests that serve pages on 127.0.0.1 set it). An IPv6
address that carries an IPv4 one is judged by it (IPv4-mapped, 6to4, NAT64 well-known prefix: by the host it
reaches; Teredo: refused if either address it carries is), and the deprecated IPv4-compatible form and
local-use NAT64 are refused outright. The check runs twice: before the request (IP literals and resolved
names) and inside the connection's resolver, so a name that resolves to a public address for the check and to
a private one for the connection (DNS rebinding) is caught.
Both checks cover only what this process fetches itself (``DirectReader``, thumbnails, downloaded images): it
follows their redirects by hand, each hop checked again. ``JinaReader`` can check only the URL it hands to the
reader service, which then fetches the page and follows its redirects itself, unchecked: a public page that
redirects inward reaches whatever that service can reach. A self-hosted reader must therefore run where it has no
access to internal networks (its own container or VPC without routes to them, or an egress proxy that refuses
private addresses).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver
from aiohttp.resolver import ThreadedResolver
from yarl import URL


class BlockedURL(ValueError):
    """A URL the guard refuses; the message says why (and never holds credentials)."""


class BlockedAddress(OSError):
    """Raised inside the connection's resolver when a name resolves only to non-public addresses."""


class UnresolvedHost(OSError):
    """A name the resolver could not look up this time (a DNS server down or slow: ``EAI_AGAIN``, ...), unlike
    one that does not exist (``BlockedURL``): the next call may well resolve it, so callers retry it and never
    cache what it cut short."""


# lookups that say the name has no address (NXDOMAIN, no record): asking again gives the same answer
_NO_SUCH_NAME = {getattr(socket, name) for name in ("EAI_NONAME", "EAI_NODATA", "EAI_ADDRFAMILY") if hasattr(socket, name)}


# IPv6 forms refused whatever follows the prefix: ``is_global`` does not flag them on every Python.
# fec0::/10: deprecated site-local (RFC 3879), still routed inside some networks; ::/96: deprecated
# IPv4-compatible ::a.b.c.d (also holds :: and ::1); 64:ff9b:1::/48: local-use NAT64 (RFC 8215), which
# translates to whatever IPv4 addresses its operator picks, private ones included.
_REFUSED_V6 = tuple(ipaddress.IPv6Network(n) for n in ("fec0::/10", "::/96", "64:ff9b:1::/48"))
# NAT64 well-known prefix (RFC 6052): the last 32 bits are the IPv4 host the translator connects to
_NAT64_WELL_KNOWN = ipaddress.IPv6Network("64:ff9b::/96")


def _carried_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 host a packet to ``ip`` ends up at, for the forms that only carry one (IPv4-mapped, 6to4,
    NAT64 well-known prefix); None for other addresses."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:  # 2002:a.b.c.d::/48: a relay tunnels it to a.b.c.d
        return ip.sixtofour
    if ip in _NAT64_WELL_KNOWN:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _blocked_ip(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """True for an address the guard refuses; IPv6 forms that carry an IPv4 address are judged by it, so
    ``2002:a9fe:a9fe::`` is as refused as 169.254.169.254 and ``2002:808:808::`` as public as 8.8.8.8."""
    if isinstance(ip, ipaddress.IPv6Address):
        if any(ip in net for net in _REFUSED_V6):
            return True
        carried = _carried_ipv4(ip)
        if carried is not None:
            return _blocked_ip(carried)
        # Teredo (2001::/32) carries a server and a client address: either one non-public refuses it, and
        # both public still leaves the address itself to the rule below
        if ip.teredo is not None and any(_blocked_ip(v4) for v4 in ip.teredo):
            return True
    return not ip.is_global or ip.is_multicast or ip.is_reserved or ip.is_unspecified


def _malformed(exc: ValueError) -> BlockedURL:
    # The parser's message may quote the URL (and a key in its query): name the error type only.
    return BlockedURL(f"the URL is malformed ({type(exc).__name__})")


def check_scheme(url: str) -> URL:
    """The parsed URL if it is absolute http(s) with a host and a valid port; ``BlockedURL`` otherwise (also
    for a URL that does not parse: result URLs come from third parties, and one bad URL must cost only its
    own page, not the whole search)."""
    try:
        parsed = URL(url)
        scheme, host, _ = parsed.scheme, parsed.host, parsed.port  # host and port are parsed lazily
    except ValueError as exc:  # also UnicodeError (IDNA): a subclass
        raise _malformed(exc) from None
    if scheme not in ("http", "https"):
        raise BlockedURL(f"only http(s) URLs are fetched, not {scheme or 'a relative URL'!r}")
    if not host:
        raise BlockedURL("the URL has no host")
    return parsed


async def check_url(url: str, allow_private: bool = False) -> URL:
    """``check_scheme``, then refuse non-public addresses (literal or resolved) unless ``allow_private``."""
    parsed = check_scheme(url)
    if allow_private:
        return parsed
    host = parsed.host.strip("[]")
    try:
        addresses = [ipaddress.ip_address(host)]
    except ValueError:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, parsed.port, type=socket.SOCK_STREAM)
        except OSError as exc:
            if isinstance(exc, socket.gaierror) and exc.errno in _NO_SUCH_NAME:
                raise BlockedURL(f"cannot resolve {host!r} ({exc.strerror or exc})") from None
            raise UnresolvedHost(f"cannot resolve {host!r} now ({exc.strerror or exc})") from None
        except ValueError as exc:  # a name IDNA cannot encode (an empty or over-long label ...)
            raise _malformed(exc) from None
        addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    blocked = [str(a) for a in addresses if _blocked_ip(a)]
    if blocked:
        raise BlockedURL(f"{host!r} is a non-public address ({', '.join(blocked)}); refused")
    return parsed


class PublicOnlyResolver(AbstractResolver):
    """An aiohttp resolver that drops non-public addresses, so connections reach public hosts only."""

    def __init__(self) -> None:
        self._inner = ThreadedResolver()

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list[Any]:
        results = await self._inner.resolve(host, port, family)
        public = [r for r in results if not _blocked_ip(ipaddress.ip_address(r["host"]))]
        if not public:
            raise BlockedAddress(f"{host!r} resolves only to non-public addresses; refused")
        return public

    async def close(self) -> None:
        await self._inner.close()


def connector(allow_private: bool) -> aiohttp.TCPConnector:
    """A connector for fetching untrusted URLs (guarded resolver unless ``allow_private``)."""
    return aiohttp.TCPConnector() if allow_private else aiohttp.TCPConnector(resolver=PublicOnlyResolver())
