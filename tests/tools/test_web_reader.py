"""``DirectReader`` against a local server: pages are decoded with the charset their response declares (before
trafilatura's guess), and a plain-text page is its own text."""

from __future__ import annotations

import asyncio
import random

import pytest
from aiohttp import web

from mmsr.tools.web.fake import serve
from mmsr.tools.web.http import Limits, ToolError
from mmsr.tools.web.reader import DirectReader

GERMAN = "Café Müller in Zürich: große Straße, naïve Fassade, „Anführungszeichen“ – und mehr. "


def html(text: str, meta: str = "") -> str:
    return f"<html><head>{meta}<title>Zürich</title></head><body><article><p>{text * 5}</p></article></body></html>"


def read(body: bytes, content_type: str, limits: Limits = Limits(breaker_failures=0)):
    """The page ``DirectReader`` makes of ``body`` served with ``Content-Type: content_type``."""

    async def page(request: web.Request) -> web.Response:
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def main():
        async with serve([("GET", "/p", page)]) as url:
            return await DirectReader(allow_private=True, limits=limits).read(url + "/p")

    return asyncio.run(main())


def test_a_page_is_decoded_with_the_charset_its_header_declares():
    # trafilatura, given only the bytes, guessed cp1250 here: "Café" came back as "CafĂ©".
    latin = GERMAN.replace("„", '"').replace("“", '"').replace("–", "-")
    page = read(html(latin).encode("iso-8859-1"), "text/html; charset=ISO-8859-1")
    assert page.title == "Zürich" and "Café Müller in Zürich: große Straße, naïve Fassade" in page.text
    # Labelled ISO-8859-1 but holding windows-1252's quotes and dashes, as browsers read it.
    page = read(html(GERMAN).encode("cp1252"), "text/html; charset=iso-8859-1")
    assert "„Anführungszeichen“ – und mehr" in page.text


def test_the_header_outranks_the_pages_own_meta_charset():
    body = html(GERMAN, '<meta charset="utf-8">').encode("cp1252")
    assert "„Anführungszeichen“ – und mehr" in read(body, "text/html; charset=windows-1252").text


@pytest.mark.parametrize("charset", ["no-such-charset", "zlib", "unicode_escape", "iso-8859-1", "shift_jis"])
def test_valid_utf8_and_unknown_charsets_are_read_as_before(charset):
    # UTF-8 bytes: unknown labels and non-text codecs are guessed; a wrong 8-bit label loses to valid UTF-8.
    page = read(html(GERMAN).encode("utf-8"), f"text/html; charset={charset}")
    assert page.title == "Zürich" and "„Anführungszeichen“ – und mehr" in page.text


def test_a_plain_text_page_is_its_own_text_within_the_byte_cap():
    text = "Plain notes on the Hammond organ, invented by Laurens Hammond in 1934.\n" * 3
    page = read(text.encode("cp1252"), "text/plain; charset=windows-1252")
    assert (page.title, page.text) == ("", text)
    assert read(GERMAN.encode("utf-8"), "text/plain").text == GERMAN  # no charset: guessed (UTF-8)
    with pytest.raises(ToolError, match="byte cap"):
        read(text.encode() * 100, "text/plain", Limits(max_bytes=1000, breaker_failures=0))
    noise = random.Random(0).randbytes(20_000)  # an archive served as text/plain: no text to summarize, nor pay for
    for kind in ("text/plain", "text/plain; charset=utf-8", "text/plain; charset=windows-1252"):
        with pytest.raises(ToolError, match="no readable text"):
            read(noise, kind)
    with pytest.raises(ToolError, match="no readable text"):
        read(noise.replace(b"\x00", b"\x01"), "text/plain; charset=windows-1252")  # no NUL: control characters
    log = "".join(f"\x1b[36mstep {i}\x1b[0m \x1b[32mok\x1b[0m\vdone\n" for i in range(40))  # a CI log is text
    assert read(log.encode(), "text/plain").text == log


def test_jina_reader_a_page_host_the_dns_could_not_resolve_for_now_is_a_transient_failure(monkeypatch):
    """A page URL whose host lookup failed for now (``EAI_AGAIN``) was refused like a blocked URL: not transient,
    so a text search it cut short was cached for good. The reader service is not asked."""
    import socket

    from mmsr.tools.web.http import Retryable, transient
    from mmsr.tools.web.reader import JinaReader

    async def dns_down(self, host, *args, **kwargs):
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(asyncio.BaseEventLoop, "getaddrinfo", dns_down)
    with pytest.raises(Retryable, match="cannot resolve 'pages.example.org' now") as exc:
        asyncio.run(JinaReader(endpoint="http://127.0.0.1:9/jina").read("https://pages.example.org/a"))
    assert transient(exc.value) and exc.value.kind == "network" and not exc.value.sent
