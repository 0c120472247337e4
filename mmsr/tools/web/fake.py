"""A local fake of the web providers, with faults: for tests, soaks and offline demos.

Everything answers on 127.0.0.1 in the providers' documented formats (trimmed to the fields the tools read,
plus a few they ignore): SerpAPI Google and Google Lens, Serper, a Jina reader, an OpenAI-compatible
summarizer and an image host for Lens thumbnails. Nothing here reaches the internet.

``FakeWeb`` serves all of them on one app and injects a fault into a share of the requests (``fault_rate``,
30% by default), the kind drawn per request from ``FAULTS``: 429 and 5xx answers, hangs (longer than any
sane per-attempt timeout), truncated JSON, HTML error pages sent with 200, bodies too large to read, and
answers that quote the API key the request carried (a 401 body, a 200 ``error`` field, or a good answer
whose titles, page text or summary hold the key). The image host has no key to echo, so it draws only
among the first six. A route sends no 401 before it has given ``refuse_after`` good answers: a provider that
refuses its key before it has ever answered stops the run (``ProviderRefused``), and the fake's 401s stand
for one refused mid-run. ``FakeWeb`` counts the requests and the faults it injected per route and serves the
counts at ``GET /_stats``: a soak checks them against what the clients saw (``benchmarks/soak.py``).

``python -m mmsr.tools.web.fake --port 0 --fault-rate 0.3`` serves it until SIGTERM; point the tools at
``{url}/serpapi/search.json``, ``{url}/serper/search``, ``{url}/jina/`` and ``{url}/v1`` (summarizer).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import random
import signal
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import quote

from aiohttp import web
from PIL import Image

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
FAULTS = ("http_429", "http_5xx", "hang", "truncated", "html_200", "huge", "echo_401", "echo_error", "echo_content")
KEYLESS_FAULTS = FAULTS[:6]
HTML_ERROR = b"<html><head><title>503</title></head><body><h1>Service Unavailable</h1></body></html>"


# --- serving ---------------------------------------------------------------------------------------------------
@asynccontextmanager
async def serve_app(app: web.Application, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
    """Yield the base URL of ``app`` served on ``host:port`` (0: a free port); stop it afterwards."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)  # hung handlers: do not wait for them
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    try:
        yield f"http://{host}:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def _coroutine(handler: Handler) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:  # aiohttp wants a coroutine function
        return await handler(request)

    return handle


def serve(routes: list[tuple[str, str, Handler]]):
    """``serve_app`` over ``(method, path, handler)`` routes (a test's own handlers)."""
    app = web.Application()
    for method, path, handler in routes:
        app.router.add_route(method, path, _coroutine(handler))
    return serve_app(app)


# --- documented response shapes --------------------------------------------------------------------------------
def png(color: str, size: tuple[int, int] = (40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def serpapi_google(results: list[tuple[str, str, str]]) -> dict:
    organic = [{"position": i, "title": t, "link": u, "snippet": s, "displayed_link": u}
               for i, (t, u, s) in enumerate(results, 1)]  # fmt: skip
    return {"search_metadata": {"status": "Success"}, "search_parameters": {"engine": "google"},
            "organic_results": organic}  # fmt: skip


def serper(results: list[tuple[str, str, str]]) -> dict:
    organic = [{"title": t, "link": u, "snippet": s, "position": i} for i, (t, u, s) in enumerate(results, 1)]
    return {"searchParameters": {"q": "...", "type": "search", "engine": "google"}, "organic": organic, "credits": 1}


def serpapi_lens(matches: list[tuple[str, str]]) -> dict:
    visual = [{"position": i, "title": t, "link": f"https://site{i}.example/page", "source": "Site",
               "thumbnail": thumb, "image": thumb} for i, (t, thumb) in enumerate(matches, 1)]  # fmt: skip
    return {"search_metadata": {"status": "Success"}, "visual_matches": visual}


def jina(title: str, url: str, content: str) -> dict:
    return {"code": 200, "status": 20000, "data": {"title": title, "description": "", "url": url, "content": content,
                                                    "usage": {"tokens": len(content) // 4}}}  # fmt: skip


def chat_completion(content: str, total_tokens: int = 100) -> dict:
    return {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "summarizer",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": total_tokens - 20, "completion_tokens": 20, "total_tokens": total_tokens},
    }  # fmt: skip


# --- providers that quote the credentials they were sent (issue #18) -------------------------------------------
def sent_key(request: web.Request) -> str:
    """The key a request carried: SerpAPI's ``api_key`` parameter, Serper's header, or a bearer token."""
    bearer = request.headers.get("Authorization", "").removeprefix("Bearer ")
    return request.query.get("api_key") or request.headers.get("X-API-KEY") or bearer


async def echo_401(request: web.Request) -> web.Response:
    """A 401 whose body quotes the key, as some APIs answer a key they refuse."""
    return web.json_response({"error": f"Invalid API key {sent_key(request)}, check your dashboard"}, status=401)


async def echo_200_error(request: web.Request) -> web.Response:
    """A 200 with an ``error`` field that quotes the key, cut short, and again URL-encoded."""
    key = sent_key(request)
    return web.json_response({"error": f"Account {key[:14]}... out of searches (key={quote(key, safe='')})"})


def echo_results(n: int) -> Handler:
    """Serper/SerpAPI results whose titles and links quote the key the search was sent with."""

    async def handle(request: web.Request) -> web.Response:
        key = sent_key(request)
        results = [(f"Page {i} for {key}", f"http://127.0.0.1:1/p{i}?k={key}", "") for i in range(1, n + 1)]
        return web.json_response(serper(results) | serpapi_google(results))

    return handle


async def echo_page(request: web.Request) -> web.Response:
    """A Jina answer whose page text quotes the bearer key the reader sent (a page echoing its request)."""
    url = (await request.json())["url"]
    return web.json_response(jina(f"Title {sent_key(request)}", url, f"Debug: you sent {sent_key(request)}. " * 5))


async def echo_summary(request: web.Request) -> web.Response:
    """A chat completion that quotes the page it got and the summarizer's own bearer key."""
    page = (await request.json())["messages"][1]["content"].split("Web page:\n", 1)[1]
    return web.json_response(chat_completion(f"Summary of {page[:80]} (auth {sent_key(request)})"))


# --- every provider on one app, with faults --------------------------------------------------------------------
Answer = Callable[[str | None], Any]  # the good answer (JSON object, HTML text or image bytes), quoting a key if given


def _encode(body: Any) -> tuple[bytes, str]:
    if isinstance(body, bytes):
        return body, "image/png"
    if isinstance(body, str):
        return body.encode(), "text/html"
    return json.dumps(body).encode(), "application/json"


class FakeWeb:
    """All providers on one aiohttp app; a ``fault_rate`` share of requests gets a fault (module docstring).

    Routes are named after the ``HTTPClient`` that calls them, so counts compare one to one: ``serpapi_google``
    and ``serpapi_lens`` (GET ``/serpapi/search.json``, by ``engine``), ``serper`` (POST ``/serper/search``),
    ``jina_reader`` (POST ``/jina/``), ``summarizer`` (POST ``/v1/chat/completions``), ``thumbnails`` (GET
    ``/thumb/{i}.png``) and ``direct_reader`` (GET ``/page/{i}``, HTML for ``DirectReader``).

    Args:
        fault_rate: share of requests answered with a fault.
        faults: the kinds drawn from, uniformly (``FAULTS``; keyless routes keep only ``KEYLESS_FAULTS``).
        hang_s: how long a hang waits before answering (make it longer than the clients' timeouts).
        huge_bytes: size of a too-large body (streamed without a length; make it larger than their caps).
        results: results per search (and matches per Lens search).
        seed: seeds the fault draws.
        refuse_after: good answers a route gives before it may draw ``echo_401``. A client has at most its
            ``Limits.concurrency`` calls in flight, so with at least that many one of them has come back (and
            the provider has answered) before the first 401 does; the default covers the repository's configs.
    """

    def __init__(self, fault_rate: float = 0.3, faults: Sequence[str] = FAULTS, hang_s: float = 30.0,
                 huge_bytes: int = 8_000_000, results: int = 5, seed: int = 0,
                 refuse_after: int = 64) -> None:  # fmt: skip
        if unknown := set(faults) - set(FAULTS):
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {FAULTS}")
        self.fault_rate, self.faults, self.hang_s, self.huge_bytes = fault_rate, tuple(faults), hang_s, huge_bytes
        self.results, self.rng, self.refuse_after = results, random.Random(seed), refuse_after
        self.requests: Counter[str] = Counter()
        self.good: Counter[str] = Counter()  # answers sent without a fault, per route
        self.injected: defaultdict[str, Counter[str]] = defaultdict(Counter)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/serpapi/search.json", self._serpapi)
        app.router.add_post("/serper/search", self._serper)
        app.router.add_post("/jina/", self._jina)
        app.router.add_post("/v1/chat/completions", self._summarizer)
        app.router.add_get("/thumb/{i}.png", self._thumbnail)
        app.router.add_get("/page/{i}", self._page)
        app.router.add_get("/_stats", self._stats)
        return app

    def stats(self) -> dict[str, Any]:
        """Requests and injected faults per route (what ``GET /_stats`` answers)."""
        return {"fault_rate": self.fault_rate, "requests": dict(self.requests),
                "injected": {route: dict(kinds) for route, kinds in self.injected.items()}}  # fmt: skip

    def draw(self, route: str, keyless: bool = False) -> str | None:
        """Count a request on ``route``; the fault to inject into it, or None."""
        self.requests[route] += 1
        kinds = [k for k in self.faults if k in KEYLESS_FAULTS] if keyless else self.faults
        if self.good[route] < self.refuse_after:  # a 401 before any answer would stop the run (module docstring)
            kinds = [k for k in kinds if k != "echo_401"]
        if not kinds or self.rng.random() >= self.fault_rate:
            self.good[route] += 1
            return None
        fault = self.rng.choice(kinds)
        self.injected[route][fault] += 1
        return fault

    async def respond(self, request: web.Request, route: str, answer: Answer,
                      keyless: bool = False) -> web.StreamResponse:  # fmt: skip
        """Answer ``request`` with ``answer``, or with the fault drawn for it."""
        fault = self.draw(route, keyless)
        if fault == "http_429":
            return web.json_response({"error": "Too many requests"}, status=429, headers={"Retry-After": "1"})
        if fault == "http_5xx":
            return web.json_response({"error": "upstream failed"}, status=self.rng.choice((500, 502, 503)))
        if fault in ("echo_401", "echo_error"):
            return await (echo_401 if fault == "echo_401" else echo_200_error)(request)
        if fault == "huge":
            return await self._huge(request)
        if fault == "hang":
            await asyncio.sleep(self.hang_s)
        data, ctype = _encode(answer(sent_key(request) if fault == "echo_content" else None))
        if fault == "truncated":
            data = data[: len(data) // 2]
        if fault == "html_200":
            data, ctype = HTML_ERROR, "text/html"
        return web.Response(body=data, content_type=ctype)

    async def _huge(self, request: web.Request) -> web.StreamResponse:
        """``huge_bytes`` of filler sent in chunks without a length, so the client must cap what it reads."""
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        chunk = b" " * 65536
        try:
            for _ in range(0, self.huge_bytes, len(chunk)):
                await response.write(chunk)
        except (ConnectionError, RuntimeError):  # the client stopped reading at its cap and closed
            pass
        return response

    def _results(self, request: web.Request, query: str, key: str | None) -> list[tuple[str, str, str]]:
        base, tag, k = f"{request.scheme}://{request.host}", f" for {key}" if key else "", f"&k={key}" if key else ""
        return [(f"{query} result {i}{tag}", f"{base}/page/{i}?q={quote(query)}{k}", f"About {query}, part {i}.")
                for i in range(1, self.results + 1)]  # fmt: skip

    def _matches(self, request: web.Request, key: str | None) -> list[tuple[str, str]]:
        base, tag = f"{request.scheme}://{request.host}", f" {key}" if key else ""
        return [(f"Match {i}{tag}", f"{base}/thumb/{i}.png") for i in range(1, self.results + 1)]

    async def _serpapi(self, request: web.Request) -> web.StreamResponse:
        if request.query.get("engine") == "google_lens":
            return await self.respond(request, "serpapi_lens", lambda key: serpapi_lens(self._matches(request, key)))
        query = request.query.get("q", "")
        return await self.respond(request, "serpapi_google",
                                  lambda key: serpapi_google(self._results(request, query, key)))  # fmt: skip

    async def _serper(self, request: web.Request) -> web.StreamResponse:
        query = str((await request.json()).get("q", ""))
        return await self.respond(request, "serper", lambda key: serper(self._results(request, query, key)))

    async def _jina(self, request: web.Request) -> web.StreamResponse:
        url = str((await request.json()).get("url", ""))
        text = f"This page ({url}) is about the question. It names the answer in its second sentence. " * 3

        def page(key: str | None) -> dict:
            return jina(f"Page {key}" if key else "Page", url, text + (f"Debug: you sent {key}." if key else ""))

        return await self.respond(request, "jina_reader", page)

    async def _summarizer(self, request: web.Request) -> web.StreamResponse:
        page = str((await request.json())["messages"][1]["content"]).split("Web page:\n", 1)[-1]
        summary = f"Summary: {page[:60]}"
        return await self.respond(request, "summarizer",
                                  lambda key: chat_completion(summary + (f" (auth {key})" if key else "")))  # fmt: skip

    async def _thumbnail(self, request: web.Request) -> web.StreamResponse:
        color = ("red", "green", "blue", "orange", "purple")[int(request.match_info["i"]) % 5]
        return await self.respond(request, "thumbnails", lambda key: png(color), keyless=True)

    async def _page(self, request: web.Request) -> web.StreamResponse:
        title, body = f"Page {request.match_info['i']}", "A paragraph of this page. " * 20
        html = f"<html><head><title>{title}</title></head><body><p>{body}</p></body></html>"
        return await self.respond(request, "direct_reader", lambda key: html, keyless=True)

    async def _stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats())


async def _serve_forever(fake: FakeWeb, host: str, port: int) -> None:
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    async with serve_app(fake.app(), host, port) as url:
        print(f"fake web on {url}", flush=True)
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    """``python -m mmsr.tools.web.fake [--port 0] [--fault-rate 0.3] ...``: serve ``FakeWeb`` until SIGTERM."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--fault-rate", type=float, default=0.3)
    parser.add_argument("--faults", default=",".join(FAULTS), help="comma-separated kinds to draw from")
    parser.add_argument("--hang-s", type=float, default=30.0)
    parser.add_argument("--huge-bytes", type=int, default=8_000_000)
    parser.add_argument("--results", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--refuse-after", type=int, default=64, help="good answers per route before a 401")
    a = parser.parse_args(argv)
    faults = [f for f in a.faults.split(",") if f]
    fake = FakeWeb(a.fault_rate, faults, a.hang_s, a.huge_bytes, a.results, a.seed, a.refuse_after)
    asyncio.run(_serve_forever(fake, a.host, a.port))


if __name__ == "__main__":
    main()
