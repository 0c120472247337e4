"""Time budgets of a tool call: a deadline its stages run against, and a start-up check that they can fit.

The rollout waits ``RolloutSettings.tool_timeout_s`` (the cap) for each tool call and tells the tool so in
``ToolRequest.budget_s``. A web tool runs stages in sequence (search API -> page reader -> summarizer), each an
``HTTPClient`` call with its own per-attempt timeout and retries. When one attempt of a nested stage was longer
than the cap, one slow page made the whole call time out instead of being skipped for the next result (issue
#18). Now each stage runs against the call's deadline:

- a stage may use the time left minus one attempt of every later stage (``Deadline.run(..., keep_s=...)``):
  retries of a slow search are cut before they starve the pages, a page read is dropped (and the next result
  tried) while one summary attempt still fits, and the last stage runs to the deadline;
- the deadline is the cap minus the tool's ``reserve_s`` (time to build the answer and hand it back).

The rule "fits", checked once at start-up by ``check_budgets`` (``GRPOModule`` calls it for its tools): one
attempt of every stage, in sequence, plus the reserve must fit in the cap,
``sum(stage timeout_s) + reserve_s <= cap``. That is the least useful work (one search, one page, one summary);
below it every call would fail or return nothing. Retries and backoff need not fit: the deadline cuts them, and
the refusal message shows their worst case so the numbers can be set knowingly.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TypeVar

from mmsr.tools.base import ToolRequest
from mmsr.tools.web.http import Limits, ToolError

T = TypeVar("T")


class BudgetError(ValueError):
    """A tool whose nested timeouts cannot fit the rollout's per-call cap (see the module docstring)."""


@dataclass(frozen=True)
class Stage:
    """One nested step of a tool: a name for messages and the ``Limits`` of its HTTP calls."""

    name: str
    limits: Limits


@dataclass(frozen=True)
class Deadline:
    """An absolute ``time.monotonic()`` deadline (``math.inf``: none)."""

    at: float = math.inf

    @classmethod
    def after(cls, budget_s: float | None, reserve_s: float = 0.0) -> Deadline:
        """The deadline of a call with ``budget_s`` seconds, ``reserve_s`` kept back to answer in time."""
        return cls() if budget_s is None else cls(time.monotonic() + budget_s - reserve_s)

    def left(self, keep_s: float = 0.0) -> float:
        """Seconds left, keeping ``keep_s`` for later stages (``math.inf`` without a deadline)."""
        return self.at - keep_s - time.monotonic()

    async def run(self, step: Awaitable[T], what: str, keep_s: float = 0.0) -> T:
        """``await step``, cancelled once only ``keep_s`` is left; ``ToolError`` (kind ``deadline``) then."""
        left = self.left(keep_s)
        if left <= 0:
            getattr(step, "close", lambda: None)()  # never started: no "coroutine was never awaited" warning
            raise ToolError(f"no time left for {what}", "deadline", sent=False)
        try:
            async with asyncio.timeout(None if math.isinf(left) else left):
                return await step
        except TimeoutError:
            raise ToolError(f"{what} did not finish in the {left:.1f} s left", "deadline") from None


def with_budget_left(request: ToolRequest, started: float) -> ToolRequest:
    """``request`` with the seconds spent since ``started`` (``time.perf_counter()``) taken off its budget,
    for a wrapper (cache, client) that hands the call on."""
    if request.budget_s is None:
        return request
    return replace(request, budget_s=request.budget_s - (time.perf_counter() - started))


def describe(stages: Sequence[Stage]) -> str:
    """Each stage's one attempt and worst case, e.g. ``serper 20 s (worst 4 x 20 s + 3.5 s backoff = 83.5 s)``."""
    parts = []
    for s in stages:
        n, limits = s.limits.retries + 1, s.limits
        worst = f"{n} x {limits.timeout_s:g} s + {limits.backoff_total_s():g} s backoff = {limits.worst_case_s():g} s"
        parts.append(f"{s.name} {limits.timeout_s:g} s (worst {worst})")
    return " + ".join(parts)


def check_stages(tool: str, stages: Sequence[Stage], reserve_s: float, cap_s: float) -> None:
    """``BudgetError`` unless one attempt of every stage plus ``reserve_s`` fits in ``cap_s``."""
    need = sum(s.limits.timeout_s for s in stages) + reserve_s
    if need <= cap_s:
        return
    worst = sum(s.limits.worst_case_s() for s in stages) + reserve_s
    raise BudgetError(
        f"{tool} cannot fit the per-call cap rollout.tool_timeout_s={cap_s:g} s: one attempt of each stage "
        f"({describe(stages)}) + {reserve_s:g} s reserve = {need:g} s > {cap_s:g} s (worst case with retries "
        f"{worst:g} s; retries are cut at the deadline, one attempt of each stage is not). Lower the stages' "
        f"limits.timeout_s or raise rollout.tool_timeout_s."
    )


def check_budgets(tools: Mapping[str, object | None], cap_s: float) -> None:
    """Call ``check_budget(cap_s)`` of each configured tool that has one; ``BudgetError`` names the tool."""
    for kind, tool in tools.items():
        check = getattr(tool, "check_budget", None)
        if check is None:
            continue
        try:
            check(cap_s)
        except BudgetError as exc:
            raise BudgetError(f"{kind} ({type(tool).__name__}): {exc}") from None
