"""Behaviour of the HTTP client and the SSRF guard that a mutation audit found unpinned: the scheme allow-list, every
resolved address checked, the guarded connector, the redirect limit and codes, the ``sent`` flag, the byte cap's
boundary, the Retry-After cap, which failures open the circuit, and the image downloader's own address check.
No network: names resolve through a faked ``getaddrinfo``, pages come from local servers."""

from __future__ import annotations

import asyncio
import socket
from functools import partial

import aiohttp
import pytest
from aiohttp import web

from mmsr.tools.web import guard
from mmsr.tools.web.download import ImageDownloader
from mmsr.tools.web.fake import serve
from mmsr.tools.web.http import HTTPClient, Limits, Retryable, ToolError, transient

from .fake_web import Script
from .test_image_download import FAST as IMAGE_FAST
from .test_image_download import Images, server  # noqa: F401 (a fixture)
from .test_web_http import FAST, _check_scheme_async, call

PUBLIC, PRIVATE = "93.184.215.14", "10.0.0.5"


@pytest.fixture
def fake_dns(monkeypatch):
    """``names[host] = [ip, ...]`` makes ``host`` resolve to those IPv4 addresses (asyncio's ``getaddrinfo`` and
    aiohttp's resolver both call ``socket.getaddrinfo``); ``names[host] = iter([[ip, ...], ...])`` answers each
    look-up with the next list, the last one for good. Other names resolve as before."""
    names: dict = {}
    real, last = socket.getaddrinfo, {}

    def addresses(host: str) -> list[str]:
        if isinstance(names[host], list):
            return names[host]
        last[host] = next(names[host], last.get(host))
        return last[host]

    def getaddrinfo(host, port, *args, **kwargs):
        if host not in names:
            return real(host, port, *args, **kwargs)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, int(port or 0))) for ip in addresses(host)]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return names


# --- the guard ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["gopher", "ws", "wss", "data", "javascript"])
def test_only_http_schemes_pass_even_to_a_public_ip_literal(scheme):
    # the host is public and needs no lookup: only the scheme can refuse it
    with pytest.raises(guard.BlockedURL, match="only http"):
        asyncio.run(guard.check_url(f"{scheme}://{PUBLIC}/x"))


def test_a_name_with_any_private_address_is_refused_whatever_its_order(fake_dns):
    # a connection may pick any of the addresses: JinaReader relies on check_url alone, so every one is checked
    fake_dns["mixed.test"], fake_dns["mixed2.test"] = [PUBLIC, PRIVATE], [PRIVATE, PUBLIC]
    for name in ("mixed.test", "mixed2.test"):
        with pytest.raises(guard.BlockedURL, match=PRIVATE):
            asyncio.run(guard.check_url(f"http://{name}/page"))
    fake_dns["public.test"] = [PUBLIC, "8.8.8.8"]
    assert asyncio.run(guard.check_url("http://public.test/page")).host == "public.test"


def test_the_guarded_connector_refuses_a_name_that_resolves_private_at_connect_time(fake_dns):
    """The connector's own resolver refuses a private address (no check runs before it here), so nothing reaches
    the server behind it; the rebinding case, a check passed on a public address first, is the test below."""
    script = Script((200, "internal"))
    fake_dns["rebind.test"] = ["127.0.0.1"]

    async def main():
        async with serve([("GET", "/x", script)]) as url:
            port = url.rsplit(":", 1)[1]
            async with aiohttp.ClientSession(connector=guard.connector(False)) as session:
                with pytest.raises(aiohttp.ClientConnectorError) as info:
                    await session.get(f"http://rebind.test:{port}/x")
            return info.value

    error = asyncio.run(main())
    assert isinstance(error.os_error, guard.BlockedAddress), repr(error)
    assert script.requests == []


def _guarded_request(check):
    """A GET of ``rebind.test`` through the guarded connector (``check``: the URL check before the request, or
    None); returns the ToolError, the client and the script of the local server that the name should reach."""
    script = Script((200, "internal"))

    async def main():
        async with serve([("GET", "/x", script)]) as url:
            client = HTTPClient("fake", FAST, connector=partial(guard.connector, False))
            with pytest.raises(ToolError) as info:
                await client.request("GET", f"http://rebind.test:{url.rsplit(':', 1)[1]}/x", parse=bytes, check=check)
            return info.value, client

    return (*asyncio.run(main()), script)


def test_a_name_rebound_to_a_private_address_after_the_check_is_refused(fake_dns):
    """DNS rebinding: the name resolves to a public address for the check, to loopback when the connection is
    made. The guarded connector refuses it there; nothing reaches the server, nothing is retried."""
    fake_dns["rebind.test"] = answers = iter([[PUBLIC], ["127.0.0.1"]])
    error, client, script = _guarded_request(guard.check_url)
    assert next(answers, None) is None  # the check took the public answer, the connection the loopback one
    assert error.kind == "refused" and client.counts["retries"] == 0 and script.requests == []


def test_a_blocked_address_is_refused_at_once_not_retried(fake_dns):
    fake_dns["rebind.test"] = ["127.0.0.1"]
    error, client, script = _guarded_request(None)
    assert error.kind == "refused" and "non-public" in error.reason and not isinstance(error, Retryable)
    assert client.counts["retries"] == 0 and script.requests == []


def test_image_downloads_check_the_address_before_connecting(server, tmp_path):  # noqa: F811 (the fixture)
    # An IP literal never reaches the connector's resolver: only the check itself can refuse loopback.
    downloader = ImageDownloader(cache=str(tmp_path / "images.sqlite"), limits=IMAGE_FAST)
    got = downloader.fetch([f"{server}/red.png"])[f"{server}/red.png"]
    assert got.image is None and "non-public address" in got.error
    assert Images.hits == {}


# --- redirects ---------------------------------------------------------------------------------------------


async def _chain(request: web.Request) -> web.StreamResponse:
    """``/r/<n>`` redirects to ``/r/<n-1>``; ``/r/0`` is the page: a chain of exactly n redirects."""
    n = int(request.match_info["n"])
    if n == 0:
        return web.Response(text="end")
    raise web.HTTPFound(f"/r/{n - 1}")


def _follow(path: str, status: int | None = None):
    async def redirect(request):
        return web.Response(status=status, headers={"Location": "/end"}, text="the redirect itself")

    async def main():
        routes = [("GET", "/r/{n}", _chain), ("GET", "/moved", redirect), ("GET", "/end", Script((200, "end")))]
        async with serve(routes) as url:
            client = HTTPClient("reader", FAST)
            try:
                return await client.request("GET", url + path, parse=bytes, check=_check_scheme_async)
            except ToolError as exc:
                return exc

    return asyncio.run(main())


def test_five_redirects_are_followed_and_a_sixth_is_refused():
    assert _follow("/r/5") == b"end"
    error = _follow("/r/6")
    assert isinstance(error, ToolError) and error.kind == "too_many_redirects"


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_every_redirect_status_is_followed(status):
    assert _follow("/moved", status) == b"end"


# --- what was sent ----------------------------------------------------------------------------------------


def test_a_url_refused_before_any_request_was_never_sent_one_refused_after_a_redirect_was():
    async def main():
        async with serve([("GET", "/r/{n}", _chain)]) as url:
            client = HTTPClient("reader", FAST)
            with pytest.raises(ToolError) as first:
                await client.request("GET", url + "/r/0", parse=bytes, check=guard.check_url)  # loopback: refused

            async def refuse_the_target(target: str):
                if target.endswith("/r/0"):
                    raise guard.BlockedURL("the redirect target is internal")

            with pytest.raises(ToolError) as later:
                await client.request("GET", url + "/r/1", parse=bytes, check=refuse_the_target)
            return first.value, later.value

    first, later = asyncio.run(main())
    assert first.kind == later.kind == "refused"
    assert first.sent is False and later.sent is True


def test_a_failure_on_the_second_attempt_counts_as_sent_when_the_first_went_out():
    # the first attempt reached the server (503); the second is refused before sending: the call may be billed
    checks = []

    async def refuse_the_second_time(url: str):
        checks.append(url)
        if len(checks) > 1:
            raise guard.BlockedURL("refused now")

    script = Script((503, "busy"))
    error, _ = call(script, Limits(retries=1, backoff_s=0.01, backoff_max_s=0.02, breaker_failures=0),
                    parse=bytes, check=refuse_the_second_time)  # fmt: skip
    assert isinstance(error, ToolError) and error.kind == "refused" and len(script.requests) == 1
    assert error.sent is True


# --- byte cap ---------------------------------------------------------------------------------------------


def _read(body: bytes, max_bytes: int, chunked: bool):
    async def handler(request):
        if not chunked:
            return web.Response(body=body)
        response = web.StreamResponse()  # no Content-Length: the cap holds while streaming
        await response.prepare(request)
        await response.write(body)
        return response

    async def main():
        async with serve([("GET", "/x", handler)]) as url:
            client = HTTPClient("fake", Limits(max_bytes=max_bytes, retries=0, breaker_failures=0))
            try:
                return await client.request("GET", url + "/x", parse=bytes)
            except ToolError as exc:
                return exc

    return asyncio.run(main())


@pytest.mark.parametrize("chunked", [False, True])
def test_a_body_of_exactly_max_bytes_is_read_and_one_byte_more_is_refused(chunked):
    cap = 1000
    assert _read(b"x" * cap, cap, chunked) == b"x" * cap
    error = _read(b"x" * (cap + 1), cap, chunked)
    assert isinstance(error, ToolError) and error.kind == "too_large"
    if not chunked:  # refused from its Content-Length, before reading it
        assert f"response of {cap + 1} bytes is over the {cap}-byte cap" in error.reason


# --- retries and the breaker ------------------------------------------------------------------------------


def test_a_servers_retry_after_is_capped_at_backoff_max_s(monkeypatch):
    """Retry-After: 3600 must not stall the rollout an hour: the wait the client chooses is read (and not slept)."""
    waits, built = [], HTTPClient.__init__

    def recording(self, *args, **kwargs):
        built(self, *args, **kwargs)
        chosen = self._wait
        self._wait = lambda state: waits.append(chosen(state)) or 0.0

    monkeypatch.setattr(HTTPClient, "__init__", recording)
    script = Script((429, {}), (200, {"ok": 1}), headers={"Retry-After": "3600"})
    result, _ = call(script, Limits(retries=1, backoff_s=0.01, backoff_max_s=0.5, breaker_failures=0))
    assert result == {"ok": 1} and len(waits) == 1
    assert waits == [pytest.approx(0.5)]  # the server's wait, capped (the client's own backoff is ~0.01 s)


def _not_the_answer(body: bytes):
    raise ToolError("the API says: no such engine", "api_error")


@pytest.mark.parametrize("answer", ["http_404", "api_error"])
def test_answers_that_are_not_service_trouble_do_not_open_the_circuit(answer):
    # a 404 or an API's refusal says the service is up: with breaker_failures=1, one failure of service would open it
    script = Script((404, {"error": "no such page"}) if answer == "http_404" else (200, {"ok": 1}))
    parse = bytes if answer == "http_404" else _not_the_answer

    async def main():
        async with serve([("GET", "/x", script)]) as url:
            client = HTTPClient("fake", Limits(retries=0, breaker_failures=1, breaker_reset_s=60.0))
            kinds = []
            for _ in range(3):
                with pytest.raises(ToolError) as info:
                    await client.request("GET", url + "/x", parse=parse)
                kinds.append(info.value.kind)
            return kinds

    assert "circuit_open" not in asyncio.run(main())
    assert len(script.requests) == 3


def test_a_result_cut_short_by_an_open_circuit_is_transient():
    assert transient(ToolError("fake is unavailable (circuit open for 3 more s)", "circuit_open", sent=False))
    assert transient(ToolError("out of time", "deadline")) and transient(Retryable("HTTP 503", "http_5xx"))
    assert not transient(ToolError("HTTP 404", "http_4xx"))


def test_backoff_total_counts_each_waits_jitter_within_the_cap():
    # waits of backoff_s * 2**i plus up to backoff_s of jitter, each capped at backoff_max_s: 0.5+0.5, 1+0.5, 2+0.5
    assert Limits(retries=3, backoff_s=0.5, backoff_max_s=10.0).backoff_total_s() == pytest.approx(1.0 + 1.5 + 2.5)
    # the cap binds the third: 1+1, 2+1, min(4+1, 4)
    assert Limits(retries=3, backoff_s=1.0, backoff_max_s=4.0).backoff_total_s() == pytest.approx(2.0 + 3.0 + 4.0)
    assert Limits(retries=0).backoff_total_s() == 0.0
    limits = Limits(timeout_s=2.0, retries=2, backoff_s=0.5, backoff_max_s=10.0)
    assert limits.worst_case_s() == pytest.approx(2.0 * 3 + (1.0 + 1.5))
