"""Resilient HTTP for the web backends: timeouts, retries with backoff, limits, a circuit breaker, metrics.

Every call of a provider goes through one ``HTTPClient``: a per-call timeout; retries on 429, 5xx, timeouts
and connection errors with exponential backoff and full jitter (``tenacity``), honouring ``Retry-After``; a
concurrency cap and a rate limit per provider; and a circuit breaker that fails fast after repeated failures
(then lets one trial call through), so a dead provider costs the rollout milliseconds, not minutes. A
malformed answer (broken JSON, an HTML error page sent with status 200, JSON without the expected fields:
``parse`` decides) is retried like a 5xx: providers send those under load, and the next attempt usually
succeeds. Failures surface as ``ToolError`` (a reason the model can read, redacted of any key the provider
quoted, and a metric kind), which the tools turn into observations. One exception: a provider's own API
endpoint (or the image host's upload URL) that refuses the key (401/403) or is not there (404) before it has
ever answered stops the run (``ProviderRefused``); a page reader's 403 is about the page it was asked to
read, one failed page.

Sessions are opened per call: the rollout runs each step in a fresh event loop (``asyncio.run``), and an
aiohttp session or an asyncio primitive must not outlive its loop. The concurrency cap therefore holds per
event loop; the rate and the breaker are plain state under a thread lock, shared by every loop and thread
that uses the client, so a new step neither restarts the rate's spacing nor lets a dead provider be called
again early. The search server (one long-lived loop) is where several trainer processes share one limit.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import threading
import time
import weakref
from collections import Counter
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any

import aiohttp
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter
from yarl import URL

from mmsr.tools.base import FatalToolError
from mmsr.tools.secrets import install_log_redaction, redact
from mmsr.tools.web.guard import BlockedAddress, BlockedURL, UnresolvedHost

MAX_REDIRECTS = 5
REFUSALS = (401, 403, 404)  # the key (401/403) or the endpoint's URL (404) is wrong


class ToolError(Exception):
    """A failed provider call. ``reason`` is shown to the model; ``kind`` is the metric it is counted under.

    The reason is redacted here, once, because error bodies are where providers quote the key they got.
    ``sent`` is False only where the call certainly never reached the provider (an open circuit, no time left,
    a refused URL), so it cannot have been billed; anything else may have been, and is charged. ``cost``: the
    dollars a failed call is known to have spent (a summary that came back unusable still used its tokens).
    ``detail``: the server's own error message, whole (the reason quotes it cut short), for a caller that shows it
    to a person rather than to the model (a start-up check); "" when it sent none.
    """

    def __init__(self, reason: str, kind: str = "error", retry_after: float | None = None, status: int | None = None,
                 sent: bool = True, cost: float = 0.0):  # fmt: skip
        reason = redact(reason)
        super().__init__(reason)
        self.reason, self.kind, self.retry_after, self.status, self.sent = reason, kind, retry_after, status, sent
        self.cost, self.detail = cost, ""


class Retryable(ToolError):
    """A failure worth retrying: 429, 5xx, timeout, connection error, malformed answer."""


class ProviderRefused(FatalToolError):
    """A provider's API endpoint refused its key (401/403) or was not found (404) before it had ever answered in
    this process: the key or the URL is wrong, every call of the run would fail the same way, and the model
    would learn that search never works. Once the endpoint has answered, the same statuses are ordinary failures
    (a key revoked or a proxy's hiccup mid-run must not stop a multi-day run)."""


def _refusal(name: str, url: str, key_env: str | None, exc: ToolError) -> str:
    """What to fix: names the provider, its URL without user info or query (where keys go) and the key's
    variable (``None``: no key is configured), never the key (``exc.reason`` is redacted already)."""
    shown = redact(str(URL(url).with_user(None).with_query(None).with_fragment(None)))
    if key_env is None:
        sent = "no key is configured, so none was sent"
    else:
        sent = "set" if os.environ.get(key_env, "").strip() else "unset, so no key was sent"
    if exc.status == 404:  # vLLM and OpenAI also answer 404 for a model they do not serve
        what = f"was not found ({exc.reason}): check the URL and the model name"
        what += f"; its key is in {key_env}" if key_env else ""
    elif key_env is None:
        what = f"refused the request ({exc.reason}): it may need a key"
    else:
        what = f"refused the key ({exc.reason}): check the key in the environment variable {key_env}"
    return f"{name} at {shown} {what} ({sent}). It had never answered in this process, so every call would fail."


def transient(exc: ToolError) -> bool:
    """Whether the failure may well not happen on the next call (service trouble, the call's deadline, an open
    circuit): a result it cut short must not be cached, or it would be served short forever."""
    return isinstance(exc, Retryable) or exc.kind in ("deadline", "circuit_open")


@dataclass(frozen=True)
class Limits:
    """How one provider is called.

    Attributes:
        timeout_s: total time of one attempt (connect, send, read).
        retries: extra attempts after a retryable failure.
        backoff_s: first backoff; doubles per attempt, with random jitter of the same size.
        backoff_max_s: longest single backoff (also caps a server's ``Retry-After``).
        concurrency: most calls in flight at once.
        rate_per_s: most calls started per second: starts are at least ``1 / rate_per_s`` s apart, in one
            rollout step or across steps (``None``: unlimited).
        breaker_failures: consecutive failed calls that open the circuit (0 disables the breaker).
        breaker_reset_s: how long an open circuit refuses calls before letting one through.
        max_bytes: largest response body read; larger ones are refused.

    Raises ``ValueError`` naming the field for a value no call could work with (a rate of 0, no concurrency ...):
    a config's slip fails where the limits are built, not as every call of the run failing.
    """

    timeout_s: float = 30.0
    retries: int = 3
    backoff_s: float = 0.5
    backoff_max_s: float = 10.0
    concurrency: int = 8
    rate_per_s: float | None = None
    breaker_failures: int = 5
    breaker_reset_s: float = 30.0
    max_bytes: int = 5_000_000

    def __post_init__(self) -> None:
        for name in ("timeout_s", "concurrency", "max_bytes"):
            if not getattr(self, name) > 0:  # written so that NaN fails too
                raise ValueError(f"Limits.{name} must be positive, got {getattr(self, name)!r}")
        for name in ("retries", "backoff_s", "backoff_max_s", "breaker_failures", "breaker_reset_s"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"Limits.{name} must be 0 or more, got {getattr(self, name)!r}")
        rate = self.rate_per_s
        if rate is not None and not (rate > 0 and math.isfinite(rate)):
            raise ValueError(f"Limits.rate_per_s must be a positive number of calls per second (None: unlimited), "
                             f"got {rate!r}")  # fmt: skip

    def backoff_total_s(self) -> float:
        """The longest total wait between attempts (each wait: exponential plus jitter, capped)."""
        return sum(min(self.backoff_s * 2**i + self.backoff_s, self.backoff_max_s) for i in range(self.retries))

    def worst_case_s(self) -> float:
        """The longest one call can take: every attempt times out, every backoff is the longest."""
        return self.timeout_s * (self.retries + 1) + self.backoff_total_s()


class _Locked:
    """State under a thread lock; a copy (checkpoint hyper-parameters, a deepcopy) gets a lock of its own."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


class RateSlots(_Locked):
    """Calls started at least ``1 / rate_per_s`` s apart, whichever event loop or thread they run in (the rollout
    runs each step in a fresh loop: a per-loop limiter let the next step's first call start at once).

    A start is taken only by a call that starts: one cancelled while it waits (its deadline) costs no slot.
    Waiting calls are not served in arrival order; their own deadlines bound how long one may wait.
    """

    def __init__(self, rate_per_s: float) -> None:
        super().__init__()
        self.period, self._next = 1.0 / rate_per_s, -math.inf

    def claim(self) -> float:
        """0 when a call may start now (the slot is then taken); else the seconds until the next free slot."""
        with self._lock:
            now = time.monotonic()
            if now >= self._next:
                self._next = now + self.period
                return 0.0
            return self._next - now

    async def wait(self) -> None:
        """Return once this call has taken a slot."""
        while (delay := self.claim()) > 0:
            await asyncio.sleep(delay)


class CircuitBreaker(_Locked):
    """Opens after ``failures`` consecutive failures and refuses calls for ``reset_s``; then lets one call through
    (half-open) and refuses the others while it runs: its success closes the circuit, its failure re-opens it for
    another ``reset_s``. Shared by every event loop and thread of the client."""

    def __init__(self, failures: int, reset_s: float) -> None:
        super().__init__()
        self.failures, self.reset_s = failures, reset_s
        self.consecutive, self.open_until, self.probing = 0, 0.0, False

    def check(self, name: str) -> bool:
        """Whether this call is the half-open trial (pass it to ``record``/``abandon``); ``ToolError``
        (``circuit_open``) when the circuit refuses it."""
        with self._lock:
            if not self.failures or self.consecutive < self.failures:
                return False
            wait = self.open_until - time.monotonic()
            if wait <= 0 and not self.probing:
                self.probing = True
                return True
        state = f"for {wait:.0f} more s" if wait > 0 else "while a trial call runs"
        raise ToolError(f"{name} is unavailable (circuit open {state})", "circuit_open", sent=False)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.probing = False  # a copy made while a trial call ran: no call of the copy would ever end that trial

    def record(self, ok: bool, probe: bool = False) -> None:
        with self._lock:
            self.consecutive = 0 if ok else self.consecutive + 1
            self.probing = self.probing and not probe
            if self.failures and self.consecutive >= self.failures:
                self.open_until = time.monotonic() + self.reset_s

    def abandon(self, probe: bool) -> None:
        """A call that ended without an outcome (cancelled by its deadline): a trial it was lets the next call try."""
        if probe:
            with self._lock:
                self.probing = False


class Body(bytes):
    """A response body and what its ``Content-Type`` declared: ``content_type``, the media type in lower case
    (aiohttp's ``application/octet-stream`` where none is sent), and ``charset`` (``None``: none declared), for a
    ``parse`` that decodes text (the page reader). Any other ``parse`` takes it as plain bytes."""

    content_type: str = "application/octet-stream"
    charset: str | None = None


async def read_capped(response: aiohttp.ClientResponse, max_bytes: int) -> Body:
    """The body, refusing (``ToolError``) bodies over ``max_bytes`` without reading them whole."""
    if response.content_length is not None and response.content_length > max_bytes:
        raise ToolError(f"response of {response.content_length} bytes is over the {max_bytes}-byte cap", "too_large")
    body = bytearray()
    async for chunk in response.content.iter_chunked(65536):
        body += chunk
        if len(body) > max_bytes:
            raise ToolError(f"response is over the {max_bytes}-byte cap", "too_large")
    out = Body(body)
    out.content_type, out.charset = response.content_type, response.charset
    return out


def parse_json(body: bytes) -> Any:
    """The JSON body; ``Retryable`` (``bad_response``) when it is not JSON, e.g. an HTML error page."""
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise Retryable(f"malformed JSON response ({exc.__class__.__name__})", "bad_response") from None


def _retry_after(response: aiohttp.ClientResponse) -> float | None:
    try:
        return float(response.headers.get("Retry-After", ""))
    except ValueError:  # absent, or an HTTP date: fall back to our own backoff
        return None


async def _error_message(response: aiohttp.ClientResponse) -> str:
    """The message of a JSON ``{"error": ...}`` body (SerpAPI, OpenAI and our server use it), masked; else empty."""
    try:
        payload = json.loads(await response.content.read(4096))
    except (ValueError, aiohttp.ClientError, asyncio.TimeoutError):
        return ""
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict):  # OpenAI: {"error": {"message": ...}}
        error = error.get("message")
    return redact(str(error)) if error else ""


def _redirect_target(name: str, base: URL, location: str) -> str:
    """The absolute URL a redirect points at; ``ToolError`` (``bad_redirect``) for a Location that does not parse."""
    try:
        return str(base.join(URL(location)))
    except ValueError as exc:  # the server's header may quote a key we sent: name the error type only
        reason = f"{name}: the redirect's Location is malformed ({type(exc).__name__})"
        raise ToolError(reason, "bad_redirect") from None


class HTTPClient:
    """One provider's calls, with ``Limits``; counts every outcome in ``counts``: ``calls``, ``retries``, the
    failed calls by kind (``timeout``, ``http_429``, ``http_5xx``, ``http_4xx``, ``bad_response``,
    ``circuit_open`` ...), and the failed attempts that were retried by kind (``retry_bad_response`` ...)."""

    def __init__(
        self, name: str, limits: Limits = Limits(), connector: Callable[[], aiohttp.BaseConnector] | None = None
    ):
        self.name, self.limits, self._connector = name, limits, connector
        self.breaker = CircuitBreaker(limits.breaker_failures, limits.breaker_reset_s)
        self.counts: Counter[str] = Counter()
        self.answered = False  # a call has succeeded: from then on a refusal is an ordinary failure
        install_log_redaction()  # a process that calls providers logs their errors: keep keys out of them
        self._semaphores: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # event loop -> its semaphore
        self._slots = RateSlots(limits.rate_per_s) if limits.rate_per_s is not None else None
        exponential = wait_exponential_jitter(
            multiplier=limits.backoff_s, max=limits.backoff_max_s, jitter=limits.backoff_s
        )
        self._wait = lambda state: max(exponential(state), self._server_wait(state))

    def _server_wait(self, state) -> float:
        error = state.outcome.exception() if state.outcome else None
        after = getattr(error, "retry_after", None) or 0.0
        return min(after, self.limits.backoff_max_s)

    def _semaphore(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        if loop not in self._semaphores:
            self._semaphores[loop] = asyncio.Semaphore(self.limits.concurrency)
        return self._semaphores[loop]

    async def request(
        self,
        method: str,
        url: str,
        parse: Callable[[bytes], Any] = parse_json,
        check: Callable[[str], Awaitable[Any]] | None = None,
        fresh: Callable[[], dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> Any:
        """One call with retries; ``parse(body)`` turns the body into the result. Raises ``ToolError``.

        ``parse`` runs inside each attempt: a ``Retryable`` from it (a malformed answer) is retried.

        ``fresh()``, called before each attempt, gives the keyword arguments that change between attempts (over
        ``kwargs``): a body carrying the caller's budget must carry the time left, not what the first attempt had.

        ``check(url)`` (an SSRF guard) vets ``url`` and every redirect target before it is requested; with
        it, redirects are followed here (at most ``MAX_REDIRECTS``) rather than by aiohttp.
        """
        self.counts["calls"] += 1
        try:
            probe = self.breaker.check(self.name)
        except ToolError as exc:
            self.counts[exc.kind] += 1
            raise
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.limits.retries + 1),
            wait=self._wait,
            retry=retry_if_exception_type(Retryable),
            before_sleep=self._count_retry,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    sent = kwargs if fresh is None else kwargs | fresh()
                    result = parse(await self._attempt(method, url, check, **sent))
        except ToolError as exc:
            if retrying.statistics.get("attempt_number", 1) > 1:
                exc.sent = True  # whatever stopped the last attempt, an earlier one went out
            self.counts[exc.kind] += 1
            # Only service trouble opens the circuit; a 404 or an unreadable page says nothing about it.
            self.breaker.record(not isinstance(exc, Retryable), probe)
            raise
        except BaseException:  # cancelled (the call's deadline): no outcome, but a trial call must not hold the circuit
            self.breaker.abandon(probe)
            raise
        self.breaker.record(True, probe)
        self.answered = True
        return result

    async def request_endpoint(self, method: str, url: str, key_env: str | None,
                               refusals: Collection[int] = REFUSALS, **kwargs: Any) -> Any:  # fmt: skip
        """``request`` to the provider's own API (not a page it fetches for someone): a status of ``refusals``
        (401/403/404) before any call of this client has succeeded raises ``ProviderRefused``, naming ``key_env``
        (the key's variable; ``None``: the endpoint is called without a key). A service that answers some of them
        about the page it fetches, not its key or URL, leaves those out."""
        try:
            return await self.request(method, url, **kwargs)
        except ToolError as exc:
            if exc.status in refusals and not self.answered:
                raise ProviderRefused(_refusal(self.name, url, key_env, exc)) from None
            raise

    def _count_retry(self, state) -> None:
        self.counts.update(["retries", f"retry_{getattr(state.outcome.exception(), 'kind', 'error')}"])

    async def _attempt(self, method: str, url: str, check, **kwargs: Any) -> Body:
        timeout = aiohttp.ClientTimeout(total=self.limits.timeout_s)
        async with self._semaphore():
            try:
                if self._slots is not None:  # inside the semaphore: a slot is taken only by a call about to start
                    await self._slots.wait()
                connector = self._connector() if self._connector else None
                async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
                    if check is None:
                        async with session.request(method, url, **kwargs) as response:
                            await self._check_status(response)
                            return await read_capped(response, self.limits.max_bytes)
                    return await self._follow(session, method, url, check, **kwargs)
            except asyncio.TimeoutError:
                raise Retryable(f"{self.name} timed out after {self.limits.timeout_s:g} s", "timeout") from None
            except aiohttp.ClientConnectorError as exc:
                if isinstance(exc.os_error, BlockedAddress):  # the guarded resolver refused: do not retry
                    raise ToolError(f"{self.name}: {exc.os_error}", "refused") from None
                raise Retryable(f"{self.name} connection failed ({type(exc).__name__})", "network") from None
            except ValueError as exc:
                # A URL or header aiohttp cannot send (InvalidURL, IDNA's UnicodeError ...): it will not heal on
                # a retry, and it must be an observation, not a crash. Type only: the text may quote the URL.
                raise ToolError(f"{self.name}: the request could not be made ({type(exc).__name__})",
                                "bad_request") from None  # fmt: skip
            except aiohttp.ClientError as exc:
                # The exception text may hold the URL (and with it an API key in the query): name the type only.
                raise Retryable(f"{self.name} connection failed ({type(exc).__name__})", "network") from None

    async def _follow(self, session: aiohttp.ClientSession, method: str, url: str, check, **kwargs: Any) -> Body:
        for hop in range(MAX_REDIRECTS + 1):
            try:
                await check(url)
            except BlockedURL as exc:
                raise ToolError(f"{self.name}: {exc}", "refused", sent=hop > 0) from None
            except UnresolvedHost as exc:  # a DNS outage: retried, and what it cuts short is not cached
                raise Retryable(f"{self.name}: {exc}", "network", sent=hop > 0) from None
            async with session.request(method, url, allow_redirects=False, **kwargs) as response:
                location = response.headers.get("Location")
                if response.status not in (301, 302, 303, 307, 308) or not location:
                    await self._check_status(response)
                    return await read_capped(response, self.limits.max_bytes)
                url = _redirect_target(self.name, response.url, location)
        raise ToolError(f"{self.name}: more than {MAX_REDIRECTS} redirects", "too_many_redirects")

    async def _check_status(self, response: aiohttp.ClientResponse) -> None:
        status = response.status
        if status == 429:
            raise Retryable(f"{self.name} is rate limiting (HTTP 429)", "http_429", _retry_after(response), status)
        if status >= 500:
            raise Retryable(f"{self.name} server error (HTTP {status})", "http_5xx", _retry_after(response), status)
        if status >= 400:
            message = await _error_message(response)
            detail = f": {message[:300]}" if message else ""  # cut once masked: a cut could leave a key's head unmasked
            error = ToolError(f"{self.name} refused the request (HTTP {status}{detail})", "http_4xx", status=status)
            error.detail = message
            raise error

    def metrics(self) -> dict[str, float]:
        """``tools/<name>/<outcome>`` counters since construction."""
        return {f"tools/{self.name}/{kind}": float(n) for kind, n in sorted(self.counts.items())}
