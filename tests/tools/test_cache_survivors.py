"""Cache and budget behaviour a mutation audit found untested: a refused reservation whose caller is cancelled
gives nothing back, the backend gets the budget left after the lookup, and a replay-only cache on a missing file
is refused at start-up. Deterministic: threading Events order the threads, a fake clock stands for the time."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import pytest

import mmsr.tools.budget as budget_module
import mmsr.tools.cache as cache_module
from mmsr.tools import ToolRequest, ToolResult
from mmsr.tools.base import check_ready
from mmsr.tools.cache import BudgetKey, CachedTool, ReplayMiss

PRICE = 0.25
WAIT_S = 30  # bounds a wait that only a broken change leaves waiting; never reached when the code is right


class Paid:
    """A paid search (``PRICE`` per call) that records the requests it was asked."""

    provider_name = "paid"
    provider = SimpleNamespace(cost_per_call=PRICE)

    def __init__(self) -> None:
        self.asked: list[ToolRequest] = []

    async def __call__(self, request: ToolRequest) -> ToolResult:
        self.asked.append(request)
        return ToolResult(f"[Text Search Results]\n1. {request.query}\n", cost=PRICE, titles=(request.query,))


def _text(query: str, budget_s: float | None = None) -> ToolRequest:
    return ToolRequest("text_search", query, budget_s=budget_s)


# --- a caller cancelled while its reservation is refused gives nothing back ----------------------------------------


def _cancel_while_reserving(tool: CachedTool, order: str) -> None:
    """One call of ``tool`` cancelled while its worker thread reserves, the thread's answer coming after the cancel
    (``cancel_first``) or before the event loop hears of it (``answer_first``); waits for every thread started."""
    entered, go, answered = threading.Event(), threading.Event(), threading.Event()
    reserve, reserve_for = tool.cache.reserve, tool._reserve_for
    # every wait is bounded: a change that never reaches the patched step fails here instead of hanging the suite
    tool.cache.reserve = lambda *args: (entered.set(), go.wait(WAIT_S), reserve(*args))[2]
    tool._reserve_for = lambda *args: (reserve_for(*args), answered.set())[0]  # set once ``_Claim.made`` ran

    async def main() -> None:
        call = asyncio.ensure_future(tool(_text("over the cap")))
        try:
            assert await asyncio.to_thread(entered.wait, WAIT_S), "the reservation never reached the worker thread"
            if order == "answer_first":
                go.set()
                assert answered.wait(WAIT_S), "the refused reservation never answered"  # blocks the loop meanwhile
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call  # the caller has left (``_Claim.leave``)
        finally:
            go.set()

    before = set(threading.enumerate())
    asyncio.run(main())  # returns once its worker threads are done
    for thread in set(threading.enumerate()) - before:  # a give-back thread (``CachedTool._reserve``)
        thread.join(WAIT_S)
        assert not thread.is_alive(), f"{thread.name} still running"


@pytest.mark.parametrize("order", ["cancel_first", "answer_first"])
def test_a_caller_cancelled_while_its_reservation_is_refused_gives_no_call_back(tmp_path, order):
    backend = Paid()
    tool = CachedTool(backend, str(tmp_path / "c.sqlite"), max_calls=1, run_id="r")
    budget = BudgetKey("r", "text_search", "paid")
    assert asyncio.run(tool(_text("paid for"))).ok and tool.cache.spent(budget) == (1, PRICE)
    _cancel_while_reserving(tool, order)
    # the refused reservation counted nothing, so nothing is given back: the run's spent call stays counted
    assert tool.cache.spent(budget) == (1, PRICE) and len(backend.asked) == 1
    over = asyncio.run(tool(_text("still over the cap")))
    assert not over.ok and "budget is used up (1 of 1 API calls)" in over.text and len(backend.asked) == 1


# --- the backend gets the budget left after the lookup ------------------------------------------------------------


class Clock:
    """A fake ``time.perf_counter``: still unless advanced."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("mode", ["read_write", "off"])
def test_the_backend_is_given_the_budget_left_after_the_lookup_and_the_reservation(tmp_path, monkeypatch, mode):
    clock, backend = Clock(), Paid()
    fake_time = SimpleNamespace(perf_counter=clock, monotonic=time.monotonic, time=time.time)
    for module in (cache_module, budget_module):  # only the cache's and the budget's clock: asyncio keeps its own
        monkeypatch.setattr(module, "time", fake_time)
    tool = CachedTool(backend, str(tmp_path / "c.sqlite"), mode=mode)
    get, reserve = tool.cache.get, tool.cache.reserve
    # a slow lookup (2.5 s) and a busy write lock (1.5 s), in the fake clock's seconds
    monkeypatch.setattr(tool.cache, "get", lambda *args: (setattr(clock, "now", clock.now + 2.5), get(*args))[1])
    monkeypatch.setattr(tool.cache, "reserve",
                        lambda *args: (setattr(clock, "now", clock.now + 1.5), reserve(*args))[1])  # fmt: skip
    assert asyncio.run(tool(_text("q", budget_s=10.0))).ok
    spent = 1.5 if mode == "off" else 4.0  # ``off`` looks nothing up
    assert [r.budget_s for r in backend.asked] == [10.0 - spent]
    assert asyncio.run(tool(_text("unlimited"))).ok and backend.asked[-1].budget_s is None  # no budget: none made up


# --- a replay-only cache on a missing file is refused at start-up --------------------------------------------------


class Checked(Paid):
    """A backend with a start-up check of its own, counting its checks."""

    def __init__(self) -> None:
        super().__init__()
        self.checks = 0

    def check_ready(self) -> None:
        self.checks += 1


def test_a_replay_only_cache_on_a_missing_file_is_refused_at_start_up_naming_the_file(tmp_path):
    missing = tmp_path / "runs" / "recorded.sqlite"
    for backend in (None, Checked()):
        replay = CachedTool(backend, str(missing), mode="replay_only")  # building it touches no file
        with pytest.raises(ReplayMiss, match=r"replay-only cache .*runs/recorded\.sqlite does not exist"):
            replay.check_ready()
        with pytest.raises(ReplayMiss, match=r"recorded\.sqlite does not exist"):
            check_ready({"text_search": replay})
        assert not missing.exists() and not missing.parent.exists()  # refused, not created empty
    # a recording cache creates its file; once it exists, replaying it is ready, and the backend's check still runs
    recorder, backend = Checked(), Checked()
    CachedTool(recorder, str(missing)).check_ready()
    assert recorder.checks == 1 and asyncio.run(CachedTool(recorder, str(missing))(_text("q"))).ok
    CachedTool(backend, str(missing), mode="replay_only").check_ready()
    assert backend.checks == 1
