"""Budgets that add up (issue #18): the web tools answer within the caller's cap, skipping slow pages, and a
configuration whose nested timeouts cannot fit the cap is refused at start-up."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import yaml
from aiohttp import web
from jsonargparse import ArgumentParser
from PIL import Image

from mmsr.module import GRPOModule
from mmsr.rollout.loop import RolloutSettings
from mmsr.tools import SearchTool, ToolRequest, ToolResult
from mmsr.tools.budget import BudgetError, Deadline, check_budgets
from mmsr.tools.cache import CachedTool
from mmsr.tools.format import TEXT_NONE
from mmsr.tools.server import HTTPSearchTool, SearchServer
from mmsr.tools.web.fake import chat_completion, jina, png, serpapi_lens, serper, serve
from mmsr.tools.web.http import Limits, ToolError
from mmsr.tools.web.image_search import WebImageSearch
from mmsr.tools.web.providers import SerpAPILens, Serper
from mmsr.tools.web.reader import JinaReader
from mmsr.tools.web.summarizer import OpenAISummarizer
from mmsr.tools.web.text_search import WebTextSearch

from .fake_web import Script

ROOT = Path(__file__).resolve().parents[2]


def fast(timeout_s: float, retries: int = 0) -> Limits:
    return Limits(timeout_s=timeout_s, retries=retries, backoff_s=0.01, backoff_max_s=0.02, breaker_failures=0)


@pytest.fixture(autouse=True)
def keys(monkeypatch):
    for var in ("SERPAPI_API_KEY", "SERPER_API_KEY"):
        monkeypatch.setenv(var, "test-key-0123456789")


def handlers(slow_read: set[int], slow_summary: set[int]):
    """A Jina reader and a summarizer that hang (30 s) on the given result pages."""

    async def reader(request: web.Request) -> web.Response:
        url = (await request.json())["url"]
        page = int(url.rsplit("/p", 1)[1])
        if page in slow_read:
            await asyncio.sleep(30)
        return web.json_response(jina(f"Page {page}", url, f"Text of page {page}. " * 10))

    async def summarizer(request: web.Request) -> web.Response:
        text = (await request.json())["messages"][1]["content"].split("Web page:\n", 1)[1]
        if any(f"page {p}." in text for p in slow_summary):
            await asyncio.sleep(30)
        return web.json_response(chat_completion(f"Summary of {text[:18]}"))

    return reader, summarizer


def run_text_search(budget_s: float, read: Limits, summary: Limits, slow_read=(), slow_summary=(), search=None):
    """(result, wall seconds, metrics) of one call over 6 results, 3 summaries wanted, 0.3 s reserve."""
    results = [(f"Page {i}", f"http://127.0.0.1:1/p{i}", "") for i in range(1, 7)]
    search = search or Script((200, serper(results)))
    reader, summarizer = handlers(set(slow_read), set(slow_summary))

    async def main():
        routes = [("POST", "/search", search), ("POST", "/jina", reader), ("POST", "/v1/chat/completions", summarizer)]
        async with serve(routes) as url:
            provider = Serper(endpoint=url + "/search", limits=fast(0.5, retries=3))
            pages = JinaReader(endpoint=url + "/jina", allow_private=True, limits=read)
            llm = OpenAISummarizer(base_url=url + "/v1", model="m", limits=summary)
            tool = WebTextSearch(provider, pages, llm, top_k=3, max_candidates=6, reserve_s=0.3)
            tool.check_budget(budget_s)  # every case here is a configuration `mmsr fit` accepts
            start = time.perf_counter()
            result = await tool(ToolRequest("text_search", "q", budget_s=budget_s))
            return result, time.perf_counter() - start, tool.metrics()

    return asyncio.run(main())


def test_a_hanging_page_is_skipped_for_the_next_result_within_the_cap():
    # p2's read times out after its 0.4 s attempt: result 4 takes its place.
    result, wall, metrics = run_text_search(3.0, read=fast(0.4), summary=fast(0.4), slow_read={2})
    assert wall < 3.0 and result.ok and result.titles == ("Page 1", "Page 3", "Page 4")
    assert metrics["tools/text_search/page_timeout"] == 1


def test_a_reader_too_slow_for_the_remaining_budget_is_skipped():
    # p2's read is retried (1 s attempts) until only one summary attempt (1 s) is left before the deadline
    # (3 - 0.3 reserve): then it is dropped, no new page can be summarized in time, and the tool answers.
    result, wall, metrics = run_text_search(3.0, read=fast(1.0, retries=5), summary=fast(1.0), slow_read={2})
    assert 1.6 < wall < 3.0 and result.ok and result.titles == ("Page 1", "Page 3")
    assert metrics["tools/text_search/page_deadline"] == 1 and metrics["tools/jina_reader/retry_timeout"] >= 1


def test_a_summary_too_slow_for_the_remaining_budget_is_skipped():
    result, wall, metrics = run_text_search(3.0, read=fast(0.8), summary=fast(0.8, retries=5), slow_summary={3})
    assert 2.5 < wall < 3.0 and result.ok and result.titles == ("Page 1", "Page 2")
    assert metrics["tools/text_search/page_deadline"] == 1


def test_no_page_in_time_is_a_clear_failure_within_the_cap():
    result, wall, _ = run_text_search(3.0, read=fast(1.0, retries=5), summary=fast(1.0), slow_read=range(1, 7))
    assert wall < 3.0 and not result.ok
    assert "none of the 6 result pages could be read within the 3 s time limit" in result.text


def test_a_search_slower_than_its_share_fails_within_the_cap():
    # The search may use 3 - 0.3 - (0.4 + 0.4) = 1.9 s: three 0.5 s attempts time out, the fourth is cut.
    result, wall, metrics = run_text_search(3.0, read=fast(0.4), summary=fast(0.4), search=Script(("sleep", 30)))
    assert 1.8 < wall < 3.0 and not result.ok and "the search did not finish" in result.text
    assert metrics["tools/text_search/search_deadline"] == 1


def test_slow_thumbnails_are_skipped_within_the_cap():
    thumbs = {"/t1": Script((200, png("red"))), "/t2": Script(("sleep", 30)), "/t3": Script((200, png("blue")))}
    lens = Script()

    async def main():
        routes = [("GET", path, script) for path, script in thumbs.items()] + [("GET", "/lens", lens)]
        async with serve(routes) as url:
            lens.responses = [(200, serpapi_lens([(f"Match {i}", f"{url}/t{i}") for i in range(1, 4)]))]
            # Lens may use 4.5 - 1.5 = 3 s: CI's suite twice stalled this process ~1.3 s early in the call (the
            # Lens call timed out, the search failed at 1.3 s); any attempt here now outlasts such a stall
            tool = WebImageSearch(SerpAPILens(endpoint=url + "/lens", limits=fast(3.0)), top_k=3, allow_private=True,
                                  thumbnail_limits=fast(1.5, retries=5), reserve_s=0.5)  # fmt: skip
            tool.check_budget(5.0)
            start = time.perf_counter()
            image = Image.new("RGB", (8, 8))
            request = ToolRequest("image_search", image=image, image_url="https://x/q.jpg", budget_s=5.0)
            return await tool(request), time.perf_counter() - start, tool.metrics()

    result, wall, metrics = asyncio.run(main())
    assert result.ok and result.titles == ("Match 1", "Match 3"), result.text
    assert metrics["tools/image_search/thumbnail_deadline"] == 1, metrics
    assert 4.3 < wall < 5.0  # t2 cut at the deadline (5 - 0.5 reserve), within the cap


def test_the_budget_travels_through_cache_client_and_server(tmp_path):
    seen: list[ToolRequest] = []

    class Recorder:
        async def __call__(self, request: ToolRequest) -> ToolResult:
            seen.append(request)
            return ToolResult(TEXT_NONE)

    async def main():
        server = SearchServer(text_search=CachedTool(Recorder(), str(tmp_path / "server.sqlite"), "off"), port=0)
        port = await server.start()
        client = CachedTool(HTTPSearchTool(f"http://127.0.0.1:{port}", reserve_s=0.5), str(tmp_path / "client.sqlite"))
        try:
            return await client(ToolRequest("text_search", "q", question="why?", budget_s=10.0))
        finally:
            await server.stop()

    assert asyncio.run(main()).ok
    # 10 s, less the client's 0.5 s round-trip reserve and the two cache lookups (opening new SQLite files: up to
    # seconds on a loaded machine); the question travels too
    assert len(seen) == 1 and 6.0 < seen[0].budget_s < 9.5 and seen[0].question == "why?"


# --- the start-up check ----------------------------------------------------------------------------------------


def test_default_web_tools_fit_the_paper_cap_and_not_the_default_one():
    tool = WebTextSearch(Serper(limits=Limits(timeout_s=20.0)), JinaReader(), OpenAISummarizer("http://x/v1", "m"))
    tool.check_budget(120.0)  # configs/mmsearch_r1 (tool_timeout_s: 120) + configs/tools/web_text_search.yaml
    with pytest.raises(BudgetError) as info:
        check_budgets({"image_search": None, "text_search": CachedTool(tool, mode="off")}, 30.0)
    message = str(info.value)
    assert message.startswith("text_search (CachedTool): WebTextSearch cannot fit the per-call cap "
                              "rollout.tool_timeout_s=30 s")  # fmt: skip
    assert "serper 20 s (worst 4 x 20 s + " in message and "jina_reader 30 s" in message
    assert "summarizer 60 s" in message and "= 111 s > 30 s" in message and "raise rollout.tool_timeout_s" in message
    image = WebImageSearch(SerpAPILens())
    image.check_budget(120.0)
    with pytest.raises(BudgetError, match=r"WebImageSearch.*serpapi_lens 30 s.*thumbnails 15 s.* = 46 s > 30 s"):
        image.check_budget(30.0)


def test_fit_refuses_a_config_whose_budgets_cannot_fit():
    tool = WebTextSearch(Serper(), JinaReader(), OpenAISummarizer("http://x/v1", "m"))
    with pytest.raises(BudgetError, match="text_search .*WebTextSearch cannot fit .*tool_timeout_s=30 s"):
        GRPOModule(policy=None, text_search=tool, rollout=RolloutSettings(tool_timeout_s=30.0))  # before the policy
    with pytest.raises(BudgetError, match="HTTPSearchTool"):
        check_budgets({"text_search": HTTPSearchTool(reserve_s=1.0)}, 0.5)


def test_deadline_run_cuts_a_step_and_keeps_time_for_later_stages():
    async def main():
        deadline = Deadline.after(0.5)
        start = time.perf_counter()
        with pytest.raises(ToolError, match="the read did not finish") as info:
            await deadline.run(asyncio.sleep(10), "the read", keep_s=0.3)
        assert info.value.kind == "deadline" and 0.15 < time.perf_counter() - start < 0.45  # 0.2 s, a slow wake-up
        with pytest.raises(ToolError, match="no time left for the summary"):
            await deadline.run(asyncio.sleep(0), "the summary", keep_s=0.4)
        assert await Deadline().run(asyncio.sleep(0, "done"), "anything") == "done"  # no budget: no limit

    asyncio.run(main())


@pytest.mark.parametrize("snippet", ["web_text_search", "web_text_search_serpapi_direct", "web_image_search", "server"])
def test_shipped_web_configs_fit_the_paper_cap(snippet):
    """The tool snippets fit the mmsearch_r1 configs' 120 s cap (the server: 119 s, after a client's reserve)."""
    config = yaml.safe_load((ROOT / "configs" / "tools" / f"{snippet}.yaml").read_text())
    tools = config["server"] if snippet == "server" else config["model"]["init_args"]
    tools = {k: v for k, v in tools.items() if k in ("image_search", "text_search")}
    parser = ArgumentParser()
    for kind in tools:
        parser.add_argument(f"--{kind}", type=SearchTool)
    built = vars(parser.instantiate(parser.parse_object(tools)))
    assert all(hasattr(tool, "check_budget") for tool in built.values())
    check_budgets(built, 119.0 if snippet == "server" else 120.0)
