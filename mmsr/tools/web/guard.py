"""SSRF guard: which URLs a model-chosen (or search-result) URL may point at.

A text search reads pages whose URLs come from the web, and the model writes the query that picks them, so
a reader must never become a way into the trainer's own network. Only ``http``/``https`` are fetched, and
hosts that are, or resolve to, loopback, private, link-local, multicast, reserved or unspecified addresses are
refused unless ``allow_private`` is set (tests that serve pages on 127.0.0.1 set it). The check runs twice:
before the request (IP literals and resolved names) and inside the connection's resolver, so a name that
resolves to a public address for the check and to a private one for the connection (DNS rebinding) is caught.
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


def _blocked_ip(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
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
