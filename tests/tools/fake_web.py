"""Local stand-ins for the web: aiohttp servers on 127.0.0.1 answering in each provider's documented format.

Nothing here reaches the internet; every server binds 127.0.0.1 on a free port and lives inside one test's
event loop.
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from urllib.parse import quote

from aiohttp import web
from PIL import Image

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _coroutine(handler: Handler) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:  # aiohttp wants a coroutine function
        return await handler(request)

    return handle


@asynccontextmanager
async def serve(routes: list[tuple[str, str, Handler]]):
    """Yield the base URL of a server with ``(method, path, handler)`` routes; stop it afterwards."""
    app = web.Application()
    for method, path, handler in routes:
        app.router.add_route(method, path, _coroutine(handler))
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)  # hung fake handlers: do not wait
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


class Script:
    """A handler that answers with the next scripted response each time (the last one repeats) and records
    what it was asked. A response is ``(status, body)``: a dict/list body is sent as JSON, bytes/str as is;
    ``("sleep", seconds)`` waits before answering 200 ``{}``."""

    def __init__(self, *responses, headers: dict[str, str] | None = None) -> None:
        self.responses, self.headers = list(responses), headers or {}
        self.requests: list[dict] = []
        self.in_flight = self.max_in_flight = 0

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        parsed = json.loads(body) if body and request.content_type == "application/json" else None
        self.requests.append({"query": dict(request.query), "headers": dict(request.headers), "json": parsed})
        status, payload = self.responses[min(len(self.requests) - 1, len(self.responses) - 1)]
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if status == "sleep":
                await asyncio.sleep(payload)
                status, payload = 200, {}
            else:
                await asyncio.sleep(0.01)  # long enough for concurrent callers to overlap
        finally:
            self.in_flight -= 1
        if isinstance(payload, dict | list):
            return web.json_response(payload, status=status, headers=self.headers)
        return web.Response(body=payload.encode() if isinstance(payload, str) else payload, status=status,
                            headers=self.headers, content_type="text/html")  # fmt: skip


def png(color: str, size: tuple[int, int] = (40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


# Documented response shapes (trimmed to the fields the tools read, plus some they ignore).
def serpapi_google(results: list[tuple[str, str, str]]) -> dict:
    organic = [
        {"position": i, "title": t, "link": u, "snippet": s, "displayed_link": u}
        for i, (t, u, s) in enumerate(results, 1)
    ]
    return {
        "search_metadata": {"status": "Success"},
        "search_parameters": {"engine": "google"},
        "organic_results": organic,
    }


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


# --- providers that quote the credentials they were sent (issue #18) ------------------------------------------
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
