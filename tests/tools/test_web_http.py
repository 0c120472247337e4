"""Resilience and the SSRF guard, against local servers: retries, timeouts, caps, breaker, limits, redirects."""

from __future__ import annotations

import asyncio
import copy
import math
import time

import pytest
from aiohttp import web

from mmsr.tools.web import guard
from mmsr.tools.web.fake import serve
from mmsr.tools.web.http import CircuitBreaker, HTTPClient, Limits, RateSlots, Retryable, ToolError, parse_json
from mmsr.tools.web.reader import DirectReader

from .fake_web import Script

FAST = Limits(timeout_s=2.0, retries=2, backoff_s=0.01, backoff_max_s=0.05, breaker_failures=0)


def call(script: Script, limits: Limits = FAST, **kwargs):
    async def main():
        async with serve([("*", "/x", script)]) as url:
            client = HTTPClient("fake", limits)
            try:
                return await client.request("GET", url + "/x", **kwargs), client
            except ToolError as exc:
                return exc, client

    return asyncio.run(main())


def test_retries_429_and_5xx_then_succeeds():
    script = Script((429, {"error": "slow down"}), (503, "busy"), (200, {"ok": 1}))
    result, client = call(script)
    assert result == {"ok": 1} and len(script.requests) == 3
    assert client.counts["retries"] == 2 and client.counts["calls"] == 1


def test_gives_up_after_retries_with_a_reason_and_a_count():
    script = Script((500, "boom"))
    error, client = call(script)
    assert isinstance(error, ToolError) and error.kind == "http_5xx" and "HTTP 500" in error.reason
    assert len(script.requests) == FAST.retries + 1 and client.counts["http_5xx"] == 1


def test_retry_after_is_honoured_within_the_cap():
    script = Script((429, {}), (200, {"ok": 1}), headers={"Retry-After": "0.3"})
    start = time.perf_counter()
    result, _ = call(script, Limits(retries=1, backoff_s=0.01, backoff_max_s=1.0, breaker_failures=0))
    assert result == {"ok": 1} and time.perf_counter() - start >= 0.25


@pytest.mark.parametrize("jitter", ["random", "largest"])
def test_retries_back_off_exponentially_with_a_jitter_of_up_to_backoff_s(monkeypatch, jitter):
    """Two 429s without Retry-After: retry i waits backoff_s * 2**i plus a jitter in [0, backoff_s] (so that clients
    a rate limit turned away together do not all come back at once); "largest" pins the jitter at its top. The waits
    the client chose are read, not timed: a busy machine only ever lengthens a sleep."""
    import random

    if jitter == "largest":
        monkeypatch.setattr(random, "uniform", lambda low, high: high)
    waits, built = [], HTTPClient.__init__

    def recording(self, *args, **kwargs):
        built(self, *args, **kwargs)
        chosen = self._wait
        self._wait = lambda state: waits.append(chosen(state)) or waits[-1]

    monkeypatch.setattr(HTTPClient, "__init__", recording)
    backoff = 0.01
    result, _ = call(Script((429, {}), (429, {}), (200, {"ok": 1})),
                     Limits(retries=2, backoff_s=backoff, backoff_max_s=1.0, breaker_failures=0))  # fmt: skip
    assert result == {"ok": 1} and len(waits) == 2
    for i, wait in enumerate(waits):
        least = backoff * 2**i + (backoff if jitter == "largest" else 0.0)
        assert least <= wait <= backoff * 2**i + backoff, (i, wait)


def test_timeout_is_retried_then_reported():
    script = Script(("sleep", 3.0))
    error, client = call(script, Limits(timeout_s=0.2, retries=1, backoff_s=0.01, breaker_failures=0))
    assert error.kind == "timeout" and "timed out after 0.2 s" in error.reason
    assert len(script.requests) == 2 and client.counts["retries"] == 1


@pytest.mark.parametrize("body", ["{not json", "<html>rate limited</html>", ""])
def test_malformed_json_is_retried_then_reported_as_a_bad_response(body):
    script = Script((200, body))
    error, client = call(script)
    assert error.kind == "bad_response" and "malformed JSON" in error.reason
    assert len(script.requests) == FAST.retries + 1  # bounded by the same retries as a 5xx
    assert client.counts["bad_response"] == 1 and client.counts["retry_bad_response"] == FAST.retries


def test_broken_json_then_a_good_answer_succeeds_after_a_retry():
    script = Script((200, "{broken"), (200, "<html>busy</html>"), (200, {"ok": 1}))
    result, client = call(script)
    assert result == {"ok": 1} and len(script.requests) == 3
    assert client.counts["retry_bad_response"] == 2 and client.counts["bad_response"] == 0


def test_a_parse_that_rejects_the_shape_is_retried():
    def needs_items(body: bytes):  # JSON, but not the answer asked for: as providers' parsers do
        payload = parse_json(body)
        if "items" not in payload:
            raise Retryable("no items", "bad_response")
        return payload["items"]

    result, client = call(Script((200, {"oops": 1}), (200, {"items": [1]})), parse=needs_items)
    assert result == [1] and client.counts["retry_bad_response"] == 1


def test_4xx_is_not_retried_and_carries_the_apis_message():
    script = Script((401, {"error": "Invalid API key."}))
    error, _ = call(script)
    assert error.kind == "http_4xx" and error.status == 401 and "Invalid API key." in error.reason
    assert len(script.requests) == 1


def test_huge_bodies_are_refused_with_or_without_content_length():
    big = "x" * 300_000
    error, _ = call(Script((200, big)), Limits(max_bytes=100_000, breaker_failures=0))
    assert error.kind == "too_large"

    async def chunked(request):  # no Content-Length: the cap must hold while streaming
        response = web.StreamResponse()
        await response.prepare(request)
        for _ in range(50):
            await response.write(b"y" * 10_000)
        return response

    async def main():
        async with serve([("GET", "/x", chunked)]) as url:
            with pytest.raises(ToolError, match="byte cap") as info:
                await HTTPClient("fake", Limits(max_bytes=100_000)).request("GET", url + "/x", parse=bytes)
            assert info.value.kind == "too_large"

    asyncio.run(main())


def test_circuit_breaker_opens_fails_fast_and_half_opens():
    script = Script((500, "down"))
    limits = Limits(retries=0, breaker_failures=2, breaker_reset_s=0.3)

    async def main():
        async with serve([("GET", "/x", script)]) as url:
            client = HTTPClient("fake", limits)
            for _ in range(2):
                with pytest.raises(ToolError, match="HTTP 500"):
                    await client.request("GET", url + "/x")
            with pytest.raises(ToolError, match="circuit open") as info:
                await client.request("GET", url + "/x")
            assert info.value.kind == "circuit_open" and len(script.requests) == 2  # no request was sent
            await asyncio.sleep(0.35)
            script.responses = [(200, {"ok": 1})]
            assert await client.request("GET", url + "/x") == {"ok": 1}
            assert client.counts["circuit_open"] == 1

    asyncio.run(main())


def test_after_its_reset_the_breaker_lets_one_trial_call_through():
    """After ``breaker_reset_s`` one call tries the provider while concurrent ones are refused: its failure opens
    the circuit for another ``breaker_reset_s``, its success closes it (every call had reached a dead server)."""
    script = Script((503, "down"))
    reset = 0.2
    limits = Limits(retries=0, breaker_failures=1, breaker_reset_s=reset)

    async def main():
        async with serve([("GET", "/x", script)]) as url:
            client = HTTPClient("fake", limits)

            async def kinds(n: int) -> list[str]:
                results = await asyncio.gather(*(client.request("GET", url + "/x") for _ in range(n)),
                                               return_exceptions=True)  # fmt: skip
                return sorted(getattr(r, "kind", "ok") for r in results)

            assert await kinds(1) == ["http_5xx"]  # opens the circuit
            await asyncio.sleep(reset + 0.05)
            before = time.monotonic()
            assert await kinds(8) == ["circuit_open"] * 7 + ["http_5xx"]
            assert len(script.requests) == 2 and client.breaker.open_until >= before + reset  # re-opened
            await asyncio.sleep(client.breaker.open_until - time.monotonic() + 0.05)
            script.responses = [(200, {"ok": 1})]
            assert await kinds(4) == ["circuit_open"] * 3 + ["ok"]
            assert await kinds(4) == ["ok"] * 4  # closed
            assert len(script.requests) == 7

    asyncio.run(main())


def test_a_trial_call_cut_short_by_its_deadline_lets_the_next_call_try():
    # A cancelled trial has no outcome: were it to keep the circuit half-open, every later call would be refused.
    script = Script((503, "down"), ("sleep", 5.0), (200, {"ok": 1}))

    async def main():
        async with serve([("GET", "/x", script)]) as url:
            client = HTTPClient("fake", Limits(retries=0, breaker_failures=1, breaker_reset_s=0.1))
            with pytest.raises(ToolError, match="HTTP 503"):
                await client.request("GET", url + "/x")
            await asyncio.sleep(0.15)
            trial = asyncio.create_task(client.request("GET", url + "/x"))
            while len(script.requests) < 2:  # cut short once it reached the server
                await asyncio.sleep(0.01)
            trial.cancel()
            with pytest.raises(asyncio.CancelledError):
                await trial
            assert await client.request("GET", url + "/x") == {"ok": 1}

    asyncio.run(main())


def test_concurrency_and_rate_limits():
    script = Script(("sleep", 0.1))

    async def main():
        async with serve([("GET", "/x", script)]) as url:
            client = HTTPClient("fake", Limits(concurrency=2))
            await asyncio.gather(*(client.request("GET", url + "/x") for _ in range(6)))
            assert script.max_in_flight == 2
            limited = HTTPClient("fake", Limits(rate_per_s=2.0))
            start = time.perf_counter()
            await asyncio.gather(*(limited.request("GET", url + "/x") for _ in range(4)))
            assert time.perf_counter() - start > 1.4  # one every 0.5 s

    asyncio.run(main())


def test_a_rate_below_one_per_second_spaces_calls_by_its_period():
    # Jina's anonymous 20 a minute is 0.33/s (a token bucket smaller than one call refused every call)
    started: list[float] = []

    async def stamp(request):
        started.append(time.monotonic())
        return web.json_response({"ok": 1})

    async def main():
        async with serve([("GET", "/x", stamp)]) as url:
            client = HTTPClient("slow", Limits(rate_per_s=0.5, breaker_failures=0))
            return await asyncio.gather(*(client.request("GET", url + "/x") for _ in range(2)))

    assert asyncio.run(main()) == [{"ok": 1}, {"ok": 1}]
    assert 1.8 < started[1] - started[0] < 2.8  # one call per 1 / 0.5 = 2 s


def test_rate_slots_space_starts_by_the_period_without_bursts():
    slow, fast = RateSlots(0.25), RateSlots(2.5)
    assert (slow.period, fast.period) == (4.0, 0.4)
    assert slow.claim() == 0.0 and 0.0 < slow.claim() <= 4.0  # the first starts at once, the next waits its turn
    assert fast.claim() == 0.0 and 0.0 < fast.claim() <= 0.4  # from 1/s up too: no burst of 2.5 at once


def test_the_rate_spaces_calls_across_rollout_steps():
    """Each rollout step runs its calls in a fresh event loop (``asyncio.run``): the spacing must carry over from
    one step to the next, not restart with the loop (consecutive steps' calls came 15 ms apart, 3 s asked)."""
    period, started = 0.3, []

    async def stamp(request):
        started.append(time.monotonic())
        return web.json_response({"ok": 1})

    client = HTTPClient("slow", Limits(rate_per_s=1 / period, breaker_failures=0))

    async def step():
        async with serve([("GET", "/x", stamp)]) as url:
            return await client.request("GET", url + "/x")

    assert asyncio.run(step()) == asyncio.run(step()) == {"ok": 1}
    assert started[1] - started[0] >= period / 2  # not the whole period: the first request's latency eats into it


def test_a_client_copies_with_limits_of_its_own():
    # Checkpoint hyper-parameters deep-copy the tools: the rate's and the breaker's locks must not stop that.
    client = HTTPClient("fake", Limits(rate_per_s=1.0))
    twin = copy.deepcopy(client)
    assert twin._slots is not client._slots and twin.breaker is not client.breaker
    assert twin._slots.claim() == 0.0 and twin.breaker.check("fake") is False
    # copied while a trial call of an open circuit ran: the copy's calls never end that trial, so it is not copied
    breaker = CircuitBreaker(failures=1, reset_s=0.0)
    breaker.record(False)
    assert breaker.check("fake") is True  # the trial, still running
    assert copy.deepcopy(breaker).check("fake") is True


@pytest.mark.parametrize(
    "field, value",
    [("rate_per_s", 0), ("rate_per_s", -1.0), ("rate_per_s", math.nan), ("rate_per_s", math.inf),
     ("concurrency", 0), ("timeout_s", 0.0), ("max_bytes", -5), ("retries", -1), ("backoff_s", -0.1)],
)  # fmt: skip
def test_limits_no_call_could_work_with_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"Limits\.{field} must be"):
        Limits(**{field: value})


# --- SSRF guard ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    ["file:///etc/passwd", "ftp://example.org/x", "gopher://x", "/relative", "http://127.0.0.1:8080/",
     "http://localhost/", "http://10.0.0.5/", "http://192.168.1.1/", "http://172.16.0.1/", "http://[::1]/",
     "http://169.254.169.254/latest/meta-data/", "http://0.0.0.0/", "http://[::ffff:127.0.0.1]/"],
)  # fmt: skip
def test_guard_refuses_non_http_and_non_public_targets(url):
    with pytest.raises(guard.BlockedURL):
        asyncio.run(guard.check_url(url))


def test_guard_allows_public_literals_and_private_only_when_told():
    assert asyncio.run(guard.check_url("https://93.184.215.14/page")).host == "93.184.215.14"
    assert asyncio.run(guard.check_url("http://127.0.0.1:9/", allow_private=True)).port == 9
    with pytest.raises(guard.BlockedURL):
        asyncio.run(guard.check_url("file:///etc/passwd", allow_private=True))  # scheme is never allowed


# IPv6 forms that carry or hide an IPv4 address, and ones Python's ``is_global`` misses on some versions.
# Teredo 2001:0:<server>:<flags>:<port>:<client XOR ffffffff>; 2001:0:808:808::f5ff:fffe: client 10.0.0.1.
@pytest.mark.parametrize(
    "host",
    ["fec0::1", "feff::1",                                         # site-local fec0::/10
     "2002:a9fe:a9fe::", "2002:7f00:1::1", "2002:a00:1::", "2002:6440:1::",  # 6to4 of link-local, ...
     "2001:0:808:808::f5ff:fffe", "2001:0:a00:1::f7f7:f7f7",      # Teredo, private client / server
     "::7f00:1", "::808:808",                                     # IPv4-compatible, refused outright
     "64:ff9b::a9fe:a9fe", "64:ff9b::7f00:1", "64:ff9b::a00:1",   # NAT64 well-known, private IPv4
     "64:ff9b:1::808:808", "64:ff9b:1:ffff::1"],                  # local-use NAT64, refused outright
)  # fmt: skip
def test_guard_refuses_ipv6_forms_that_reach_non_public_hosts(host):
    with pytest.raises(guard.BlockedURL, match="non-public"):
        asyncio.run(guard.check_url(f"http://[{host}]/latest/meta-data"))


@pytest.mark.parametrize(
    "host",
    ["2606:4700:4700::1111", "2a00:1450:4001:82b::200e",  # public IPv6
     "2002:808:808::", "2002:5db8:d70e::1",                 # 6to4 of 8.8.8.8 and 93.184.215.14
     "64:ff9b::808:808", "::ffff:808:808"],                 # NAT64 well-known and IPv4-mapped of 8.8.8.8
)  # fmt: skip
def test_guard_allows_ipv6_forms_that_reach_public_hosts(host):
    assert asyncio.run(guard.check_url(f"http://[{host}]/")).host == host


def test_guarded_resolver_refuses_names_of_private_addresses():
    async def main():
        resolver = guard.PublicOnlyResolver()
        with pytest.raises(guard.BlockedAddress):
            await resolver.resolve("localhost", 80)
        await resolver.close()

    asyncio.run(main())


def test_direct_reader_refuses_loopback_without_sending_anything():
    script = Script((200, "<html><body><p>secret</p></body></html>"))

    async def main():
        async with serve([("GET", "/x", script)]) as url:
            with pytest.raises(ToolError) as info:
                await DirectReader().read(url + "/x")
            assert info.value.kind == "refused"

    asyncio.run(main())
    assert script.requests == []


def test_each_redirect_hop_is_checked():
    async def redirect(request):
        raise web.HTTPFound("/secret")

    secret = Script((200, "internal"))

    async def only_public_path(url: str):
        if url.endswith("/secret"):
            raise guard.BlockedURL("the redirect target is internal")

    async def main():
        async with serve([("GET", "/start", redirect), ("GET", "/secret", secret)]) as url:
            client = HTTPClient("reader", FAST)
            with pytest.raises(ToolError, match="redirect target is internal") as info:
                await client.request("GET", url + "/start", parse=bytes, check=only_public_path)
            assert info.value.kind == "refused"
            # and a permitted redirect is followed
            assert await client.request("GET", url + "/start", parse=bytes, check=_check_scheme_async) == b"internal"

    asyncio.run(main())
    assert len(secret.requests) == 1


async def _check_scheme_async(url: str):  # lets any http(s) URL through
    return guard.check_scheme(url)


@pytest.mark.parametrize("url", ["http://[::1/x", "http://a:99999/", "http://a.com:abc/", "http://user@:80/",
                                 "http://a..b/", "http://xn--zz.com/", "http://" + "a" * 70 + ".com/"])  # fmt: skip
def test_guard_refuses_malformed_urls_instead_of_raising(url):
    # Result URLs come from third parties: a parse or IDNA error must be a refusal its caller skips, not a crash.
    with pytest.raises(guard.BlockedURL, match="the URL is malformed"):
        asyncio.run(guard.check_url(url))
    if ".." not in url and "a" * 70 not in url:  # these two fail only when the name is IDNA-encoded
        with pytest.raises(guard.BlockedURL, match="the URL is malformed"):
            asyncio.run(guard.check_url(url, allow_private=True))


def test_a_malformed_redirect_or_request_url_is_a_tool_error():
    async def redirect(request):
        return web.Response(status=302, headers={"Location": "http://[::1/x"})

    async def main():
        async with serve([("GET", "/r", redirect)]) as url:
            with pytest.raises(ToolError, match="the redirect's Location is malformed") as bad_redirect:
                await DirectReader(allow_private=True).read(url + "/r")
            client = HTTPClient("fake", FAST)
            with pytest.raises(ToolError, match=r"could not be made \(UnicodeError\)") as bad_request:
                await client.request("GET", "http://a..b/x")  # IDNA fails inside aiohttp
            return bad_redirect.value, bad_request.value, client

    bad_redirect, bad_request, client = asyncio.run(main())
    assert bad_redirect.kind == "bad_redirect" and bad_request.kind == "bad_request"
    assert client.counts["retries"] == 0  # a URL that cannot be sent does not heal on a retry
