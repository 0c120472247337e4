"""Record/replay cache: modes, keys, image round trip, budget (also across processes), misses shared while in
flight, metrics."""

from __future__ import annotations

import asyncio
import multiprocessing
import sqlite3
import threading
from dataclasses import replace
from types import SimpleNamespace

import pytest
from aiohttp import web
from PIL import Image

from mmsr.tools import IMAGE_MARKER, ToolRequest, ToolResult
from mmsr.tools.base import failure
from mmsr.tools.cache import BudgetKey, CachedTool, ReplayMiss, ToolCache, image_key, request_key
import mmsr.tools.cache as cache_module
from mmsr.tools.crop import CropSearch
from mmsr.tools.web.fake import chat_completion, jina, serper, serve
from mmsr.tools.web.http import Limits, ToolError
from mmsr.tools.web.image_search import WebImageSearch
from mmsr.tools.web.providers import SerpAPILens, Serper
from mmsr.tools.web.reader import JinaReader
from mmsr.tools.web.summarizer import OpenAISummarizer
from mmsr.tools.web.text_search import WebTextSearch

from .fake_web import Script


class CountingTool:
    """Answers with the request echoed (and one thumbnail for image search), counting calls."""

    provider_name = "counting"

    def __init__(self, cost: float = 0.25, fail: bool = False) -> None:
        self.calls, self.cost, self.fail = 0, cost, fail

    async def __call__(self, request: ToolRequest) -> ToolResult:
        self.calls += 1
        if self.fail:
            return failure(request.kind, "provider down")
        if request.kind == "image_search":
            thumb = Image.new("RGB", (7, 5), (10, 20, 30))
            return ToolResult(
                f"[Image Search Results]\n1. image: {IMAGE_MARKER}\ntitle: T\n", (thumb,), cost=self.cost, titles=("T",)
            )
        return ToolResult(f"[Text Search Results]\n1. {request.query}\n", cost=self.cost, titles=(request.query,))


def run(tool, request):
    return asyncio.run(tool(request))


def text(query: str) -> ToolRequest:
    return ToolRequest("text_search", query)


def test_read_write_serves_repeats_from_the_cache(tmp_path):
    backend = CountingTool()
    tool = CachedTool(backend, str(tmp_path / "c.sqlite"))
    first, second = run(tool, text("Eiffel  Tower")), run(tool, text("eiffel tower"))  # normalized: same key
    assert backend.calls == 1 and second.text == first.text and second.titles == first.titles
    assert second.cost == 0.0 and first.cost == 0.25  # a hit costs nothing
    run(tool, text("Louvre"))
    assert backend.calls == 2
    # a new backend version (changed prompt, model, format) misses
    run(CachedTool(backend, str(tmp_path / "c.sqlite"), version="2"), text("eiffel tower"))
    assert backend.calls == 3
    m = tool.metrics()
    assert m["tools/text_search/cache_hits"] == 1 and m["tools/text_search/cache_misses"] == 2


def test_images_round_trip_and_are_keyed_by_content(tmp_path):
    backend = CountingTool()
    tool = CachedTool(backend, str(tmp_path / "c.sqlite"))
    question = Image.new("RGB", (16, 16), "red")
    first = run(tool, ToolRequest("image_search", image=question, sample_id="a"))
    again = run(tool, ToolRequest("image_search", image=Image.new("RGB", (16, 16), "red"), sample_id="b"))
    assert backend.calls == 1 and again.images[0].tobytes() == first.images[0].tobytes()
    run(tool, ToolRequest("image_search", image=Image.new("RGB", (16, 16), "blue")))
    assert backend.calls == 2
    assert image_key(question) == image_key(question.convert("RGBA"))  # pixels, not the file or mode
    assert request_key(ToolRequest("image_search", image_url="https://x/y.jpg")) == "url:https://x/y.jpg"
    with pytest.raises(ValueError, match="row 'r9'"):
        request_key(ToolRequest("image_search", sample_id="r9"))


def test_failures_are_not_cached(tmp_path):
    backend = CountingTool(fail=True)
    tool = CachedTool(backend, str(tmp_path / "c.sqlite"))
    assert not run(tool, text("q")).ok and not run(tool, text("q")).ok
    assert backend.calls == 2 and len(tool.cache) == 0


def test_replay_only_never_calls_and_a_miss_is_a_clear_error(tmp_path):
    path = str(tmp_path / "c.sqlite")
    run(CachedTool(CountingTool(), path), text("recorded"))
    backend = CountingTool()
    replay = CachedTool(backend, path, mode="replay_only")
    assert run(replay, text("Recorded")).ok and backend.calls == 0
    with pytest.raises(ReplayMiss, match=r"no text_search result for row 'row7'.*provider 'counting'"):
        run(replay, ToolRequest("text_search", "never asked", sample_id="row7"))
    assert backend.calls == 0
    with pytest.raises(ValueError, match="needs a tool"):
        CachedTool(None, path, mode="read_write")


def test_off_always_calls_and_stores_nothing(tmp_path):
    backend = CountingTool()
    tool = CachedTool(backend, str(tmp_path / "c.sqlite"), mode="off")
    run(tool, text("q")), run(tool, text("q"))
    assert backend.calls == 2 and len(tool.cache) == 0


def test_budget_in_calls_and_dollars(tmp_path):
    backend = CountingTool(cost=0.4)
    tool = CachedTool(backend, str(tmp_path / "c.sqlite"), max_calls=2, run_id="run-a")
    assert run(tool, text("a")).ok and run(tool, text("b")).ok
    over = run(tool, text("c"))
    assert not over.ok and "budget is used up (2 of 2 API calls)" in over.text and backend.calls == 2
    assert run(tool, text("a")).ok  # cached results are still served past the budget
    m = tool.metrics()
    assert m["tools/text_search/api_calls"] == 2 and m["tools/text_search/api_cost"] == pytest.approx(0.8)
    assert m["tools/text_search/budget_refusals"] == 1
    dollars = CachedTool(backend, str(tmp_path / "c.sqlite"), max_cost=0.5, run_id="run-b")
    assert run(dollars, text("d")).ok and run(dollars, text("e")).ok  # 0.4 spent < 0.5: one more call allowed
    assert "$0.80 of $0.50" in run(dollars, text("f")).text
    # another run has its own budget
    assert run(CachedTool(backend, str(tmp_path / "c.sqlite"), max_calls=1, run_id="run-c"), text("g")).ok


SHARED = BudgetKey("shared", "text_search", "counting")


def _reserve_many(path: str, n: int, queue) -> None:
    cache = ToolCache(path)
    granted = sum(cache.reserve(SHARED, 25, None) is None for _ in range(n))
    queue.put(granted)


def test_budget_is_shared_safely_by_processes(tmp_path):
    path = str(tmp_path / "c.sqlite")
    ToolCache(path).close()
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    workers = [ctx.Process(target=_reserve_many, args=(path, 20, queue)) for _ in range(3)]
    for w in workers:
        w.start()
    granted = [queue.get(timeout=60) for _ in workers]
    for w in workers:
        w.join(timeout=60)
    assert sum(granted) == 25 and ToolCache(path).spent(SHARED) == (25, 0.0)


def _open_fresh(path: str, start, queue) -> None:
    start.wait(timeout=60)
    try:
        ToolCache(path).close()
        queue.put("ok")
    except Exception as e:  # the parent asserts on what each worker reports
        queue.put(repr(e))


def test_processes_opening_a_new_cache_file_together_all_open_it(tmp_path):
    # SQLite refused the WAL switch at once ("database is locked") to all but one of several ranks opening a new
    # file; 8 rounds of 4 processes failed about one round in ten before the setup was retried
    ctx = multiprocessing.get_context("fork")
    for round_ in range(8):
        path, start, queue = str(tmp_path / f"c{round_}.sqlite"), ctx.Event(), ctx.Queue()
        workers = [ctx.Process(target=_open_fresh, args=(path, start, queue)) for _ in range(4)]
        for w in workers:
            w.start()
        start.set()
        assert [queue.get(timeout=60) for _ in workers] == ["ok"] * 4
        for w in workers:
            w.join(timeout=60)


def test_concurrent_first_calls_share_one_connection(tmp_path, monkeypatch):
    opened = []
    monkeypatch.setattr(cache_module, "ToolCache", lambda path: opened.append(path) or ToolCache(path))
    tool = CachedTool(SlowPaid(), str(tmp_path / "c.sqlite"), mode="off")
    assert all(r.ok for r in _together(tool, [text("q")] * 4)) and len(opened) == 1


def test_cache_file_is_wal_and_shared_between_connections(tmp_path):
    path = tmp_path / "c.sqlite"
    run(CachedTool(CountingTool(), str(path)), text("q"))
    other = ToolCache(path)
    assert other._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal" and len(other) == 1


class EchoTool:
    """Answers with what it was asked: the query, or the size of the image (a crop's region)."""

    provider_name = "echo"

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, request: ToolRequest) -> ToolResult:
        self.calls += 1
        if request.image is not None and not request.query:
            return ToolResult(f"[Image Search Results] region {request.image.width}x{request.image.height}")
        return ToolResult(f"[Wiki Search Results] {request.query}")


def test_other_tool_kinds_key_on_their_query_and_image(tmp_path):
    backend = EchoTool()
    wiki = CachedTool(backend, str(tmp_path / "c.sqlite"))
    url = "https://img.example/row1.jpg"
    asked = [run(wiki, ToolRequest("wiki_search", q, image_url=url, sample_id="row1")).text
             for q in ("capital of France", "height of Everest", "Capital  of france")]  # fmt: skip
    assert asked == ["[Wiki Search Results] capital of France", "[Wiki Search Results] height of Everest",
                     "[Wiki Search Results] capital of France"] and backend.calls == 2  # fmt: skip
    assert run(wiki, ToolRequest("wiki_search", "no image", sample_id="row2")).ok  # a row without an image
    crop = CachedTool(CropSearch(backend), str(tmp_path / "c.sqlite"), provider="crop")
    image = Image.new("RGB", (400, 300), "red")
    regions = [run(crop, ToolRequest("crop_search", box, image=image, image_size=(400, 300))).text
               for box in ("[0, 0, 100, 100]", "[0, 0, 400, 300]")]  # fmt: skip
    assert regions == ["[Image Search Results] region 100x100", "[Image Search Results] region 400x300"]
    # the same box in another pixel space is another region
    assert run(crop, ToolRequest("crop_search", "[0, 0, 100, 100]", image=image, image_size=(200, 150))).text.endswith(
        "region 200x200"
    )
    # the keys caches were recorded with do not change
    assert request_key(text(" Eiffel  TOWER ")) == "q:eiffel tower"
    assert request_key(ToolRequest("image_search", "ignored", image=image, image_url=url)) == image_key(image)
    assert request_key(ToolRequest("image_search", "ignored", image_url=url)) == "url:" + url


def test_a_partial_result_is_returned_but_not_stored(tmp_path):
    class Partial(CountingTool):
        async def __call__(self, request: ToolRequest) -> ToolResult:
            result = await super().__call__(request)
            return ToolResult(result.text, result.images, cost=result.cost, titles=result.titles, partial=True)

    backend = Partial()
    tool = CachedTool(backend, str(tmp_path / "c.sqlite"))
    assert run(tool, text("q")).partial and run(tool, text("q")).ok
    assert backend.calls == 2 and len(tool.cache) == 0


def test_a_call_that_raises_is_still_charged(tmp_path):
    class Crashing:
        provider = SimpleNamespace(cost_per_call=0.25)  # the search it made before it crashed was paid

        async def __call__(self, request: ToolRequest) -> ToolResult:
            raise SyntaxError("broken PNG file")

    tool = CachedTool(Crashing(), str(tmp_path / "c.sqlite"), run_id="r")
    with pytest.raises(SyntaxError):
        run(tool, text("q"))
    assert tool.cache.spent(BudgetKey("r", "text_search", "Crashing")) == (1, 0.25)


def test_a_result_with_a_lone_surrogate_is_stored_and_served(tmp_path):
    class Cut(CountingTool):  # a JSON snippet cut mid-emoji: json.loads leaves half a surrogate pair
        async def __call__(self, request: ToolRequest) -> ToolResult:
            self.calls += 1
            return ToolResult("[Text Search Results]\n1. Paris \ud83d", cost=self.cost)

    backend = Cut()
    tool = CachedTool(backend, str(tmp_path / "c.sqlite"))
    first, again = run(tool, text("q")), run(tool, text("q"))  # sqlite cannot store a lone surrogate
    assert first.ok and again.ok and again.text == first.text.replace("\ud83d", "\ufffd") == first.text
    assert backend.calls == 1


def test_each_tool_kind_and_provider_has_its_own_budget(tmp_path):
    # The image and text tools of one trainer share the cache file and the default run_id, with caps of their
    # own: image search using up its calls must not refuse the first text search.
    path = str(tmp_path / "c.sqlite")
    lens, serper = CountingTool(cost=0.015), CountingTool(cost=0.001)
    image = CachedTool(lens, path, provider="serpapi_lens", max_calls=2, max_cost=75.0)
    words = CachedTool(serper, path, provider="serper", max_calls=2, max_cost=50.0)
    for shade in range(3):
        run(image, ToolRequest("image_search", image=Image.new("RGB", (8, 8), (shade, 0, 0))))
    assert lens.calls == 2 and image.metrics()["tools/image_search/budget_refusals"] == 1
    assert run(words, text("capital of france")).ok and serper.calls == 1
    assert image.metrics()["tools/image_search/api_calls"] == 2
    assert image.metrics()["tools/image_search/api_cost"] == pytest.approx(0.03)
    assert words.metrics()["tools/text_search/api_calls"] == 1
    assert words.metrics()["tools/text_search/api_cost"] == pytest.approx(0.001)


class PaidOrUnsent(CountingTool):
    """A web tool at $0.25 a call whose search for "unsent" never goes out (an open circuit)."""

    provider = SimpleNamespace(cost_per_call=0.25)

    async def __call__(self, request: ToolRequest) -> ToolResult:
        if request.query == "unsent":
            return failure(request.kind, "circuit open", sent=False)
        return await super().__call__(request)


def test_ranks_sharing_a_run_id_each_report_their_own_api_calls_and_the_step_adds_them_up(tmp_path, monkeypatch):
    # Two ranks of one run (one run_id, one budget file): rank 0 pays for "a", rank 1 for "b" and "c"; its hit on
    # "a" and its search that never went out cost nothing. Each rank reported the run's 3 calls as its own, and
    # the step's sum over ranks logged 6 calls and $1.50 (N ranks: N times the run's).
    import mmsr.metrics as metrics
    from mmsr.rollout.stats import RolloutStats

    path = str(tmp_path / "c.sqlite")
    ranks = [CachedTool(PaidOrUnsent(), path, max_calls=10, run_id="run") for _ in range(2)]
    run(ranks[0], text("a"))
    for query in ("b", "c", "a", "unsent"):
        run(ranks[1], text(query))
    own = [rank.metrics() for rank in ranks]
    assert [(m["tools/text_search/api_calls"], m["tools/text_search/api_cost"]) for m in own] == [(1, 0.25), (2, 0.5)]
    assert all((m["tools/text_search/run_api_calls"], m["tools/text_search/run_api_cost"]) == (3, 0.75)
               for m in own)  # the shared budget
    sent = []  # what rank 1 hands the collective, then what rank 0 gets back from it
    monkeypatch.setattr(metrics, "gather_per_rank", lambda obj: sent.append(obj) or [obj])
    metrics.tool_metrics(RolloutStats(), {"text_search": ranks[1]})
    monkeypatch.setattr(metrics, "gather_per_rank", lambda obj: [obj, sent.pop(0)])
    step = metrics.tool_metrics(RolloutStats(), {"text_search": ranks[0]})
    assert (step["tools/text_search/api_calls"], step["tools/text_search/api_cost"]) == (3, 0.75)
    assert (step["tools/text_search/run_api_calls"], step["tools/text_search/run_api_cost"]) == (3, 0.75)


# The schema before ae48d8b: one budget row per run, shared by every tool that used the file.
OLD_SCHEMA = """
CREATE TABLE results (
    tool TEXT, provider TEXT, key TEXT, version TEXT,
    text TEXT NOT NULL, titles TEXT NOT NULL, images TEXT NOT NULL, cost REAL NOT NULL, created REAL NOT NULL,
    PRIMARY KEY (tool, provider, key, version));
CREATE TABLE budget (run TEXT PRIMARY KEY, calls INTEGER NOT NULL, cost REAL NOT NULL);
INSERT INTO results VALUES
    ('text_search', 'counting', 'q:recorded', '1', '[Text Search Results] old', '[]', '[]', 0.1, 0);
INSERT INTO budget VALUES ('r', 7, 1.5);
"""


def test_a_cache_file_from_before_per_tool_budgets_carries_its_spent_calls_over(tmp_path):
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as old:
        old.executescript(OLD_SCHEMA)
    backend = CountingTool(cost=0.0)
    words, image = (CachedTool(backend, str(path), max_calls=8, run_id="r", provider=p) for p in ("counting", "lens"))
    assert run(words, text("recorded")).text == "[Text Search Results] old" and backend.calls == 0
    # The shared 7 calls cannot be split: each tool has 1 of its 8 left, not 8.
    assert run(words, text("new")).ok and not run(words, text("newer")).ok
    assert run(image, ToolRequest("image_search", image=Image.new("RGB", (8, 8)))).ok and backend.calls == 2
    assert "(8 of 8 API calls)" in run(image, ToolRequest("image_search", image=Image.new("RGB", (9, 9)))).text
    spent = words.metrics()
    assert spent["tools/text_search/run_api_calls"] == 8
    assert spent["tools/text_search/run_api_cost"] == pytest.approx(1.5)
    assert spent["tools/text_search/api_calls"] == 1  # its own: "new" (the old calls were another process's)
    dollars = CachedTool(backend, str(path), max_cost=1.5, run_id="r", provider="other")
    assert "$1.50 of $1.50" in run(dollars, text("dear")).text  # its dollars count too
    assert run(CachedTool(backend, str(path), max_calls=1, run_id="another"), text("else")).ok  # only run r's


class NeverSent(CountingTool):
    """Fails before its search goes out: as a result (``sent=False``) or as a ``ToolError(sent=False)``."""

    def __init__(self, raises: bool) -> None:
        super().__init__()
        self.raises = raises

    async def __call__(self, request: ToolRequest) -> ToolResult:
        self.calls += 1
        if self.raises:
            raise ToolError("no time left for the search", "deadline", sent=False)
        return failure(request.kind, "circuit open", sent=False)


@pytest.mark.parametrize("raises", [False, True])
def test_a_search_that_never_went_out_gives_its_call_back(tmp_path, raises):
    tool = CachedTool(NeverSent(raises), str(tmp_path / "c.sqlite"), max_calls=1, run_id="r")
    for query in ("a", "b", "c"):
        if raises:
            with pytest.raises(ToolError):
                run(tool, text(query))
        else:
            assert "circuit open" in run(tool, text(query)).text  # never "budget is used up"
    assert tool.cache.spent(BudgetKey("r", "text_search", "counting")) == (0, 0.0)


def test_an_open_circuit_does_not_use_up_max_calls(tmp_path, monkeypatch):
    monkeypatch.setenv("SERPAPI_API_KEY", "sk-test")
    lens = Script((500, "down"))
    limits = Limits(timeout_s=2.0, retries=0, breaker_failures=1, breaker_reset_s=600)

    async def main():
        async with serve([("GET", "/lens", lens)]) as url:
            backend = WebImageSearch(SerpAPILens(endpoint=url + "/lens", limits=limits, cost_per_call=0.5))
            tool = CachedTool(backend, str(tmp_path / "c.sqlite"), max_calls=2, run_id="r")
            return tool, [await tool(ToolRequest("image_search", image=Image.new("RGB", (8, 8), (i, 0, 0)),
                                                 image_url=f"https://x.example/{i}.jpg")) for i in range(4)]  # fmt: skip

    tool, results = asyncio.run(main())
    assert len(lens.requests) == 1 and all("circuit open" in r.text for r in results[1:])
    assert tool.cache.spent(BudgetKey("r", "image_search", "serpapi_lens")) == (1, 0.5)


def test_calls_in_flight_hold_their_price_against_max_cost(tmp_path):
    class Paid(CountingTool):  # a web tool: its provider's price is known before the call
        provider = SimpleNamespace(cost_per_call=0.4)

        async def __call__(self, request: ToolRequest) -> ToolResult:
            await asyncio.sleep(0.01)
            return await super().__call__(request)

    backend = Paid(cost=0.4)
    tool = CachedTool(backend, str(tmp_path / "c.sqlite"), max_cost=1.0, run_id="r")

    async def main():
        return await asyncio.gather(*(tool(text(f"q{i}")) for i in range(16)))

    answered = sum(r.ok for r in asyncio.run(main()))
    # $0, $0.40, $0.80 held when each of the first 3 starts (under $1); the 4th sees $1.20 held
    assert answered == backend.calls == 3
    assert tool.cache.spent(BudgetKey("r", "text_search", "counting")) == (3, pytest.approx(1.2))


class SlowPaid(CountingTool):
    """A paid web tool whose call takes a while, so that concurrent callers overlap; counts its starts and
    cancellations."""

    provider = SimpleNamespace(cost_per_call=0.25)

    def __init__(self, delay_s: float = 0.05, partial: bool = False) -> None:
        super().__init__(cost=0.25)
        self.delay_s, self.partial, self.started, self.cancelled = delay_s, partial, 0, 0

    async def __call__(self, request: ToolRequest) -> ToolResult:
        self.started += 1
        try:
            await asyncio.sleep(self.delay_s)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return replace(await super().__call__(request), partial=self.partial)


def _together(tool, requests):
    """Every request called at once; their results."""

    async def main():
        return await asyncio.gather(*(tool(r) for r in requests))

    return asyncio.run(main())


def test_a_groups_identical_misses_share_one_paid_call(tmp_path):
    # The 8 episodes of a GRPO group (one row) image-search the question image at the same moment.
    backend = SlowPaid()
    tool = CachedTool(backend, str(tmp_path / "c.sqlite"), max_calls=100, run_id="r")
    group = [ToolRequest("image_search", image=Image.new("RGB", (16, 16), "red"), sample_id="row7")] * 8
    results = _together(tool, group)
    assert backend.calls == 1 and tool.cache.spent(BudgetKey("r", "image_search", "counting")) == (1, 0.25)
    assert len({(r.text, r.titles, r.images[0].tobytes(), r.ok) for r in results}) == 1 and results[0].ok
    assert sorted(r.cost for r in results) == [0.0] * 7 + [0.25]  # the joiners paid nothing, as hits
    assert len({id(r.images[0]) for r in results}) == 8  # each episode owns its images
    m = tool.metrics()
    assert m["tools/image_search/cache_misses"] == 1 and m["tools/image_search/cache_joined"] == 7
    assert run(tool, group[0]).ok and backend.calls == 1 and len(tool.cache) == 1  # stored once


def test_a_shared_result_cut_short_is_shown_to_every_caller_and_stored_by_none(tmp_path):
    backend = SlowPaid(partial=True)
    tool = CachedTool(backend, str(tmp_path / "c.sqlite"), run_id="r")
    results = _together(tool, [text("q")] * 4)
    assert backend.calls == 1 and all(r.partial and r.ok for r in results) and len(tool.cache) == 0
    assert run(tool, text("q")).partial and backend.calls == 2  # the next call may get it whole


def _first_gives_up(tool: CachedTool, backend: SlowPaid, queries: list[str]) -> list:
    """Each query called at once; the first caller is cancelled once every caller is in a backend call or has
    joined one (a rollout's timeout firing for one episode). Results, or the errors raised."""

    def under_way() -> int:
        return backend.started + tool.counts["text_search/cache_joined"]

    async def main():
        before, calls = under_way(), [asyncio.ensure_future(tool(text(q))) for q in queries]
        while under_way() < before + len(queries):
            await asyncio.sleep(0.005)
        calls[0].cancel()
        return await asyncio.gather(*calls, return_exceptions=True)

    return asyncio.run(main())


def test_a_caller_that_gives_up_leaves_the_shared_call_to_the_others(tmp_path):
    backend = SlowPaid(delay_s=0.2)
    tool = CachedTool(backend, str(tmp_path / "c.sqlite"), run_id="r")
    gave_up, waited = _first_gives_up(tool, backend, ["q", "q"])
    assert isinstance(gave_up, asyncio.CancelledError) and waited.ok and waited.cost == 0.25
    assert backend.calls == 1 and backend.cancelled == 0 and len(tool.cache) == 1
    # the last caller to give up cancels it, as an unshared call is cancelled; it is charged its price
    (alone,) = _first_gives_up(tool, backend, ["other"])
    assert isinstance(alone, asyncio.CancelledError) and backend.cancelled == 1 and len(tool.cache) == 1
    assert tool.cache.spent(BudgetKey("r", "text_search", "counting")) == (2, 0.5)


def test_off_mode_shares_nothing(tmp_path):
    backend = SlowPaid()
    _together(CachedTool(backend, str(tmp_path / "c.sqlite"), mode="off"), [text("q")] * 3)
    assert backend.calls == 3  # off: always call


def test_a_call_cancelled_while_it_waits_to_reserve_gives_its_reservation_back(tmp_path, monkeypatch):
    # Another process of the run holds the write lock; the rollout's timeout fires while the worker thread waits
    # for it. The call is never sent, yet the thread commits the reservation once the lock frees.
    path = tmp_path / "c.sqlite"
    backend = SlowPaid()
    tool = CachedTool(backend, str(path), max_calls=5, run_id="r")
    waiting, reserve = threading.Event(), tool.cache.reserve
    monkeypatch.setattr(tool.cache, "reserve", lambda *args: (waiting.set(), reserve(*args))[1])
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")

    async def main():
        call = asyncio.ensure_future(tool(text("q")))
        while not waiting.is_set():
            await asyncio.sleep(0.005)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        other.execute("COMMIT")  # the reservation commits now, in its worker thread

    asyncio.run(main())  # returns once the worker threads are done
    assert backend.calls == 0 and tool.cache.spent(BudgetKey("r", "text_search", "counting")) == (0, 0.0)


def test_a_tool_that_computes_a_nan_cost_fails_its_call_and_the_budget_stays_a_number(tmp_path):
    class NaNCost(CountingTool):
        provider = SimpleNamespace(cost_per_call=0.25)

        async def __call__(self, request: ToolRequest) -> ToolResult:
            return ToolResult("[Text Search Results] x", cost=float("nan"))

    tool = CachedTool(NaNCost(), str(tmp_path / "c.sqlite"), max_cost=1.0, run_id="r")
    for query in ("a", "b"):  # was an IntegrityError (NaN is stored as NULL), the call never settled
        with pytest.raises(ValueError, match="ToolResult cost must be a finite number"):
            run(tool, text(query))
    assert tool.cache.spent(BudgetKey("r", "text_search", "counting")) == (2, 0.5)  # charged, as any call that raised


class Metered(CountingTool):
    """Counts its calls as a web backend's HTTP client does (``tools/<client>/calls``): not per tool kind."""

    def metrics(self) -> dict[str, float]:
        return {"tools/meter/calls": float(self.calls)}


def test_a_cache_registered_under_two_kinds_logs_its_backends_counters_once(tmp_path):
    # Text search "x", image search, text search "y": 3 backend calls. Each kind's entry logged the backend's
    # counter (tools/image_search/meter/calls and tools/text_search/meter/calls, 3 each: 6 calls in the logs).
    from mmsr.metrics import tool_counters

    backend = Metered()
    tool = CachedTool(backend, str(tmp_path / "c.sqlite"))
    for request in (text("x"), ToolRequest("image_search", image_url="https://img.example/1.jpg"), text("y")):
        assert run(tool, request).ok
    logged = tool_counters({"image_search": tool, "text_search": tool})
    assert {k: v for k, v in logged.items() if k.endswith("/meter/calls")} == {"tools/text_search/meter/calls": 3.0}
    assert logged["tools/text_search/api_calls"] == 2 and logged["tools/image_search/api_calls"] == 1  # each its own
    alone = tool_counters({"text_search": CachedTool(Metered(), str(tmp_path / "d.sqlite"))})
    assert alone["tools/text_search/meter/calls"] == 0.0  # a cache under one kind logs them there, as before


class Focused(SlowPaid):
    """A web text search: summaries written for the request's question."""

    question_focused = True

    async def __call__(self, request: ToolRequest) -> ToolResult:
        result = await super().__call__(request)
        return replace(result, text=f"{result.text}summarized for: {request.question}\n")


def _focus(result: ToolResult) -> str:
    return result.text.rsplit(": ", 1)[1].strip()


def _keys(path) -> list[str]:
    with sqlite3.connect(path) as db:
        return sorted(key for (key,) in db.execute("SELECT key FROM results"))


def test_a_question_focused_search_serves_each_question_its_own_summaries_cold_and_warm(tmp_path):
    # Two rows search the same query, one after the other: the second was served the summaries written for the
    # first's question (both were keyed "q:<query>"), in this run and in the next one.
    path, questions = tmp_path / "c.sqlite", ("How tall is it?", "Who built it?")
    asked = [ToolRequest("text_search", "Eiffel  Tower height", sample_id="a", question=questions[0]),
             ToolRequest("text_search", "eiffel tower height", sample_id="b", question=questions[1])]  # fmt: skip
    backend = Focused(delay_s=0.0)
    assert [_focus(run(CachedTool(backend, str(path)), r)) for r in asked] == list(questions)  # cold
    assert backend.calls == 2
    query = "q:eiffel tower height|question:"
    assert _keys(path) == [query + "how tall is it?", query + "who built it?"]
    warm = CachedTool(backend, str(path))
    assert [_focus(run(warm, r)) for r in reversed(asked)] == list(reversed(questions))
    replay = CachedTool(None, str(path), mode="replay_only", provider="counting", question_focused=True)
    assert [_focus(run(replay, r)) for r in asked] == list(questions)
    assert backend.calls == 2 and warm.counts["text_search/cache_hits"] == 2
    with pytest.raises(ReplayMiss):  # a third question was never asked: its own summaries are not there
        run(replay, replace(asked[0], question="When was it built?"))


def test_a_question_focused_backend_under_another_tool_kind_serves_each_question_its_own_summaries(tmp_path):
    # A custom text tool (a Tool named wiki_search) backed by a web text search: its key left the question out, so
    # row b was served the summaries written for row a's question. Image search's key stays the image alone.
    path, questions = tmp_path / "c.sqlite", ("How tall is it?", "Who built it?")
    backend, image = Focused(delay_s=0.0), Image.new("RGB", (4, 4), "red")
    tool = CachedTool(backend, str(path))
    asked = [ToolRequest("wiki_search", "Eiffel Tower", sample_id=row, question=q) for row, q in zip("ab", questions)]
    assert [_focus(run(tool, r)) for r in asked] == list(questions) and backend.calls == 2
    assert _keys(path) == ["q:eiffel tower|question:how tall is it?", "q:eiffel tower|question:who built it?"]
    assert [_focus(run(tool, r)) for r in asked] == list(questions) and backend.calls == 2  # warm: hits
    assert request_key(ToolRequest("image_search", image=image, question="Who?"), True) == image_key(image)


def test_a_search_that_ignores_the_question_keeps_its_recorded_key(tmp_path):
    # Replayed MMSearch-R1 outputs, FVQA caches and local search were recorded under "q:<query>": still hit.
    path = tmp_path / "c.sqlite"
    backend = CountingTool()
    tool = CachedTool(backend, str(path))
    for question in ("How tall is it?", "Who built it?"):
        assert run(tool, ToolRequest("text_search", "Eiffel  Tower", question=question)).ok
    assert backend.calls == 1 and _keys(path) == ["q:eiffel tower"] and not tool.question_focused
    replay = CachedTool(None, str(path), mode="replay_only", provider="counting")
    assert run(replay, ToolRequest("text_search", "eiffel tower", question="Anything?")).ok


def test_a_miss_in_flight_is_joined_only_by_callers_of_the_same_question(tmp_path):
    # Two rows' text searches of the same query at once: each question pays its own call (its summaries focus
    # on it); the same row's same question joins. Image search, whose backends answer the image alone, joins
    # across questions.
    backend = Focused()
    tool = CachedTool(backend, str(tmp_path / "c.sqlite"))
    asked = [ToolRequest("text_search", "Eiffel  Tower height", sample_id=row, question=q)
             for row, q in (("a", "How tall is it?"), ("b", "Who built it?"), ("a", "How tall is it?"))]  # fmt: skip
    results = _together(tool, asked)
    assert [_focus(r) for r in results] == ["How tall is it?", "Who built it?", "How tall is it?"]
    assert backend.calls == 2 and tool.counts["text_search/cache_joined"] == 1
    picture = Image.new("RGB", (8, 8), "blue")
    images = [ToolRequest("image_search", image=picture, question=q) for q in ("How tall is it?", "Who built it?")]
    assert all(r.ok for r in _together(tool, images)) and backend.calls == 3


class ByRow(SlowPaid):
    """An FVQA-cache-like image search: looks the request's row up, a failure naming it when it has none."""

    async def __call__(self, request: ToolRequest) -> ToolResult:
        result = await super().__call__(request)
        if request.sample_id == "gone":
            return failure(request.kind, f"row {request.sample_id!r} has no cached search")
        return replace(result, text=result.text.replace("title: T", f"title: row {request.sample_id}"))


def test_a_joiner_of_another_row_gets_its_own_rows_answer_not_the_starters(tmp_path):
    # Two rows with the same picture image-search at once; the backend was asked for the first row only, and the
    # second row was shown "row 'gone' has no cached search" though its own row has results.
    backend = ByRow()
    tool = CachedTool(backend, str(tmp_path / "c.sqlite"))
    picture = Image.new("RGB", (8, 8), "green")
    gone, kept, kept_again = _together(tool, [ToolRequest("image_search", image=picture, sample_id=row)
                                             for row in ("gone", "b", "b")])  # fmt: skip
    assert not gone.ok and "'gone'" in gone.text
    assert kept.ok and kept_again.ok and "title: row b" in kept.text and kept_again.text == kept.text
    assert backend.calls == 2 and tool.counts["image_search/cache_joined"] == 1  # row b's episodes still join


FAST = Limits(timeout_s=2.0, retries=1, backoff_s=0.01, backoff_max_s=0.02, breaker_failures=0)


class TinyWeb:
    """Serper, Jina and summarizer routes: 8 results, and summaries of as many sentences as the prompt allows."""

    def __init__(self) -> None:
        self.searches = 0

    async def search(self, request: web.Request) -> web.Response:
        self.searches += 1
        return web.json_response(serper([(f"Page {i}", f"http://example.com/p{i}", "") for i in range(1, 9)]))

    async def read(self, request: web.Request) -> web.Response:
        return web.json_response(jina("T", (await request.json())["url"], "Paris is the capital of France. " * 10))

    async def summarize(self, request: web.Request) -> web.Response:
        system = (await request.json())["messages"][0]["content"]
        most = int(system.split("at most ", 1)[1].split()[0])
        return web.json_response(chat_completion(" ".join(f"Sentence {i}." for i in range(1, most + 1))))

    def routes(self) -> list:
        return [("*", "/search", self.search), ("POST", "/jina", self.read),
                ("POST", "/v1/chat/completions", self.summarize)]  # fmt: skip


def _web_text(url: str, **settings) -> WebTextSearch:
    """A web text search of ``TinyWeb`` at ``url``, configured as by default but ``top_k`` and the summarizer's
    ``max_sentences`` in ``settings`` (endpoints, ``allow_private`` and limits only say where and how fast)."""
    llm = OpenAISummarizer(base_url=url + "/v1", model="qwen", limits=FAST, **settings.pop("summarizer", {}))
    reader = JinaReader(endpoint=url + "/jina", allow_private=True, limits=FAST)
    return WebTextSearch(Serper(endpoint=url + "/search", limits=FAST), reader, llm, **settings)


def _record(path, tiny: TinyWeb, *configured: dict) -> list[ToolResult]:
    """The answers of a fresh ``CachedTool`` per configuration to the same request, one after the other."""

    async def main():
        async with serve(tiny.routes()) as url:
            asked = ToolRequest("text_search", "capital of france", question="Which city?")
            return [await CachedTool(_web_text(url, **dict(settings)), str(path))(asked) for settings in configured]

    return asyncio.run(main())


def test_a_web_search_configured_otherwise_pays_its_own_call_and_the_same_settings_hit(tmp_path, monkeypatch):
    # The key was kind + provider name + request + version: a run asking for top_k=2 and 2-sentence summaries was
    # served the 4 results of 5 sentences a top_k=4 run recorded, and made no call.
    monkeypatch.setenv("SERPER_API_KEY", "sk-test")
    tiny, wide, narrow = TinyWeb(), {"top_k": 4}, {"top_k": 2, "summarizer": {"max_sentences": 2}}
    recorded, asked, hit, hit_again = _record(tmp_path / "c.sqlite", tiny, wide, narrow, wide, narrow)
    assert len(recorded.titles) == 4 and "Sentence 5." in recorded.text
    assert asked.titles == ("Page 1", "Page 2") and "Sentence 2." in asked.text and "Sentence 3." not in asked.text
    assert tiny.searches == 2 and (hit.text, hit_again.text) == (recorded.text, asked.text)  # the same settings hit
    assert asked.cost > 0 and hit.cost == hit_again.cost == 0.0


def test_a_web_search_configured_as_by_default_keeps_its_key_from_before_settings_were_keyed(tmp_path, monkeypatch):
    # Caches already paid for must keep hitting: only settings that differ from the defaults are keyed, and a
    # setting's hash is the same in every process (sorted JSON + SHA-256, never Python's salted ``hash``).
    monkeypatch.setenv("SERPER_API_KEY", "sk-test")
    monkeypatch.setenv("SERPAPI_API_KEY", "sk-test")
    path, tiny = tmp_path / "c.sqlite", TinyWeb()
    assert _record(path, tiny, {})[0].ok
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT tool, provider, key, version FROM results").fetchall()
    assert rows == [("text_search", "serper+jina_reader+qwen", "q:capital of france|question:which city?", "1")]
    url = "http://127.0.0.1:1"
    narrow = CachedTool(_web_text(url, top_k=2, summarizer={"max_sentences": 2}), str(path))
    assert narrow.key_version == "1+c10587b910c0"  # sha256(b'{"summarizer":{"max_sentences":2},"top_k":2}')[:12]
    lens = SerpAPILens(endpoint=url, api_key_env="SERPAPI_API_KEY", limits=FAST, cost_per_call=0.5)  # no result shaped
    assert CachedTool(WebImageSearch(lens, allow_private=True, thumbnail_limits=FAST), version="3").key_version == "3"
    small = WebImageSearch(SerpAPILens(hl="fr"), max_side=256)
    assert CachedTool(small).key_version == "1+4ddbf0adb20f"  # sha256(b'{"max_side":256,"provider":{"hl":"fr"}}')


class EchoURL:
    """An image search whose answer names the image URL it was asked about."""

    provider_name = "echo_url"

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, request: ToolRequest) -> ToolResult:
        self.calls += 1
        await asyncio.sleep(0.05)
        return ToolResult(f"[Image Search Results] for {request.image_url}", cost=0.1)


def test_a_miss_in_flight_is_joined_only_by_a_request_for_the_same_image_url(tmp_path):
    """Two searches of one row's pixels under two URLs (a Lens upload is by URL): the second joined the first's call
    and got the answer for the other URL when the in-flight key left the URL out (a mutant no test caught)."""
    backend, picture = EchoURL(), Image.new("RGB", (8, 8), "blue")
    tool = CachedTool(backend, str(tmp_path / "c.sqlite"))
    urls = ("http://a.example/1.jpg", "http://b.example/2.jpg")
    requests = [ToolRequest("image_search", image=picture, sample_id="r", image_url=u) for u in urls]

    async def both():
        return await asyncio.gather(*(tool(r) for r in requests))

    answers = asyncio.run(both())
    assert [u in a.text for a, u in zip(answers, urls)] == [True, True] and backend.calls == 2
