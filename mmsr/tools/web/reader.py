"""Page readers: URL -> page text, for the summarizer.

``JinaReader`` asks a Jina-Reader-compatible service (hosted ``r.jina.ai`` or a self-hosted one) for the page as
Markdown; ``DirectReader`` fetches the page itself and extracts the main text with ``trafilatura``. Both refuse
URLs the SSRF guard refuses (see below for what that covers), cap bytes and time, and raise ``ToolError`` on
failure (a site's 403 or 404 is one failed page; the Jina service itself refusing its key (401) or not found (404)
before it ever answered stops the run, ``ProviderRefused``: Jina answers 200 for a page its site refused). A 403
from the Jina service is one failed page too: Jina refuses a bad key with 401, and a 403 is Cloudflare in front of
``r.jina.ai`` blocking that request, not the key, so stopping the run for it would stop it for one URL. Page text
is redacted of configured keys before anyone sees it: a page may echo the URL or headers it was asked with, and the
text goes on to a (possibly third-party) summarizer.

What the guard covers differs: ``DirectReader`` fetches the page itself and checks every redirect hop and every
connection's address; ``JinaReader`` checks only the URL it asks for, since the service fetches the page and
follows its redirects itself (a public page may redirect to an internal one). A self-hosted reader must therefore
run without access to internal networks (``mmsr.tools.web.guard``).
"""

from __future__ import annotations

import asyncio
import codecs
import os
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

from mmsr.tools.base import changed_settings
from mmsr.tools.secrets import redact, register_secret_env
from mmsr.tools.web import guard
from mmsr.tools.web.http import Body, HTTPClient, Limits, Retryable, ToolError, parse_json

JINA_REFUSALS = (401, 404)  # the key, the endpoint's URL; a 403 is one page's (module docstring)


@dataclass(frozen=True)
class Page:
    """A read page: its title and its text (Markdown or plain)."""

    url: str
    title: str
    text: str


class PageReader(Protocol):
    name: str
    cost_per_call: float
    client: HTTPClient

    async def read(self, url: str) -> Page: ...

    def metrics(self) -> dict[str, float]: ...


def _usable(page: Page, min_chars: int) -> Page:
    if len(page.text.strip()) < min_chars:
        raise ToolError(f"the page has no readable text ({len(page.text.strip())} characters)", "empty_page")
    return Page(page.url, redact(page.title), redact(page.text))


def jina_data(body: bytes) -> dict[str, Any]:
    """The ``data`` object of a Jina answer (a ``parse`` for ``HTTPClient``: a malformed answer is retried)."""
    payload = parse_json(body)
    data = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(data, dict) or not isinstance(data.get("content"), str):
        raise Retryable("the reader's answer has no data.content", "bad_response")
    return data


# Readers see arbitrary sites: one site failing says nothing about the next, so no breaker by default.
READER_LIMITS = Limits(timeout_s=20.0, retries=1, concurrency=16, breaker_failures=0, max_bytes=3_000_000)


class JinaReader:
    """A Jina-Reader-compatible HTTP reader: POST ``{"url": ...}`` with ``Accept: application/json``, answer
    ``{"code", "data": {"title", "url", "content"}}``.

    Args:
        endpoint: the reader's URL (``https://r.jina.ai/`` or a self-hosted instance, which may be local but must
            not reach internal networks: it follows the pages' redirects unchecked, module docstring).
        api_key_env: environment variable with a bearer key; unset means anonymous (lower rate limits).
        return_format: ``X-Return-Format`` (``markdown``, ``text``, ``html``).
        allow_private: let page URLs point at loopback/private addresses (tests only).
        min_chars: pages with less text than this count as failed.
        limits: timeouts, retries, concurrency, rate, breaker (the reader service can be down as a whole).
        cost_per_call: dollars per page read, for budgets.
    """

    def __init__(self, endpoint: str = "https://r.jina.ai/", api_key_env: str = "JINA_API_KEY",
                 return_format: str = "markdown", allow_private: bool = False, min_chars: int = 50,
                 limits: Limits = Limits(timeout_s=30.0, retries=2, concurrency=8, max_bytes=3_000_000),
                 cost_per_call: float = 0.0) -> None:  # fmt: skip
        self.endpoint, self.api_key_env, self.return_format = endpoint, api_key_env, return_format
        self.allow_private, self.min_chars = allow_private, min_chars
        self.name, self.cost_per_call = "jina_reader", cost_per_call
        self.client = HTTPClient(self.name, limits)
        register_secret_env(api_key_env)

    async def read(self, url: str) -> Page:
        try:
            await guard.check_url(url, self.allow_private)
        except guard.BlockedURL as exc:
            raise ToolError(str(exc), "refused", sent=False) from None  # refused before asking the reader
        except guard.UnresolvedHost as exc:  # a DNS outage here: a failed page that the next call may read
            raise Retryable(str(exc), "network", sent=False) from None
        headers = {"Accept": "application/json", "X-Return-Format": self.return_format}
        if key := os.environ.get(self.api_key_env, "").strip():
            headers["Authorization"] = f"Bearer {key}"
        data = await self.client.request_endpoint("POST", self.endpoint, self.api_key_env, JINA_REFUSALS,
                                                  json={"url": url}, headers=headers, parse=jina_data)  # fmt: skip
        return _usable(Page(url, str(data.get("title") or ""), data["content"]), self.min_chars)

    def cache_settings(self) -> dict[str, Any]:
        """What shapes the pages it reads, where not the default (``mmsr.tools.cache.settings_version``); not
        ``allow_private``, for tests only."""
        return changed_settings(self, return_format=self.return_format, min_chars=self.min_chars)

    def metrics(self) -> dict[str, float]:
        return self.client.metrics()


def extract_text(html: bytes | str, url: str) -> tuple[str, str]:
    """(title, main text) of an HTML page via trafilatura (boilerplate, menus and ads removed); bytes are decoded
    as trafilatura guesses (UTF-8 when they are valid UTF-8, else a statistical guess)."""
    import trafilatura  # ~0.3 s to import; only paid by runs that read pages directly

    text = trafilatura.extract(html, url=url, include_comments=False, include_tables=True, favor_recall=True)
    metadata = trafilatura.extract_metadata(html)
    title = metadata.title if metadata is not None and metadata.title else ""
    return title, text or ""


def declared_text(body: Body) -> str | None:
    """The body decoded with the charset its response declared (HTTP's header outranks the page's own ``<meta>``,
    as in browsers); ``None`` where none is declared, it is not a text encoding of the web, or the bytes are not in
    it (the caller guesses). Bytes that are valid UTF-8 are read as UTF-8 whatever the label (unless UTF-16/32):
    a server's default ISO-8859-1 on a UTF-8 page is a common slip, and other text is almost never valid UTF-8.
    ISO-8859-1 and ASCII labels are read as windows-1252, their superset, as browsers read them: pages so labelled
    are full of its curly quotes and dashes."""
    try:  # the label is the site's: "zlib", "unicode_escape" or a NUL must not decompress, unescape or crash
        name = codecs.lookup(body.charset).name if body.charset else ""
    except (LookupError, ValueError):
        return None
    if not name or "escape" in name or name in ("idna", "punycode"):
        return None
    encodings = ("cp1252", name) if name in ("iso8859-1", "ascii") else (name,)
    for encoding in encodings if name.startswith(("utf-16", "utf-32")) else ("utf-8", *encodings):
        try:
            return body.decode(encoding)
        except (LookupError, ValueError):  # not a text codec (LookupError), bytes not in it (UnicodeError)
            continue
    return None


def guessed_text(data: bytes) -> str:
    """``data`` decoded as trafilatura guesses for HTML (UTF-8 if valid, else a statistical guess), but without
    its decompression of compressed-looking bytes: a plain-text page stays within the reader's byte cap."""
    from trafilatura.utils import detect_encoding

    for encoding in detect_encoding(data):
        try:
            return data.decode(encoding)
        except (LookupError, UnicodeDecodeError):
            continue
    return data.decode("utf-8", errors="replace")


def page_text(body: Body, url: str) -> tuple[str, str]:
    """(title, text) of a fetched page: a ``text/plain`` body is its own text (no title; none if it is binary,
    ``looks_binary``), anything else goes to ``extract_text``; both decoded by ``declared_text``, else as
    trafilatura guesses."""
    text = declared_text(body)
    if body.content_type == "text/plain":
        text = text if text is not None else guessed_text(bytes(body))
        return "", "" if looks_binary(text) else text
    return extract_text(text if text is not None else bytes(body), url)


def looks_binary(text: str, sample: int = 4096) -> bool:
    """Whether decoded ``text`` is bytes no decoding made readable (an archive or image served as ``text/plain``):
    a NUL, or over 5% control characters or U+FFFD in its first ``sample`` characters; real text has next to none
    (a log's ANSI colour escapes and vertical tabs are text). The summarizer was sent ~19,000 characters of such
    noise, paid for, as a page."""
    head = text[:sample]
    odd = sum(1 for c in head if c == "\ufffd" or (c < " " and c not in "\t\n\r\f\v\x1b"))
    return "\x00" in head or odd > 0.05 * len(head)


class DirectReader:
    """Fetches the page itself (SSRF-guarded, redirects checked hop by hop) and extracts its text: the main text
    of an HTML page, all of a plain-text one, decoded with the charset the response declares (``page_text``).

    Args:
        allow_private: let URLs point at loopback/private addresses (tests only).
        min_chars: pages with less text than this count as failed.
        limits: per-page timeout, retries, concurrency and byte cap.
        user_agent: sent with each request (some sites refuse requests without one).
    """

    def __init__(self, allow_private: bool = False, min_chars: int = 50, limits: Limits = READER_LIMITS,
                 user_agent: str = "Mozilla/5.0 (compatible; mmsr-reader/0.1)") -> None:  # fmt: skip
        self.allow_private, self.min_chars, self.user_agent = allow_private, min_chars, user_agent
        self.name, self.cost_per_call = "direct_reader", 0.0
        self.client = HTTPClient(self.name, limits, connector=partial(guard.connector, allow_private))

    async def read(self, url: str) -> Page:
        check = partial(guard.check_url, allow_private=self.allow_private)
        headers = {"User-Agent": self.user_agent, "Accept": "text/html,application/xhtml+xml,text/plain"}
        body = await self.client.request("GET", url, parse=lambda body: body, check=check, headers=headers)
        title, text = await asyncio.to_thread(page_text, body, url)
        return _usable(Page(url, title, text), self.min_chars)

    def cache_settings(self) -> dict[str, Any]:
        """As ``JinaReader.cache_settings`` (a site may answer another user agent otherwise)."""
        return changed_settings(self, min_chars=self.min_chars, user_agent=self.user_agent)

    def metrics(self) -> dict[str, float]:
        return self.client.metrics()
