"""Persistent record/replay cache for search tools, with a per-run API budget.

``CachedTool`` wraps any ``SearchTool`` and serves it from a ``ToolCache``: one SQLite file that several
processes can share, keyed by tool kind, provider, request key and backend version (``mmsr.tools.cache_store``,
whose names are importable from here too). The version is the one configured, plus a hash of the backend's settings
that shape its results where any differ from their defaults (``settings_version``). Reruns, evaluations and resumed
runs then cost no API calls (spec §11 #8: SerpAPI is about $75 per 5k requests).

Modes: ``off`` (always call), ``read_write`` (hit -> cached result; miss -> call, store successes not cut short
by a transient failure, ``ToolResult.partial``), ``replay_only`` (hit -> cached result; miss -> ``ReplayMiss``,
never a call).
A text search backend whose summaries focus on the question (``question_focused``) is keyed on the question too
(``request_key``), under whatever tool kind it serves but image search: another question's summaries are never
served, from the cache or from a call in flight.
In ``read_write`` mode a miss already being fetched on the same event loop is joined, not fetched again: the
``num_generations`` episodes of a GRPO group search the same image at the same moment, and one call is paid. Besides
the key, a joiner must have the same row and image URL (``sample_id``, ``image_url``: the backend is asked with the
first caller's request, and may read them), so a failure or error it shares is one its own call would have had.
A joiner reserves nothing, gets the shared result (a partial one too), free unless it is the first caller
left to get it, and is counted ``cache_joined``, neither a hit nor a miss; its own timeout leaves the call to
the others (the last to leave cancels it).
The budget counts the calls and dollars of one run in the same file, per tool kind and provider (image and
text search have caps of their own), so every process of a run (same ``run_id``) shares it: ``GRPOModule`` gives
its caches that have none one id per training run (``assign_run_id``), the same on every rank and kept by its
checkpoints, so a resumed run goes on spending the same budget; past it, a miss
returns a failure observation saying so instead of calling. A call is reserved with its provider's price
(``provider.cost_per_call``) before it runs, so calls in flight count against ``max_cost`` too, and settled at
its real cost after; a search that never went out (``ToolResult.sent`` False, or a ``ToolError`` with ``sent``
False, or a caller cancelled while it waited to reserve) gives its call back.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import threading
import time
from collections import Counter
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from mmsr.tools.base import (FatalToolError, SearchTool, ToolRequest, ToolResult, depends_on_question, failure,
                             part_settings)
from mmsr.tools.budget import with_budget_left
# the store's names stay importable from here (tests, scripts and the other tools import them so)
from mmsr.tools.cache_store import BudgetKey, CacheKey, ToolCache, image_key, normalize_query, request_key  # noqa: F401

CacheMode = Literal["off", "read_write", "replay_only"]
_OPENING = threading.Lock()  # one ToolCache per CachedTool, however many threads ask first
# CachedTool's own counters, each kept per tool kind it served (``tools/<kind>/cache_hits``): one wrapper may serve
# image and text search, and each kind's counters are logged under that kind alone (``filed_under``); its backend's,
# which are not per kind, under the kind it served first
KIND_COUNTERS = frozenset({"cache_hits", "cache_misses", "cache_joined", "budget_refusals", "api_calls", "api_cost",
                           "run_api_calls", "run_api_cost"})  # fmt: skip
# Processes of one run share a budget only if they share a run_id; by default a process is its own run (until a
# trainer gives its caches the run's: ``assign_run_id``).
PROCESS_RUN_ID = f"pid{os.getpid()}-{int(time.time())}"


def settings_version(version: str, tool: object) -> str:
    """The key's version: ``version``, and a hash of ``tool``'s non-default result-shaping settings if it has any
    (``1+3f2a9c0d1e4b``). Sorted JSON hashed by SHA-256: the same in every process, as Python's ``hash`` is not."""
    settings = part_settings(tool)
    if not settings:  # configured as by default: the key of caches recorded before settings were keyed
        return version
    try:
        text = json.dumps(settings, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{type(tool).__name__}.cache_settings() is not plain JSON ({exc}): {settings}") from None
    return f"{version}+{hashlib.sha256(text.encode()).hexdigest()[:12]}"


class ReplayMiss(FatalToolError, LookupError):
    """A replay-only cache has no result for a request; the message names tool, provider, key and row."""


@dataclass
class _Miss:
    """A miss being fetched, and how many callers wait for it."""

    task: asyncio.Task
    waiters: int = 0
    answered: bool = False  # a caller got the result with its cost


class _Claim:
    """A budget reservation a worker thread makes for a caller that may leave before it is made: whichever of
    ``made`` and ``leave`` comes second says True (give it back), so it is given back once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reserved = self._left = False

    def made(self, reserved: bool) -> bool:
        with self._lock:
            self._reserved = reserved
            return reserved and self._left

    def leave(self) -> bool:
        with self._lock:
            self._left = True
            return self._reserved


def filed_under(kind: str, metrics: Mapping[str, float], kinds: Collection[str]) -> dict[str, float]:
    """A tool's ``metrics`` as logged for the tool kind it is registered under, ``kind`` (``kinds``: every kind
    registered beside it), each under ``tools/<kind>/``. A counter that already names that kind (a ``CachedTool``'s
    ``image_search/cache_hits``, a web search's ``image_search/thumbnail_bad_image``) keeps its name, not
    ``tools/<kind>/<kind>/...``. A counter naming another registered kind that the tool's ``CachedTool`` served too
    (its ``KIND_COUNTERS`` of that kind are in ``metrics``) is left to that kind's entry, which holds the same
    wrapper: a wrapper registered under both kinds counts each kind's searches once, there, and its backend's
    counters once, under the kind it served first (``CachedTool.metrics``)."""
    names = {key: key.removeprefix("tools/") for key in metrics}
    served = {n.partition("/")[0] for n in names.values() if n.partition("/")[2] in KIND_COUNTERS}
    out = {}
    for key, value in metrics.items():
        counted = names[key].partition("/")[0]
        if counted != kind and counted in kinds and counted in served:
            continue
        out[f"tools/{names[key]}" if counted == kind else f"tools/{kind}/{names[key]}"] = float(value)
    return out


def _forget(pending: dict, at: tuple, miss: _Miss) -> None:
    """Drop ``miss`` from ``pending`` unless a newer call of its key took its place."""
    if pending.get(at) is miss:
        del pending[at]


class CachedTool:
    """A ``SearchTool`` served from a ``ToolCache`` first.

    Args:
        tool: the backend called on a miss (may be ``None`` in ``replay_only`` mode).
        path: the cache database file.
        mode: ``off``, ``read_write`` or ``replay_only`` (see the module docstring).
        provider: part of the key; defaults to the tool's ``provider_name`` attribute, else its class name.
        version: part of the key; bump it when the backend's output changes in a way its settings do not say (its
            code, the served model's weights). The settings that shape its results (its ``cache_settings()``:
            ``WebTextSearch``'s ``top_k``, its summarizer's prompts and ``max_sentences``, ``WebImageSearch``'s
            ``max_side`` ...; not keys, endpoints, timeouts or retries) are keyed by themselves, hashed after
            ``version`` (``key_version``, ``settings_version``), but only those that differ from their defaults:
            a backend configured as by default keeps the keys it had before settings were keyed. A ``replay_only``
            cache without a tool knows no settings: give it the recorded ``key_version`` as ``version``.
        max_calls, max_cost: the run's budget of API calls and dollars for this tool kind and provider
            (``None``: unlimited).
        run_id: processes with the same id share one budget; default: this process, until ``GRPOModule`` gives the
            training run's (``assign_run_id``: every rank and every resume of one run share its budget).
        question_focused: key searches (all but image search) on the question too; defaults to the tool's ``question_focused``
            (``depends_on_question``). Set it for a ``replay_only`` cache without a tool whose entries a
            question-focused backend recorded.
    """

    def __init__(self, tool: SearchTool | None = None, path: str = "runs/tool_cache.sqlite",
                 mode: CacheMode = "read_write", provider: str | None = None, version: str = "1",
                 max_calls: int | None = None, max_cost: float | None = None,
                 run_id: str | None = None, question_focused: bool | None = None) -> None:  # fmt: skip
        if tool is None and mode != "replay_only":
            raise ValueError(f"CachedTool in mode {mode!r} needs a tool to call on a miss")
        self.tool, self.mode, self.version = tool, mode, version
        self.provider = provider or getattr(tool, "provider_name", None) or type(tool).__name__
        self.max_calls, self.max_cost, self.run_id = max_calls, max_cost, run_id or PROCESS_RUN_ID
        self.run_id_given = run_id is not None  # a configured id is kept (``assign_run_id``)
        self.path = path
        # as the tool's attribute too: a cache wrapped around this one keys on it alike
        self.question_focused = depends_on_question(tool) if question_focused is None else question_focused
        self._cache: ToolCache | None = None  # opened on first use: building a config touches no file
        self.counts: Counter[str] = Counter()
        # misses in flight, per event loop (tasks die with their loop, and the rollout runs each step in a fresh
        # one), key, row and image URL (``_shared_miss``); empty when idle, so an unused tool still pickles
        self._pending: dict[tuple[asyncio.AbstractEventLoop, CacheKey, str, str | None], _Miss] = {}
        # the tool kinds asked of it, in the order first asked, whose counters ``metrics`` reports: among them, per
        # kind, this process's API calls and dollars (``<kind>/api_calls``, ``<kind>/api_cost``; the budget's
        # counters are the run's); the first also gets the backend's counters
        self._kinds: dict[str, None] = {}

    def check_budget(self, cap_s: float) -> None:
        """The wrapped tool's check (a hit costs milliseconds; a miss is the tool's call)."""
        if hasattr(self.tool, "check_budget"):
            self.tool.check_budget(cap_s)

    def check_ready(self) -> None:
        """A ``replay_only`` cache must exist (opening a missing one would create it empty, and the run
        would stop at its first search); then the wrapped tool's own check."""
        if self.mode == "replay_only" and not Path(self.path).is_file():
            raise ReplayMiss(f"replay-only cache {self.path} does not exist: record it first or set its path")
        if hasattr(self.tool, "check_ready"):
            self.tool.check_ready()

    @property
    def key_version(self) -> str:
        """The version in this cache's keys: ``version`` and the backend's non-default settings
        (``settings_version``); read on each call, so a setting changed after wrapping is keyed too."""
        return settings_version(self.version, self.tool)

    @property
    def cache(self) -> ToolCache:
        # concurrent first calls run in threads: each opened its own connection (and raced SQLite to set up the file)
        with _OPENING:
            if self._cache is None:
                self._cache = ToolCache(self.path)
        return self._cache

    async def __call__(self, request: ToolRequest) -> ToolResult:
        start = time.perf_counter()
        key = CacheKey(request.kind, self.provider, request_key(request, self.question_focused), self.key_version)
        self._kinds.setdefault(request.kind)
        if self.mode == "off":
            return await self._call_within_budget(request, start)
        hit = await asyncio.to_thread(self.cache.get, key)
        if hit is not None:
            self.counts[f"{request.kind}/cache_hits"] += 1
            return ToolResult(hit.text, hit.images, True, time.perf_counter() - start, 0.0, hit.titles)
        if self.mode == "replay_only":
            self.counts[f"{request.kind}/cache_misses"] += 1
            raise ReplayMiss(
                f"replay-only cache {self.cache.path} has no {request.kind} result for row "
                f"{request.sample_id!r} (provider {self.provider!r}, key {key.key[:80]!r}, "
                f"version {key.version!r})"
            )
        return await self._shared_miss(key, request, start)

    async def _shared_miss(self, key: CacheKey, request: ToolRequest, start: float) -> ToolResult:
        """The answer to the miss of ``key`` in flight on this event loop, started if none is: a GRPO group's
        episodes search the same image at once, and one call is paid for, not ``num_generations``. The backend is
        asked with the first caller's request, so only a caller of the same row and image URL joins: what the key
        leaves out may still change the answer (an FVQA cache row, a URL template host, an error naming the row),
        and another row's search of the same key pays its own call. The question is in the key where it matters
        (``question_focused``). A joiner reserves nothing; one caller's answer carries the call's cost, the
        others' are free (cost 0, their own latency), as a hit is. The call goes on while anyone waits for it; the
        last caller to give up cancels it, as an unshared call is."""
        pending, at = self._pending, (asyncio.get_running_loop(), key, request.sample_id, request.image_url)
        miss = pending.get(at)
        self.counts[f"{request.kind}/cache_{'misses' if miss is None else 'joined'}"] += 1
        if miss is None:
            miss = pending[at] = _Miss(asyncio.ensure_future(self._miss(key, request, start)))
            miss.task.add_done_callback(lambda t: (_forget(pending, at, miss), t.cancelled() or t.exception()))
        miss.waiters += 1
        try:
            result = await asyncio.shield(miss.task)
        finally:
            miss.waiters -= 1
            if not miss.waiters and not miss.task.done():
                _forget(pending, at, miss)  # a caller arriving now starts a new call, never joins a cancelled one
                miss.task.cancel()
                await asyncio.wait({miss.task})  # settled in the budget before the caller leaves, as unshared
        if not miss.answered:  # its cost is in one answer only: the first caller still waiting (the starter)
            miss.answered = True
            return result
        images = tuple(image.copy() for image in result.images)  # each episode owns its images, as a hit's
        return replace(result, images=images, latency_s=time.perf_counter() - start, cost=0.0)

    async def _miss(self, key: CacheKey, request: ToolRequest, start: float) -> ToolResult:
        """The backend's answer, stored unless it failed or was cut short (``partial``)."""
        result = await self._call_within_budget(request, start)
        if result.ok and not result.partial:
            await asyncio.to_thread(self.cache.put, key, result)
        return result

    async def _call_within_budget(self, request: ToolRequest, start: float) -> ToolResult:
        """The backend's answer to a miss, with its call reserved in the budget first and settled after."""
        budget, price = BudgetKey(self.run_id, request.kind, self.provider), self._price()
        refusal = await self._reserve(budget, price)
        if refusal is not None:
            self.counts[f"{request.kind}/budget_refusals"] += 1
            return failure(request.kind, refusal, time.perf_counter() - start, sent=False)
        calls, cost = 0, price  # a call that raised (or was cancelled) may have been paid: never free
        try:
            result = await self.tool(with_budget_left(request, start))  # the lookup and a busy lock took their share
            calls, cost = (0 if result.sent else -1), result.cost
        except Exception as exc:
            if getattr(exc, "sent", True) is False:  # a ``ToolError`` that certainly never went out
                calls, cost = -1, 0.0
            raise
        finally:  # counted before the await: a caller cancelled while the budget settles still made its call
            self.counts[f"{request.kind}/api_calls"] += 1 + calls
            self.counts[f"{request.kind}/api_cost"] += cost
            await asyncio.shield(asyncio.to_thread(self.cache.spend, budget, cost - price, calls))
        return result

    async def _reserve(self, budget: BudgetKey, price: float) -> str | None:
        """``ToolCache.reserve`` of one call holding ``price``, in a worker thread. A caller cancelled meanwhile
        (another process holds the write lock and the rollout's timeout fires) never sends its call, yet the
        thread still commits the reservation: it is given back then, whoever of the two comes second, without
        waiting on the lock (the rollout's event loop may be closing)."""
        claim = _Claim()
        try:
            return await asyncio.to_thread(self._reserve_for, budget, price, claim)
        except asyncio.CancelledError:
            if claim.leave():
                threading.Thread(target=self.cache.spend, args=(budget, -price, -1), name="mmsr-budget").start()
            raise

    def _reserve_for(self, budget: BudgetKey, price: float, claim: _Claim) -> str | None:
        refusal = self.cache.reserve(budget, self.max_calls, self.max_cost, price)
        if claim.made(refusal is None):
            self.cache.spend(budget, -price, -1)
        return refusal

    def _price(self) -> float:
        """The backend's search provider's price per call (reserved before the call, so calls in flight count
        against ``max_cost``; also what a call that raised is charged), else nothing."""
        provider = getattr(self.tool, "provider", None)
        return float(getattr(provider, "cost_per_call", 0.0) or 0.0)

    def metrics(self) -> dict[str, float]:
        """Per tool kind asked of it (``tools/<kind>/...``, ``KIND_COUNTERS``): cache hits, misses (calls to the
        backend or refused by the budget) and joined misses (module docstring), budget refusals, the API calls and
        dollars this process spent (``api_calls``, ``api_cost``: a run's ranks add theirs up), its run's in the
        shared budget, calls in flight included (``run_api_calls``, ``run_api_cost``: every rank of a run reads
        the same, so ``mmsr.metrics.tool_metrics`` takes their largest); then the backend's own metrics, which are
        not per kind: under the kind asked first (``tools/<kind>/<backend counter>``, unless the counter names a
        kind asked of it), so a wrapper registered under two kinds logs them once (``filed_under``)."""
        own = {f"tools/{name}": 0.0 for name in ("api_calls", "api_cost", "run_api_calls", "run_api_cost")}
        if self._kinds:  # else asked nothing yet: zeros of no kind, logged under its entry's (``filed_under``)
            own = {k: v for kind in sorted(self._kinds) for k, v in self._kind_metrics(kind).items()}
        return own | self._backend_metrics()

    def _backend_metrics(self) -> dict[str, float]:
        """The backend's counters, each under the kind asked first unless it names a kind asked of it."""
        metrics = self.tool.metrics() if hasattr(self.tool, "metrics") else {}
        if not self._kinds:
            return metrics
        first, out = next(iter(self._kinds)), {}
        for key, value in metrics.items():
            name = key.removeprefix("tools/")
            out[key if name.partition("/")[0] in self._kinds else f"tools/{first}/{name}"] = value
        return out

    def _kind_metrics(self, kind: str) -> dict[str, float]:
        """``kind``'s counters (``tools/<kind>/...``): this process's, then its run's in the shared budget."""
        mine = {f"tools/{k}": float(v) for k, v in sorted(self.counts.items()) if k.startswith(f"{kind}/")}
        calls, cost = self.cache.spent(BudgetKey(self.run_id, kind, self.provider))
        return ({f"tools/{kind}/api_calls": 0.0, f"tools/{kind}/api_cost": 0.0} | mine
                | {f"tools/{kind}/run_api_calls": float(calls), f"tools/{kind}/run_api_cost": float(cost)})  # fmt: skip


def cached_tools(tools: Mapping[str, object] | Iterable[object]) -> list[CachedTool]:
    """Every ``CachedTool`` among ``tools`` (a ``{name: tool}`` mapping or tools) and the backends they wrap
    (``Tool.backend``, ``CropSearch.backend``, a cache's own ``tool``), each once, in the order found."""
    todo, seen, found = list(tools.values() if isinstance(tools, Mapping) else tools), set(), []
    while todo:
        tool = todo.pop(0)
        if tool is None or id(tool) in seen:
            continue
        seen.add(id(tool))
        if isinstance(tool, CachedTool):
            found.append(tool)
        todo.extend(getattr(tool, name, None) for name in ("backend", "tool"))
    return found


def assign_run_id(tools: Mapping[str, object] | Iterable[object], run_id: str) -> list[CachedTool]:
    """Give ``run_id`` to every ``CachedTool`` among ``tools`` (``cached_tools``) not configured with one, so the
    processes of one run spend one budget (by default each process is a run of its own: ``PROCESS_RUN_ID``);
    returns the caches it set. Called again (a checkpoint's id restored), it replaces the id it gave before."""
    assigned = [tool for tool in cached_tools(tools) if not tool.run_id_given]
    for tool in assigned:
        tool.run_id = run_id
    return assigned
