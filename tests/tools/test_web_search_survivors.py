"""Web search behaviour a mutation audit found untested: a page read the guard refused is not charged, the
readers' and thumbnails' boundaries, SerpAPI's error field, Serper's request body, when an answer is whole enough
to cache, and the time each stage keeps for the next. Deterministic: no network, and a scripted deadline stands
for the clock where a stage's time share is pinned (``ScriptedDeadline``)."""

from __future__ import annotations

import asyncio
import math
from types import SimpleNamespace

import pytest
from PIL import Image

import mmsr.tools.web.image_search as image_search_module
import mmsr.tools.web.text_search as text_search_module
from mmsr.tools import ToolRequest
from mmsr.tools.cache import CachedTool
from mmsr.tools.web.fake import png, serpapi_lens, serper, serve
from mmsr.tools.web.http import Body, Limits, Retryable, ToolError, transient
from mmsr.tools.web.image_search import URLTemplateHost, WebImageSearch
from mmsr.tools.web.images import cut_short, decode_checked, shrunk
from mmsr.tools.web.providers import SerpAPIGoogle, SerpAPILens, Serper
from mmsr.tools.web.reader import declared_text, looks_binary
from mmsr.tools.web.text_search import WebTextSearch

from .fake_web import Script
from .test_web_reader import read
from .test_web_search import FAST, _pipeline, jina_reader, keys, summarizer  # noqa: F401 (keys: autouse)


class ScriptedDeadline:
    """A stand-in for ``Deadline``: ``left`` says there is time to the first ``starts`` asks and none after;
    ``run`` records the ``keep_s`` each step was given (by its ``what``) and runs the step unbounded."""

    def __init__(self, starts: float = math.inf) -> None:
        self.starts, self.asked, self.kept = starts, 0, {}

    def left(self, keep_s: float = 0.0) -> float:
        self.asked += 1
        return 1.0 if self.asked <= self.starts else 0.0

    async def run(self, step, what: str, keep_s: float = 0.0):
        self.kept.setdefault(what, []).append(keep_s)
        return await step


def scripted(monkeypatch, module, starts: float = math.inf) -> list[ScriptedDeadline]:
    """Each call of ``module``'s tool gets a fresh ``ScriptedDeadline``; the list of them, in call order."""
    made: list[ScriptedDeadline] = []

    def after(budget_s: float | None, reserve_s: float = 0.0) -> ScriptedDeadline:
        made.append(ScriptedDeadline(starts))
        return made[-1]

    monkeypatch.setattr(module, "Deadline", SimpleNamespace(after=after))
    return made


# --- readers -------------------------------------------------------------------------------------------------


def test_a_page_url_the_guard_refuses_is_neither_sent_nor_charged():
    # The reader costs $0.01 a page: a refused page used to be charged as a sent call.
    results = [(f"Page {i}", f"http://127.0.0.1:1/p{i}", "") for i in (1, 3)]
    jina = Script((500, "never asked"))

    async def main():
        async with serve([("*", "/search", Script((200, serper(results)))), ("POST", "/jina", jina)]) as url:
            tool = _pipeline(url, Serper(endpoint=url + "/search", limits=FAST, cost_per_call=0.5))
            tool.reader.allow_private = False  # the pages' loopback URLs are refused; the reader service is local
            with pytest.raises(ToolError) as refused:
                await tool.reader.read(results[0][1])
            return refused.value, await tool(ToolRequest("text_search", "q")), tool.metrics()

    refused, result, metrics = asyncio.run(main())
    assert refused.kind == "refused" and not refused.sent
    assert not result.ok and result.cost == pytest.approx(0.5)  # the search only
    assert metrics["tools/text_search/page_refused"] == 2 and not jina.requests


def test_a_page_of_exactly_min_chars_is_kept_and_one_character_less_is_not():
    text = "0123456789" * 5  # DirectReader's default min_chars: 50
    assert read(text.encode(), "text/plain; charset=utf-8").text == text
    with pytest.raises(ToolError, match=r"no readable text \(49 characters\)"):
        read(text[:49].encode(), "text/plain; charset=utf-8")


def test_a_plain_text_body_with_a_nul_is_binary_though_nearly_all_of_it_is_text():
    # One NUL in ~1,000 characters is far under the 5% of control characters: the NUL alone says "binary".
    text = "Plain notes on the Hammond organ, invented in 1934.\n" * 20
    body = text[:500] + "\x00" + text[500:]
    assert not looks_binary(text) and looks_binary(body)
    with pytest.raises(ToolError, match="no readable text"):
        read(body.encode(), "text/plain; charset=utf-8")


@pytest.mark.parametrize("charset", ["unicode_escape", "raw_unicode_escape"])
def test_a_page_labelled_with_an_escape_codec_is_not_unescaped(charset):
    # Not UTF-8 (the "é"), so the label would be tried: it must not turn the page's "\u0041" into "A".
    text = "Caf\xe9 notes: the sign on the door reads \\u0041 and stays so. " * 3
    body = Body(text.encode("cp1252"))
    body.content_type, body.charset = "text/plain", charset
    assert declared_text(body) is None
    assert "reads \\u0041 and" in read(bytes(body), f"text/plain; charset={charset}").text


# --- images --------------------------------------------------------------------------------------------------


def test_the_pixel_and_aspect_caps_keep_an_image_at_the_cap_and_refuse_one_over():
    assert decode_checked(png("red", (60, 40)), max_pixels=2400).size == (60, 40)
    with pytest.raises(ToolError, match=r"60x40, over 2399 pixels") as info:
        decode_checked(png("red", (60, 40)), max_pixels=2399)
    assert info.value.kind == "too_large"
    assert shrunk(Image.new("RGB", (400, 2)), max_side=1024).size == (400, 2)  # MAX_ASPECT = 200 to 1
    with pytest.raises(ToolError, match=r"401x2, a shape the model cannot take"):
        shrunk(Image.new("RGB", (401, 2)), max_side=1024)


def test_a_transient_failure_after_the_top_k_thumbnails_leaves_the_answer_whole_and_cached(tmp_path):
    red, busy = Image.new("RGB", (4, 4), "red"), Retryable("thumbnails: HTTP 503", "http_5xx")
    assert not cut_short([red, red, busy], top_k=2) and cut_short([red, busy, red], top_k=2)
    lens = Script()
    thumbs = {"/t1": Script((200, png("red"))), "/t2": Script((200, png("green"))), "/t3": Script((503, "busy"))}
    request = ToolRequest("image_search", image=Image.new("RGB", (8, 8)), image_url="https://x.example/q.jpg")

    async def main():
        async with serve([("GET", "/lens", lens)] + [("GET", p, s) for p, s in thumbs.items()]) as url:
            lens.responses = [(200, serpapi_lens([(f"M{i}", f"{url}/t{i}") for i in range(1, 4)]))]
            tool = WebImageSearch(SerpAPILens(endpoint=url + "/lens", limits=FAST), top_k=2, allow_private=True,
                                  thumbnail_limits=Limits(timeout_s=2.0, retries=0, breaker_failures=0))  # fmt: skip
            cached = CachedTool(tool, str(tmp_path / "c.sqlite"))
            return [await cached(request) for _ in range(2)]

    first, again = asyncio.run(main())
    assert first.titles == ("M1", "M2") and not first.partial
    assert again.titles == first.titles and len(lens.requests) == 1  # stored at once, served from then on


# --- providers -----------------------------------------------------------------------------------------------


def test_a_serpapi_error_that_mentions_results_is_an_api_error_and_not_retried():
    # Only SerpAPI's "hasn't returned any results" means empty; an empty account does not heal on a retry.
    script = Script((200, {"error": "Your account has run out of searches. Upgrade your plan for more results."}))

    async def main():
        async with serve([("GET", "/search", script)]) as url:
            with pytest.raises(ToolError) as info:
                await SerpAPIGoogle(endpoint=url + "/search", limits=FAST).search("q")  # FAST: one retry
            return info.value

    error = asyncio.run(main())
    assert error.kind == "api_error" and "run out of searches" in error.reason
    assert not transient(error) and len(script.requests) == 1


def test_serper_sends_the_language_and_country_it_was_given():
    script = Script((200, serper([])))

    async def main():
        async with serve([("POST", "/search", script)]) as url:
            return await Serper(endpoint=url + "/search", num=7, hl="de", gl="at", limits=FAST).search("q")

    assert asyncio.run(main()) == []
    assert script.requests[0]["json"] == {"q": "q", "num": 7, "hl": "de", "gl": "at"}


# --- text search ---------------------------------------------------------------------------------------------


def test_results_past_max_candidates_are_never_read():
    results = [("Page /p2", "http://127.0.0.1:1/p2", ""), ("Page /p1", "http://127.0.0.1:1/p1", "")]

    async def main():
        routes = [("*", "/search", Script((200, serper(results)))), ("POST", "/jina", jina_reader),
                  ("POST", "/v1/chat/completions", summarizer)]  # fmt: skip
        async with serve(routes) as url:
            tool = _pipeline(url, Serper(endpoint=url + "/search", limits=FAST))
            tool.top_k = tool.max_candidates = 1  # /p2 fails; /p1 is the provider's second result, past the cap
            return await tool(ToolRequest("text_search", "q"))

    result = asyncio.run(main())
    assert not result.ok and "none of the 1 result pages could be read" in result.text


def _text_search(url: str) -> WebTextSearch:
    """``_pipeline`` whose summarizer's timeout (3 s) differs from the reader's (2 s), so each keep is told apart."""
    tool = _pipeline(url, Serper(endpoint=url + "/search", limits=FAST))
    tool.summarizer.client.limits = Limits(timeout_s=3.0, retries=1, backoff_s=0.01, backoff_max_s=0.02,
                                           breaker_failures=0)  # fmt: skip
    return tool


def test_a_page_read_leaves_one_summary_attempt_its_time(monkeypatch):
    deadlines = scripted(monkeypatch, text_search_module)

    async def main():
        routes = [("*", "/search", Script((200, serper([("Page 1", "http://127.0.0.1:1/p1", "")])))),
                  ("POST", "/jina", jina_reader), ("POST", "/v1/chat/completions", summarizer)]  # fmt: skip
        async with serve(routes) as url:
            return await _text_search(url)(ToolRequest("text_search", "q", budget_s=30.0))

    assert asyncio.run(main()).ok
    assert deadlines[0].kept == {"the search": [5.0], "the page read": [3.0], "the summary": [0.0]}


def test_an_answer_the_deadline_cut_short_of_top_k_is_partial_and_not_cached(monkeypatch, tmp_path):
    # Time for two pages only: /p1 is summarized, /p5 is empty, /p3 is never tried for lack of time.
    scripted(monkeypatch, text_search_module, starts=2)
    results = [(f"Page {p}", f"http://127.0.0.1:1{p}", "") for p in ("/p1", "/p5", "/p3")]
    search = Script((200, serper(results)))

    async def main():
        routes = [("*", "/search", search), ("POST", "/jina", jina_reader),
                  ("POST", "/v1/chat/completions", summarizer)]  # fmt: skip
        async with serve(routes) as url:
            tool = _text_search(url)
            tool.top_k = 2
            cached = CachedTool(tool, str(tmp_path / "c.sqlite"))
            return [await cached(ToolRequest("text_search", "q", budget_s=30.0)) for _ in range(2)]

    for result in asyncio.run(main()):
        assert result.ok and result.titles == ("Page /p1",) and result.partial
    assert len(search.requests) == 2  # never stored: asked again


# --- image search --------------------------------------------------------------------------------------------


def test_the_image_upload_leaves_the_search_and_one_thumbnail_attempt_their_time(monkeypatch):
    deadlines = scripted(monkeypatch, image_search_module)
    lens = Script((200, serpapi_lens([])))

    async def main():
        async with serve([("GET", "/lens", lens)]) as url:
            tool = WebImageSearch(SerpAPILens(endpoint=url + "/lens", limits=FAST),  # 2 s; thumbnails: 15 s
                                  image_host=URLTemplateHost("https://img.example/{sample_id}.png"))  # fmt: skip
            request = ToolRequest("image_search", image=Image.new("RGB", (8, 8)), sample_id="row1", budget_s=30.0)
            return await tool(request)

    assert asyncio.run(main()).ok and lens.requests[0]["query"]["url"] == "https://img.example/row1.png"
    assert deadlines[0].kept == {"the image upload": [17.0], "the search": [15.0]}
