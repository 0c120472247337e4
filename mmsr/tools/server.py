"""``mmsr serve-search``: the configured search backends and their shared cache behind a small JSON API.

Many trainer and evaluation processes then share one cache, one rate limit and one budget: they use
``HTTPSearchTool`` (a ``SearchTool``) pointed at the server instead of calling the providers themselves.

API (JSON): ``POST /v1/search`` with a ``ToolRequest`` (image as base64 PNG) -> a ``ToolResult`` (thumbnails
as base64 PNG); ``GET /v1/metrics`` -> the backends' counters (``tools/<kind>/...``, as the trainer logs
them); ``GET /health`` (no token needed; the backends' names); ``GET /v1/ready?kind=<kind>`` -> the clients' start-up
check (the token, and that backend; a server from before it answers 404 there, and the client checks the backend with
``/health`` and the token with ``/v1/metrics`` instead); with ``&budget_s=<s>`` it also checks that the backend's
nested timeouts fit the budget the client's requests will bring (422 naming the backend and the seconds it needs:
the client raises ``BudgetError`` at start-up, as ``mmsr fit`` does for a local tool). Errors are
``{"error": message}`` with 400 (bad request, naming the field), 401 (token), 404 (no such backend), 422 (a budget
too small) or 409
(a backend's ``FatalToolError``: a replay-only miss, an unreadable FVQA cache file; the client raises it again, so a
misconfigured server stops the trainer as a local backend would instead of training on failed searches). A 401,
403 or 404 stops the trainer too (``ServerRefused``: the client's token, URL or backend is wrong). Binds
127.0.0.1 by default; with ``token_env`` set in the environment every request but ``/health`` needs
``Authorization: Bearer <token>``. SIGINT/SIGTERM stop accepting connections and let requests in flight finish
(up to ``shutdown_timeout_s``).

A request carries the client's time budget (``budget_s``, the rollout's cap less the client's ``reserve_s``
for the round trip), so the backends answer before the trainer gives up. Every answer is redacted of the
server's keys (``mmsr.tools.secrets``): results at construction, error messages here, logs by the filter.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import io
import logging
import math
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiohttp import web
from PIL import Image

from mmsr.tools.base import FatalToolError, SearchTool, ToolRequest, ToolResult, check_ready, failure
from mmsr.tools.budget import BudgetError, check_budgets, with_budget_left
from mmsr.tools.cache import ReplayMiss, filed_under
from mmsr.tools.secrets import install_log_redaction, redact, register_secret_env
from mmsr.tools.web.http import REFUSALS, HTTPClient, Limits, ToolError

log = logging.getLogger(__name__)
KINDS = ("image_search", "text_search")


def _png64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _image64(data: str, field: str) -> Image.Image:
    try:
        return Image.open(io.BytesIO(base64.b64decode(data, validate=True))).convert("RGB")
    except Exception as exc:  # a corrupt image makes Pillow raise SyntaxError, EOFError ...: a bad request all the same
        raise ValueError(f"field {field!r}: not a base64-encoded image ({type(exc).__name__})") from None


def request_to_json(request: ToolRequest) -> dict[str, Any]:
    image = _png64(request.image) if request.image is not None else None
    budget = request.budget_s  # an infinite budget (tool_timeout_s: .inf) is no cap; JSON has no infinity
    return {"kind": request.kind, "query": request.query, "image": image, "image_url": request.image_url,
            "sample_id": request.sample_id, "question": request.question,
            "budget_s": None if budget is None or math.isinf(budget) else budget}  # fmt: skip


def _error(message: str, status: int) -> web.Response:
    return web.json_response({"error": redact(message)}, status=status)


def request_from_json(body: Any) -> ToolRequest:
    """A ``ToolRequest`` from a JSON body; ``ValueError`` naming the bad field."""
    if not isinstance(body, dict):
        raise ValueError("the body must be a JSON object")
    if body.get("kind") not in KINDS:
        raise ValueError(f"field 'kind': must be one of {KINDS}, got {body.get('kind')!r:.40}")
    query, sample_id, question = (_text(body, field) for field in ("query", "sample_id", "question"))
    image_url, budget = _text(body, "image_url", nullable=True), _budget(body.get("budget_s"))
    data = body.get("image")
    if data is not None and not isinstance(data, str):
        raise ValueError("field 'image': must be a base64 string or null")
    image = _image64(data, "image") if data else None
    if body["kind"] == "image_search" and image is None and not image_url:  # a client's fault: no backend traceback
        raise ValueError("fields 'image' and 'image_url': an image_search needs one of them")
    return ToolRequest(body["kind"], query, image, image_url, sample_id, question, budget)


def _text(body: dict, field: str, nullable: bool = False) -> str | None:
    """``body[field]``, a string (absent: "", or None if ``nullable``); ``ValueError`` naming the field."""
    value = body.get(field, None if nullable else "")
    if value is None and nullable:
        return None
    if not isinstance(value, str):
        raise ValueError(f"field {field!r}: must be a string{' or null' if nullable else ''}")
    try:  # JSON may carry a lone surrogate ("\ud800"): no backend, HTTP call or cache could encode it
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"field {field!r}: not valid Unicode (lone surrogate at character {exc.start})") from None
    return value


def _budget(budget: Any) -> float | None:
    """``budget_s`` as seconds, None for no cap; ``ValueError`` naming the field."""
    if budget is None:
        return None
    if isinstance(budget, bool) or not isinstance(budget, int | float) or not budget > 0:
        raise ValueError("field 'budget_s': must be a positive number or null")  # NaN included
    try:
        budget = float(budget)
    except OverflowError:  # an integer of hundreds of digits: json reads it exactly, float() cannot hold it
        raise ValueError("field 'budget_s': too large a number of seconds (null: no cap)") from None
    return None if budget == math.inf else budget  # Python's json reads Infinity (and 1e400) as inf: no cap


def _query_budget(text: str | None) -> float | None:
    """``?budget_s=`` as seconds, None when absent or infinite (no cap); ``ValueError`` naming the field."""
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"field 'budget_s': must be a positive number, got {text!r:.40}") from None
    return _budget(value)


def result_to_json(result: ToolResult) -> dict[str, Any]:
    body = {"text": result.text, "images": [_png64(i) for i in result.images], "ok": result.ok,
            "latency_s": result.latency_s, "cost": result.cost, "titles": list(result.titles)}  # fmt: skip
    if result.partial:  # only then: a client's own cache must not keep it either; other answers stay as they were
        body["partial"] = True
    if not result.sent:  # likewise: a client's own budget gives the call back
        body["sent"] = False
    return body


def result_from_json(body: Any) -> ToolResult:
    """A ``ToolResult`` from the server's answer; ``ToolError`` if it is not one."""
    try:
        images = tuple(_image64(d, "images") for d in body["images"])
        return ToolResult(str(body["text"]), images, bool(body["ok"]), float(body["latency_s"]), float(body["cost"]),
                          tuple(str(t) for t in body["titles"]), bool(body.get("partial", False)),
                          bool(body.get("sent", True)))  # fmt: skip
    except (KeyError, TypeError, ValueError) as exc:
        raise ToolError(f"the search server's answer is not a tool result ({exc})", "bad_response") from None


class SearchServer:
    """The server. Backends are ``SearchTool`` objects (usually a ``CachedTool`` around a web tool).

    Args:
        image_search: backend for ``image_search`` requests (``None``: 404).
        text_search: backend for ``text_search`` requests.
        host: interface to bind; 127.0.0.1 keeps it on this machine.
        port: TCP port (0 picks a free one).
        token_env: environment variable with the bearer token; unset or empty: no token is required.
        max_request_mb: largest request body (the question image travels in it).
        shutdown_timeout_s: how long requests in flight may take to finish on shutdown.
    """

    def __init__(self, image_search: SearchTool | None = None, text_search: SearchTool | None = None,
                 host: str = "127.0.0.1", port: int = 8765, token_env: str | None = "MMSR_SEARCH_TOKEN",
                 max_request_mb: float = 32.0, shutdown_timeout_s: float = 30.0) -> None:  # fmt: skip
        # here, not at bind: serve() built its backends first, then ended in socket's OverflowError naming no setting
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"SearchServer.port must be in 0..65535 (0: any free port), got {port!r}")
        self.tools = {k: t for k, t in zip(KINDS, (image_search, text_search)) if t is not None}
        self.host, self.port, self.shutdown_timeout_s = host, port, shutdown_timeout_s
        self.max_request_bytes = int(max_request_mb * 2**20)
        self._token = os.environ.get(token_env, "").strip() if token_env else ""
        register_secret_env(token_env)
        install_log_redaction()
        self._runner: web.AppRunner | None = None
        self.requests = 0
        self._budget_warned: set[tuple[str, int]] = set()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.max_request_bytes, middlewares=[self._auth])
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/ready", self._ready)
        app.router.add_get("/v1/metrics", self._metrics)
        app.router.add_post("/v1/search", self._search)
        return app

    @web.middleware
    async def _auth(self, request: web.Request, handler):
        if self._token and request.path != "/health":
            scheme, _, given = request.headers.get("Authorization", "").strip().partition(" ")
            # aiohttp keeps undecodable header bytes as surrogates: encoded back, they compare (unequal), not raise
            given = given.strip().encode("utf-8", "surrogateescape")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given, self._token.encode()):
                return _error("missing or wrong bearer token", 401)
        return await handler(request)

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "backends": sorted(self.tools)})

    async def _ready(self, request: web.Request) -> web.Response:
        """A client's start-up check: the middleware has checked its token; ``?kind=`` names the backend it
        asks for (absent: any). The same 404 as a search of a missing backend, so the client says the same.
        ``?budget_s=`` (a client's cap less its round-trip reserve; absent, as older clients send it: not checked):
        422 with the backend's ``BudgetError`` (naming it and the seconds it needs) when its nested timeouts cannot
        fit, as ``mmsr fit`` refuses a local tool; only the server knows its backends' limits."""
        kind = request.query.get("kind")
        if not self.tools or (kind is not None and kind not in self.tools):
            return _error(f"no {kind or 'search':.40} backend is configured", 404)
        try:
            budget = _query_budget(request.query.get("budget_s"))
        except ValueError as exc:
            return _error(f"bad request: {exc}", 400)
        if budget is not None:
            try:
                check_budgets({k: tool for k, tool in self.tools.items() if kind in (None, k)}, budget)
            except BudgetError as exc:
                return _error(str(exc), 422)
        return web.json_response({"status": "ok", "backends": sorted(self.tools)})

    async def _metrics(self, request: web.Request) -> web.Response:
        out: dict[str, float] = {"server/requests": float(self.requests)}
        for kind, tool in self.tools.items():  # per kind, as the trainer logs them: both have tools/api_calls
            if hasattr(tool, "metrics"):
                out |= filed_under(kind, tool.metrics(), self.tools)
        return web.json_response(out)

    async def _search(self, request: web.Request) -> web.Response:
        self.requests += 1
        try:
            tool_request = request_from_json(await request.json())
        except ValueError as exc:  # also malformed JSON (json.JSONDecodeError is a ValueError)
            return _error(f"bad request: {exc}", 400)
        except RecursionError:  # json's parser recurses once per level of nesting
            return _error("bad request: the body's JSON is nested too deeply", 400)
        tool = self.tools.get(tool_request.kind)
        if tool is None:
            return _error(f"no {tool_request.kind} backend is configured", 404)
        self._check_budget(tool_request.kind, tool, tool_request.budget_s)
        try:
            result = await tool(tool_request)
        except FatalToolError as exc:
            return _error(f"{type(exc).__name__}: {exc}", 409)
        except Exception as exc:  # a backend bug answers as a failed search, as in the rollout loop
            log.exception("search backend %s failed", tool_request.kind)
            result = failure(tool_request.kind, f"{type(exc).__name__}: {exc}")
        return web.json_response(result_to_json(result))

    def _check_budget(self, kind: str, tool: SearchTool, budget_s: float | None) -> None:
        """Warn once per budget that the clients' cap cannot fit this backend (it still does what it can)."""
        if budget_s is None or not hasattr(tool, "check_budget") or (kind, round(budget_s)) in self._budget_warned:
            return
        try:
            tool.check_budget(budget_s)
        except BudgetError as exc:
            self._budget_warned.add((kind, round(budget_s)))
            log.warning("%s: a client's budget is too small, calls will fail or come back short: %s", kind, exc)

    async def start(self) -> int:
        """Start listening; returns the bound port (after the backends' start-up check, ``check_ready``)."""
        check_ready(self.tools)
        if not self._token and self.host not in ("127.0.0.1", "localhost", "::1"):
            log.warning("search server on %s without a bearer token: anyone who can reach it can spend your API budget",
                        self.host)  # fmt: skip
        self._runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=self.shutdown_timeout_s)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self.port

    async def stop(self) -> None:
        """Stop accepting, let requests in flight finish, close."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def serve(self) -> None:
        """Run until SIGINT or SIGTERM, then shut down gracefully."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        port = await self.start()
        print(
            f"mmsr search server on http://{self.host}:{port} (backends: {', '.join(sorted(self.tools))})", flush=True
        )
        await stop.wait()
        await self.stop()
        print("mmsr search server stopped", flush=True)


class RemoteFatalError(FatalToolError):
    """A search server's backend raised a ``FatalToolError`` other than a replay miss (its message says which)."""


class ServerRefused(FatalToolError):
    """The search server refused the client itself: a wrong or missing token (401/403) or a wrong URL or
    backend (404). Every call would fail the same way, so the run stops instead of teaching the model that
    search never works."""


class ServerNotReady(FatalToolError):
    """The start-up check got no good answer from the search server: nothing answers at the client's URL (not
    started, a wrong host or port, too slow for a trivial request) or it failed that request (a 5xx ...)."""


class HTTPSearchTool:
    """``SearchTool`` that asks a ``SearchServer``.

    Args:
        url: the server's root URL.
        token_env: environment variable with the bearer token (unset: none sent).
        limits: timeout (a text search reads and summarizes pages: allow minutes), retries, concurrency.
        reserve_s: seconds of the request's budget kept for the round trip; the server gets the rest.
        kind: the backend this client's tool asks for (``image_search`` / ``text_search``): the start-up check
            (``check_ready``) then checks the server configures it; ``None``: that it configures any.
        question_focused: the server's text search writes its summaries for the request's question (a
            ``WebTextSearch`` does), so a ``CachedTool`` around this client keys text searches on the question too
            (``mmsr.tools.base.depends_on_question``) and never serves one question's summaries to another.
            ``False`` only for a server whose text search reads the query alone (replay, local search, an FVQA
            cache): its client cache then hits across questions. Image searches are keyed on the image either way.
    """

    def __init__(self, url: str = "http://127.0.0.1:8765", token_env: str | None = "MMSR_SEARCH_TOKEN",
                 limits: Limits = Limits(timeout_s=300.0, retries=2, concurrency=64, max_bytes=64_000_000),
                 reserve_s: float = 1.0, kind: str | None = None, question_focused: bool = True) -> None:  # fmt: skip
        if kind is not None and kind not in KINDS:
            raise ValueError(f"HTTPSearchTool.kind must be one of {KINDS} or null, got {kind!r}")
        self.url, self.token_env, self.reserve_s, self.kind = url.rstrip("/"), token_env, reserve_s, kind
        self.question_focused = question_focused  # read by a client-side cache (depends_on_question)
        self.provider_name = f"server:{self.url}"
        self.client = HTTPClient("search_server", limits)
        register_secret_env(token_env)

    def check_budget(self, cap_s: float) -> None:
        """``BudgetError`` when ``cap_s`` leaves the server nothing after the round trip's reserve, or when the
        server's backend cannot fit the rest: the backends' limits live in the server's config, so the server
        checks them (``GET /v1/ready?budget_s=``), naming the backend and the seconds it needs. A server that
        cannot be asked (not running, a wrong token, from before the check) passes here: ``check_ready``, run at
        start-up too, says what is wrong with it; an older server ignores ``budget_s`` and says ready."""
        if cap_s <= self.reserve_s:
            raise BudgetError(f"HTTPSearchTool: rollout.tool_timeout_s={cap_s:g} s leaves the search server "
                              f"nothing after the {self.reserve_s:g} s round-trip reserve")  # fmt: skip
        if math.isinf(cap_s):  # no cap: nothing to fit
            return
        with ThreadPoolExecutor(1) as pool:  # its own loop, as ``check_ready``
            pool.submit(asyncio.run, self._check_budget(cap_s)).result()

    async def _check_budget(self, cap_s: float) -> None:
        budget = cap_s - self.reserve_s  # what each request will bring (``__call__``)
        params = {"budget_s": repr(budget)} | ({"kind": self.kind} if self.kind else {})
        try:
            await self._check_client().request("GET", f"{self.url}/v1/ready", params=params, headers=self._headers())
        except ToolError as exc:
            if exc.status == 422:
                raise BudgetError(f"search server {self.url} cannot answer within rollout.tool_timeout_s={cap_s:g} s "
                                  f"(its backends get {budget:g} s after the {self.reserve_s:g} s round-trip "
                                  f"reserve): {exc.detail or exc.reason}") from None  # fmt: skip
            log.debug("budget check of search server %s skipped (%s): check_ready reports it", self.url, exc.reason)

    def check_ready(self) -> None:
        """One ``GET /v1/ready`` at start-up, before the model loads: ``ServerRefused`` (as a search would raise
        it) for a wrong token, URL or backend, ``ServerNotReady`` when nothing answers. A 404 there is checked with
        ``GET /health`` (``_check_older``). Its own event loop in a worker thread, so it runs whether or not the
        caller has a loop running (the search server's start)."""
        with ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, self._check_ready()).result()

    def _check_client(self) -> HTTPClient:
        """A client of the start-up checks' own: they must not count in the tool's metrics nor open its breaker."""
        limits = Limits(timeout_s=min(self.client.limits.timeout_s, 30.0), retries=0, breaker_failures=0)
        return HTTPClient("search_server", limits)

    async def _check_ready(self) -> None:
        client, params = self._check_client(), {"kind": self.kind} if self.kind else {}
        try:
            await client.request("GET", f"{self.url}/v1/ready", params=params, headers=self._headers())
        except ToolError as exc:
            if exc.status != 404:
                raise self._not_ready(exc) from None
            await self._check_older(client, exc)

    async def _check_older(self, client: HTTPClient, missing: ToolError) -> None:
        """``/v1/ready`` answered 404 (``missing``): the server lacks the client's backend, or it predates that
        route (``/health`` and ``/v1/metrics`` are older): its ``/health`` lists its backends, and ``/v1/metrics``
        checks the token as ``/v1/ready`` does. Nothing there answering ``/health`` is no search server."""
        try:
            health = await client.request("GET", f"{self.url}/health")
        except ToolError:  # not found, not JSON
            health = None
        backends = health.get("backends") if isinstance(health, dict) else None
        if not isinstance(backends, list):
            raise ServerRefused(f"{self.url} is no mmsr search server (GET /v1/ready: {missing.reason}; GET /health "
                                "lists no backends): check HTTPSearchTool.url")  # fmt: skip
        if not backends or (self.kind is not None and self.kind not in backends):
            raise ServerRefused(self._refusal(missing, self.kind or "search"))
        try:
            await client.request("GET", f"{self.url}/v1/metrics", headers=self._headers())
        except ToolError as exc:
            raise self._not_ready(exc) from None

    def _not_ready(self, exc: ToolError) -> FatalToolError:
        """The start-up check's error for a failed request: a refusal, nothing listening, or another failure."""
        if exc.status in REFUSALS:
            return ServerRefused(self._refusal(exc, self.kind or "search"))
        if exc.kind in ("network", "timeout", "bad_request"):
            return ServerNotReady(f"nothing answers at search server {self.url} ({exc.reason}): start "
                                  "`mmsr serve-search` there or fix HTTPSearchTool.url")  # fmt: skip
        return ServerNotReady(f"search server {self.url} failed the start-up check ({exc.reason})")

    def _headers(self) -> dict[str, str]:
        token = os.environ.get(self.token_env, "").strip() if self.token_env else ""
        return {"Authorization": f"Bearer {token}"} if token else {}

    async def __call__(self, request: ToolRequest) -> ToolResult:
        started, body = time.perf_counter(), request_to_json(request)  # the image is encoded once, for all attempts

        def with_time_left() -> dict[str, Any]:  # each attempt: a retry must not aim past the caller's cap
            return {"json": body | {"budget_s": self._budget_left(request, started)}}

        try:
            answer = await self.client.request(
                "POST", f"{self.url}/v1/search", headers=self._headers(), fresh=with_time_left
            )
            return result_from_json(answer)
        except ToolError as exc:
            if exc.status == 409:
                raise (ReplayMiss if "ReplayMiss" in exc.reason else RemoteFatalError)(exc.reason) from None
            if exc.status in REFUSALS:
                raise ServerRefused(self._refusal(exc, request.kind)) from None
            return failure(request.kind, exc.reason, sent=exc.sent)

    def _budget_left(self, request: ToolRequest, started: float) -> float | None:
        """The server's ``budget_s`` now: the request's budget less the time spent since ``started``
        (``time.perf_counter()``: earlier attempts, their backoff) and the round trip's reserve; None: no cap."""
        budget = with_budget_left(request, started).budget_s
        if budget is None or math.isinf(budget):  # JSON has no infinity
            return None
        return max(budget - self.reserve_s, 0.001)

    def _refusal(self, exc: ToolError, kind: str) -> str:
        """What to fix for a 401/403/404 (``exc.reason`` is already redacted; the token is never named)."""
        if exc.status == 404:
            fix = f"check HTTPSearchTool.url and that the server configures a {kind} backend"
        elif self.token_env:
            fix = f"check the bearer token in the environment variable {self.token_env} (unset: none is sent)"
        else:
            fix = "the server wants a bearer token: set HTTPSearchTool.token_env"
        return f"search server {self.url} refused the {kind} request ({exc.reason}): {fix}"

    def metrics(self) -> dict[str, float]:
        return self.client.metrics()


def main(argv: list[str] | None = None) -> None:
    """``mmsr serve-search -c configs/tools/server.yaml [--port 9000 ...]``: build a ``SearchServer`` and serve."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog="mmsr serve-search", description=__doc__.split("\n\n")[0])
    parser.add_argument("-c", "--config", action=ActionConfigFile)
    parser.add_class_arguments(SearchServer, "server")
    config = parser.instantiate(parser.parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(config.server.serve())
