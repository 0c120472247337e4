"""A scripted handler for the tests' own routes; the providers' formats, ``serve`` and the fault-injecting
``FakeWeb`` live in ``mmsr.tools.web.fake`` (shared with the soak benchmark and offline demos)."""

from __future__ import annotations

import asyncio
import json

from aiohttp import web
from multidict import CIMultiDict


class Script:
    """A handler that answers with the next scripted response each time (the last one repeats) and records
    what it was asked (headers by case-insensitive name, as HTTP reads them). A response is ``(status, body)``: a dict/list body is sent as JSON, bytes/str as is;
    ``("sleep", seconds)`` waits before answering 200 ``{}``."""

    def __init__(self, *responses, headers: dict[str, str] | None = None) -> None:
        self.responses, self.headers = list(responses), headers or {}
        self.requests: list[dict] = []
        self.in_flight = self.max_in_flight = 0

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        parsed = json.loads(body) if body and request.content_type == "application/json" else None
        self.requests.append({"query": dict(request.query), "headers": CIMultiDict(request.headers), "json": parsed})
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


def broken_png() -> bytes:
    """A PNG whose IDAT chunk claims 5 bytes: Pillow then reads garbage as the next chunk and raises
    ``SyntaxError`` ("broken PNG file"), not ``OSError``: the kind of corrupt thumbnail the web serves."""
    from mmsr.tools.web.fake import png

    data = png("red", (17, 13))
    at = data.index(b"IDAT") - 4
    return data[:at] + (5).to_bytes(4, "big") + data[at + 4 :]
