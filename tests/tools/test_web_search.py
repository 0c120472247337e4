"""Web image and text search end to end, against local servers in the providers' documented formats."""

from __future__ import annotations

import asyncio

import pytest
import yaml
from aiohttp import web
from PIL import Image

from mmsr.tools import IMAGE_MARKER, ToolRequest
from mmsr.tools.cache import CachedTool, request_key
from mmsr.tools.format import TEXT_NONE
from mmsr.tools.web.fake import chat_completion, jina, png, serpapi_google, serpapi_lens, serper, serve
from mmsr.tools.web.http import Limits, ToolError
from mmsr.tools.web.image_search import URLTemplateHost, WebImageSearch
from mmsr.tools.web.providers import SerpAPIGoogle, SerpAPILens, Serper
from mmsr.tools.web.reader import DirectReader, JinaReader
from mmsr.tools.web.summarizer import USER_PROMPT, OpenAISummarizer
from mmsr.tools.web.text_search import WebTextSearch

from ..conftest import ROOT

from .fake_web import Script, broken_png

FAST = Limits(timeout_s=2.0, retries=1, backoff_s=0.01, backoff_max_s=0.02, breaker_failures=0)
KEY = "sk-test-secret-123"


@pytest.fixture(autouse=True)
def keys(monkeypatch):
    for var in ("SERPAPI_API_KEY", "SERPER_API_KEY", "JINA_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.setenv(var, KEY)


def test_missing_api_key_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("SERPER_API_KEY")
    with pytest.raises(ValueError, match="SERPER_API_KEY"):
        Serper()


# --- text search -------------------------------------------------------------------------------------------

PAGES = {  # path -> (status, Jina answer): pages 2 and 5 fail, so pages 6 and 7 fill in
    "/p1": (200, jina("Eiffel Tower", "/p1", "The Eiffel Tower is in Paris. " * 10)),
    "/p2": (500, {"error": "upstream"}),
    "/p3": (200, jina("Paris", "/p3", "Paris is the capital of France. " * 10)),
    "/p4": (200, jina("Seine", "/p4", "The Seine flows through Paris. " * 10)),
    "/p5": (200, jina("Empty", "/p5", "   ")),
    "/p6": (200, jina("Louvre", "/p6", "The Louvre is a museum. " * 10)),
    "/p7": (200, jina("Versailles", "/p7", "Versailles is near Paris. " * 10)),
    "/p8": (200, jina("Unused", "/p8", "Never read. " * 10)),
}


async def jina_reader(request: web.Request) -> web.Response:
    target = (await request.json())["url"]
    status, body = PAGES["/" + target.rsplit("/", 1)[1]]
    return web.json_response(body, status=status)


async def summarizer(request: web.Request) -> web.Response:
    body = await request.json()
    page = body["messages"][1]["content"].split("Web page:\n", 1)[1]
    if "Louvre" in page:  # a malformed answer: the page is skipped like a failed read
        return web.json_response({"choices": []})
    return web.json_response(chat_completion(f"<think>hmm</think>Summary: {page[:25]}", total_tokens=1000))


def _pipeline(url: str, provider) -> WebTextSearch:
    reader = JinaReader(endpoint=url + "/jina", allow_private=True, limits=FAST, cost_per_call=0.01)
    llm = OpenAISummarizer(base_url=url + "/v1", model="qwen", limits=FAST, cost_per_million_tokens=1.0)
    return WebTextSearch(provider, reader, llm, top_k=4, max_candidates=8)


def test_a_cache_keys_web_text_search_on_the_question_its_summaries_focus_on(tmp_path):
    # Its summaries were keyed on the query alone: a later question searching it was served another's.
    url = "http://127.0.0.1:1"
    cached = CachedTool(_pipeline(url, Serper(endpoint=url + "/search", limits=FAST)), str(tmp_path / "c.sqlite"))
    asked = ToolRequest("text_search", "Eiffel  Tower", question="How  tall is it?")
    assert cached.question_focused
    assert request_key(asked, cached.question_focused) == "q:eiffel tower|question:how tall is it?"


@pytest.mark.parametrize("api", ["serper", "serpapi"])
def test_text_search_reads_summarizes_and_refills_from_the_list(api):
    results = [(f"Page {i}", f"http://127.0.0.1:1/p{i}", f"snippet {i}") for i in range(1, 9)]
    search = Script((200, serper(results) if api == "serper" else serpapi_google(results)))

    async def main():
        routes = [
            ("*", "/search", search),
            ("POST", "/jina", jina_reader),
            ("POST", "/v1/chat/completions", summarizer),
        ]
        async with serve(routes) as url:
            provider = (Serper(endpoint=url + "/search", limits=FAST, cost_per_call=0.5) if api == "serper"
                        else SerpAPIGoogle(endpoint=url + "/search", limits=FAST, cost_per_call=0.5))  # fmt: skip
            tool = _pipeline(url, provider)
            return await tool(ToolRequest("text_search", "  Eiffel   tower ")), tool

    result, tool = asyncio.run(main())
    assert result.ok and result.titles == ("Page 1", "Page 3", "Page 4", "Page 7")  # ranking order kept
    assert result.text.startswith("[Text Search Results]") and "<think>" not in result.text
    assert "1. (title: Page 1; link: http://127.0.0.1:1/p1) Summary: The Eiffel Tower is" in result.text
    # one search, 7 pages read (p8 never: 4 summaries were reached), 4 summaries of 1000 tokens (p6's answer
    # was malformed and is not charged)
    assert result.cost == pytest.approx(0.5 + 7 * 0.01 + 4 * 1000 / 1e6)
    asked = search.requests[0]
    if api == "serper":
        assert asked["json"]["q"] == "Eiffel tower" and asked["headers"]["X-API-KEY"] == KEY
    else:
        assert asked["query"]["q"] == "Eiffel tower" and asked["query"]["engine"] == "google"
    metrics = tool.metrics()
    assert metrics["tools/text_search/page_http_5xx"] == 1 and metrics["tools/text_search/page_empty_page"] == 1
    assert metrics["tools/text_search/page_bad_response"] == 1


def test_text_search_failures_are_observations():
    async def run(*responses):
        search = Script(*responses)
        async with serve([("*", "/search", search), ("POST", "/jina", jina_reader)]) as url:
            tool = _pipeline(url, Serper(endpoint=url + "/search", limits=FAST))
            return await tool(ToolRequest("text_search", "q"))

    empty = asyncio.run(run((200, serper([]))))
    assert empty.ok and empty.text == TEXT_NONE
    limited = asyncio.run(run((429, {"message": "Too many requests"})))
    assert not limited.ok and "rate limiting (HTTP 429)" in limited.text and KEY not in limited.text
    broken = asyncio.run(run((200, "<html>oops</html>")))
    assert not broken.ok and "malformed JSON" in broken.text
    unreadable = asyncio.run(run((200, serper([("Down", "http://127.0.0.1:1/p2", "")]))))
    assert not unreadable.ok and "none of the 1 result pages could be read" in unreadable.text


def test_serpapi_error_field_and_empty_results():
    async def main():
        empty = {"error": "Google hasn't returned any results for this query."}
        invalid = {"error": "Invalid API key. Your API key should be here: https://serpapi.com/manage-api-key"}
        script = Script((200, empty), (200, invalid))
        async with serve([("GET", "/search", script)]) as url:
            provider = SerpAPIGoogle(endpoint=url + "/search", limits=FAST)
            assert await provider.search("nothing") == []
            with pytest.raises(Exception, match="Invalid API key") as info:
                await provider.search("x")
            assert KEY not in str(info.value)

    asyncio.run(main())


def test_direct_reader_extracts_main_text_and_caps_bytes():
    article = "<p>The Hammond organ is an electric organ invented by Laurens Hammond in 1934.</p>" * 5
    html = (
        "<html><head><title>Hammond organ</title></head><body><nav>Home | About | Login</nav>"
        f"<article>{article}</article></body></html>"
    )
    huge = "<html><body>" + "<p>filler text</p>" * 50_000 + "</body></html>"

    async def main():
        async with serve([("GET", "/a", Script((200, html))), ("GET", "/huge", Script((200, huge)))]) as url:
            reader = DirectReader(allow_private=True, limits=Limits(max_bytes=200_000, breaker_failures=0))
            page = await reader.read(url + "/a")
            assert page.title == "Hammond organ" and "invented by Laurens Hammond" in page.text
            assert "Login" not in page.text
            with pytest.raises(Exception, match="byte cap"):
                await reader.read(url + "/huge")

    asyncio.run(main())


# --- image search ------------------------------------------------------------------------------------------


def test_image_search_keeps_valid_thumbnails_in_rank_order():
    thumbs = {"/t1": (200, png("red")), "/t2": (404, "gone"), "/t3": (200, "not an image"),
              "/t4": (200, png("blue", (3000, 2000))), "/t5": (200, png("green", (900, 300))),
              "/t6": (200, png("white"))}  # fmt: skip
    lens = Script()

    async def main():
        routes = [("GET", path, Script(resp)) for path, resp in thumbs.items()] + [("GET", "/lens", lens)]
        async with serve(routes) as url:
            lens.responses = [(200, serpapi_lens([(f"Match {i}", f"{url}/t{i}") for i in range(1, 7)]))]
            tool = WebImageSearch(SerpAPILens(endpoint=url + "/lens", limits=FAST), top_k=3, max_pixels=1_000_000,
                                  max_side=64, allow_private=True, thumbnail_limits=FAST)  # fmt: skip
            request = ToolRequest("image_search", image=Image.new("RGB", (8, 8)), image_url="https://img.example/q.jpg")
            return await tool(request), tool

    result, tool = asyncio.run(main())
    assert result.ok and result.titles == ("Match 1", "Match 5", "Match 6")
    assert result.text.count(IMAGE_MARKER) == 3 and result.text.startswith("[Image Search Results]")
    assert [im.size for im in result.images] == [(40, 30), (64, 21), (40, 30)]  # shrunk to max_side, aspect kept
    assert result.images[1].getpixel((0, 0)) == (0, 128, 0)
    assert lens.requests[0]["query"]["url"] == "https://img.example/q.jpg"
    assert lens.requests[0]["query"]["engine"] == "google_lens"
    metrics = tool.metrics()
    assert (
        metrics["tools/image_search/thumbnail_http_4xx"] == 1 and metrics["tools/image_search/thumbnail_too_large"] == 1
    )


def test_a_thumbnail_too_narrow_for_the_model_is_skipped_for_the_next_match():
    thumbs = {"/t1": png("red"), "/t2": png("blue", (1000, 4)), "/t3": png("green")}  # /t2: 512x2 once shrunk

    async def main():
        routes = [("GET", path, Script((200, data))) for path, data in thumbs.items()]
        routes.append(("GET", "/lens", lens := Script()))
        async with serve(routes) as url:
            lens.responses = [(200, serpapi_lens([(f"Match {i}", f"{url}/t{i}") for i in range(1, 4)]))]
            tool = WebImageSearch(SerpAPILens(endpoint=url + "/lens", limits=FAST), top_k=2, allow_private=True,
                                  thumbnail_limits=FAST)  # fmt: skip
            request = ToolRequest("image_search", image=Image.new("RGB", (8, 8)), image_url="https://img.example/q.jpg")
            return await tool(request), tool.metrics()

    result, metrics = asyncio.run(main())
    assert result.ok and result.titles == ("Match 1", "Match 3") and not result.partial
    assert metrics["tools/image_search/thumbnail_bad_image"] == 1


def test_image_search_returns_at_most_top_k_thumbnails_when_more_are_valid():
    # each image costs the policy's context hundreds of tokens: the first top_k valid ones, not all that loaded
    colours = ["red", "blue", "green", "white", "black"]

    async def main():
        routes = [("GET", f"/t{i}", Script((200, png(c)))) for i, c in enumerate(colours)]
        routes.append(("GET", "/lens", lens := Script()))
        async with serve(routes) as url:
            lens.responses = [(200, serpapi_lens([(f"Match {i}", f"{url}/t{i}") for i in range(len(colours))]))]
            tool = WebImageSearch(SerpAPILens(endpoint=url + "/lens", limits=FAST), top_k=2, allow_private=True,
                                  thumbnail_limits=FAST)  # fmt: skip
            request = ToolRequest("image_search", image=Image.new("RGB", (8, 8)), image_url="https://img.example/q.jpg")
            return await tool(request)

    result = asyncio.run(main())
    assert result.ok and result.titles == ("Match 0", "Match 1") and len(result.images) == 2
    assert result.text.count(IMAGE_MARKER) == 2 and result.images[1].getpixel((0, 0)) == (0, 0, 255)


def test_image_search_needs_a_public_url_and_reports_provider_failures():
    lens = Script((500, "down"))

    async def main():
        async with serve([("GET", "/lens", lens)]) as url:
            provider = SerpAPILens(endpoint=url + "/lens", limits=FAST)
            no_url = await WebImageSearch(provider)(ToolRequest("image_search", sample_id="row1"))
            hosted = WebImageSearch(provider, image_host=URLTemplateHost("https://cdn.example/{sample_id}.jpg"))
            down = await hosted(ToolRequest("image_search", sample_id="row1"))
            return no_url, down

    no_url, down = asyncio.run(main())
    assert not no_url.ok and "no public URL" in no_url.text and not no_url.sent  # Lens was never asked
    assert not down.ok and "HTTP 500" in down.text and down.text.startswith("[Image Search Results]")
    assert lens.requests[0]["query"]["url"] == "https://cdn.example/row1.jpg"


# --- one bad result, failures that cost nothing, results cut short, the summary prompt -----------------------

BAD_URL = "http://[::1/page"  # does not parse: a provider returned it, or a page was garbled on the way


def test_one_malformed_url_or_corrupt_thumbnail_skips_only_itself():
    results = [("Page 1", "http://127.0.0.1:1/p1", ""), ("Bad", BAD_URL, ""), ("Page 3", "http://127.0.0.1:1/p3", "")]
    lens = Script()

    async def main():
        routes = [("*", "/search", Script((200, serper(results)))), ("POST", "/jina", jina_reader),
                  ("POST", "/v1/chat/completions", summarizer), ("GET", "/lens", lens),
                  ("GET", "/good", Script((200, png("red")))),
                  ("GET", "/broken", Script((200, broken_png())))]  # fmt: skip
        async with serve(routes) as url:
            lens.responses = [(200, serpapi_lens([("M1", url + "/good"), ("Bad URL", BAD_URL),
                                                  ("Broken", url + "/broken"), ("M4", url + "/good")]))]  # fmt: skip
            text = await _pipeline(url, Serper(endpoint=url + "/search", limits=FAST))(ToolRequest("text_search", "q"))
            tool = WebImageSearch(SerpAPILens(endpoint=url + "/lens", limits=FAST), allow_private=True,
                                  thumbnail_limits=FAST)  # fmt: skip
            question = ToolRequest("image_search", image=Image.new("RGB", (8, 8)), image_url="https://x.example/q.jpg")
            image = await tool(question)
            return text, image, tool.metrics()

    text, image, metrics = asyncio.run(main())
    assert text.ok and text.titles == ("Page 1", "Page 3")
    assert image.ok and image.titles == ("M1", "M4")
    assert metrics["tools/image_search/thumbnail_refused"] == 1  # the malformed URL
    assert metrics["tools/image_search/thumbnail_bad_image"] == 1  # the corrupt PNG


def test_searches_that_never_went_out_are_not_charged():
    # A dead provider opens the circuit; from then on calls fail at once and cost nothing, as do calls with no
    # time left. Only the call that reached the provider (and may be billed) is charged.
    limits = Limits(timeout_s=2.0, retries=0, breaker_failures=1, breaker_reset_s=600)
    search, lens = Script((500, "down")), Script((500, "down"))
    question = Image.new("RGB", (8, 8))

    async def main():
        async with serve([("*", "/search", search), ("GET", "/lens", lens)]) as url:
            costs = {}
            for kind in ("text", "image"):
                def tool():
                    if kind == "text":
                        return _pipeline(url, Serper(endpoint=url + "/search", limits=limits, cost_per_call=0.5))
                    return WebImageSearch(SerpAPILens(endpoint=url + "/lens", limits=limits, cost_per_call=0.5))

                def request(budget_s=None):
                    if kind == "text":
                        return ToolRequest("text_search", "q", budget_s=budget_s)
                    return ToolRequest("image_search", image=question, image_url="https://x.example/q.jpg",
                                       budget_s=budget_s)  # fmt: skip

                dead = tool()
                down, circuit_open = await dead(request()), await dead(request())
                no_time = await tool()(request(budget_s=0.5))  # less than the tool's 1 s reserve
                costs[kind] = [(r.cost, r.sent) for r in (down, circuit_open, no_time)]
                assert not any(r.ok for r in (down, circuit_open, no_time))
                assert "circuit open" in circuit_open.text and "no time left" in no_time.text
            return costs

    never_went_out = [(0.5, True), (0.0, False), (0.0, False)]  # sent=False: a budget gives the call back
    assert asyncio.run(main()) == {"text": never_went_out, "image": never_went_out}
    assert len(search.requests) == 1 and len(lens.requests) == 1


def test_results_cut_short_by_a_transient_failure_are_shown_but_not_cached(tmp_path):
    flaky = Script((503, "busy"), (200, png("blue")))  # busy once: the next call gets it
    lens = Script()
    thumbs = {"/t1": Script((200, png("red"))), "/t2": flaky, "/t3": Script((404, "gone")),
              "/t4": Script((200, png("green")))}  # fmt: skip
    request = ToolRequest("image_search", image=Image.new("RGB", (8, 8)), image_url="https://x.example/q.jpg")
    once = Limits(timeout_s=2.0, retries=0, breaker_failures=0)

    async def main():
        async with serve([("GET", "/lens", lens)] + [("GET", p, s) for p, s in thumbs.items()]) as url:
            lens.responses = [(200, serpapi_lens([(f"M{i}", f"{url}/t{i}") for i in range(1, 5)]))]
            tool = WebImageSearch(SerpAPILens(endpoint=url + "/lens", limits=FAST), top_k=3, allow_private=True,
                                  thumbnail_limits=once)  # fmt: skip
            cached = CachedTool(tool, str(tmp_path / "c.sqlite"))
            return [await cached(request) for _ in range(3)]

    short, whole, hit = asyncio.run(main())
    assert short.ok and short.partial and short.titles == ("M1", "M4")  # shown to the model all the same
    assert whole.titles == ("M1", "M2", "M4") and not whole.partial  # the 404 is permanent: a complete answer
    assert hit.titles == whole.titles and len(lens.requests) == 2  # stored once complete, served from then on


@pytest.mark.parametrize("skipped, partial", [("/p2", True), ("/p5", False)])  # a 500 is transient, an empty page not
def test_text_results_with_a_page_lost_to_a_transient_failure_are_partial(skipped, partial):
    results = [(f"Page {p}", f"http://127.0.0.1:1{p}", "") for p in ("/p1", skipped, "/p3")]

    async def main():
        routes = [("*", "/search", Script((200, serper(results)))), ("POST", "/jina", jina_reader),
                  ("POST", "/v1/chat/completions", summarizer)]  # fmt: skip
        async with serve(routes) as url:
            return await _pipeline(url, Serper(endpoint=url + "/search", limits=FAST))(ToolRequest("text_search", "q"))

    result = asyncio.run(main())
    assert result.ok and result.titles == ("Page /p1", "Page /p3") and result.partial is partial


def test_the_summary_prompt_fills_each_field_once():
    llm = OpenAISummarizer("http://127.0.0.1:1/v1", "m")
    page, question = "P" * 1000, "Who built it? (search query: tower {page} {question})"
    prompt = llm._body(page, question)["messages"][1]["content"]
    before, after = USER_PROMPT.split("{question}")
    assert prompt == before + question + after.replace("{page}", page)  # the question's "{page}" stays text
    assert prompt.count(page) == 1


def test_the_summarizer_gets_the_question_and_the_pages_first_30000_characters_for_5_sentences():
    """Spec §5 / paper Table 4: each page is summarized, focused on the user's question (the query only says what
    "this" refers to), from its first 30,000 characters, into at most 5 sentences."""
    page = " ".join(f"w{i:06d}" for i in range(5000))  # 40,000 characters, none alike
    asked = Script((200, chat_completion("A summary.")))

    async def main():
        routes = [("*", "/search", Script((200, serper([("Tower", "http://127.0.0.1:1/p1", "")])))),
                  ("POST", "/jina", Script((200, jina("Tower", "/p1", page)))), ("POST", "/v1/chat/completions", asked)]  # fmt: skip
        async with serve(routes) as url:
            reader = JinaReader(endpoint=url + "/jina", allow_private=True, limits=FAST)
            llm = OpenAISummarizer(base_url=url + "/v1", model="qwen", limits=FAST)  # the defaults under test
            tool = WebTextSearch(Serper(endpoint=url + "/search", limits=FAST), reader, llm, top_k=1)
            return await tool(ToolRequest("text_search", "eiffel  tower", question="How tall is it?"))

    assert asyncio.run(main()).ok and len(asked.requests) == 1
    system, user = (m["content"] for m in asked.requests[0]["json"]["messages"])
    assert user.startswith("Question: How tall is it? (search query: eiffel tower)\n\n")
    assert user.split("Web page:\n", 1)[1] == page[:30_000]
    assert "at most 5 sentences" in system


# --- reasoning summarizers (Qwen3 thinks before it answers by default) -------------------------------------


def _reply(content: str, finish_reason: str) -> dict:
    reply = chat_completion(content)
    reply["choices"][0]["finish_reason"] = finish_reason
    return reply


@pytest.mark.parametrize("content, finish_reason, summary", [
    ("<think>\nOkay, the page says the tower was", "length", "summary_cut"),  # cut while thinking
    ("<think>The page is about towers.</think>\n", "length", "summary_cut"),
    ("<think>\nOkay, the page", "stop", "empty_summary"),
    ("<think>a</think>Summary: built by Eiffel's", "length", "Summary: built by Eiffel's"),  # cut, but something
    ("The template opened the block.</think>\nSummary: Paris.", "stop", "Summary: Paris."),
])  # fmt: skip
def test_a_summary_has_no_reasoning_and_a_page_cut_while_thinking_fails(content, finish_reason, summary):
    async def main():
        async with serve([("POST", "/v1/chat/completions", Script((200, _reply(content, finish_reason))))]) as url:
            return await OpenAISummarizer(base_url=url + "/v1", model="qwen", limits=FAST).summarize("page", "q")

    if summary in ("summary_cut", "empty_summary"):
        with pytest.raises(ToolError) as failed:
            asyncio.run(main())
        assert failed.value.kind == summary and (summary != "summary_cut" or "max_tokens=512" in failed.value.reason)
    else:
        assert asyncio.run(main())[0] == summary


def test_a_page_cut_while_thinking_is_skipped_and_counted():
    results = [("Page /p1", "http://127.0.0.1:1/p1", ""), ("Page /p3", "http://127.0.0.1:1/p3", "")]
    thinking = Script((200, _reply("<think>\nOkay, the page", "length")), (200, _reply("Summary: Paris.", "stop")))

    async def main():
        routes = [("*", "/search", Script((200, serper(results)))), ("POST", "/jina", jina_reader),
                  ("POST", "/v1/chat/completions", thinking)]  # fmt: skip
        async with serve(routes) as url:
            tool = _pipeline(url, Serper(endpoint=url + "/search", limits=FAST))
            tool.top_k = 1
            return await tool(ToolRequest("text_search", "q")), tool.metrics()

    result, metrics = asyncio.run(main())
    assert result.ok and "<think>" not in result.text and "Summary: Paris." in result.text
    assert metrics["tools/text_search/page_summary_cut"] == 1 and not result.partial  # cut again if asked again


@pytest.mark.parametrize("answers, dollars", [
    ([(200, _reply("<think>\nOkay, the page", "length")), (200, _reply("Summary: Paris.", "stop"))], 0.221),
    ([(200, _reply("<think>\nOkay", "stop")), (200, _reply("<think>\nOkay", "length"))], 0.221),
    ([(503, {"error": "overloaded"})], 0.021),
])  # fmt: skip
def test_an_unusable_summary_is_charged_its_tokens_and_an_unanswered_one_nothing(answers, dollars):
    # search $0.001 + 2 page reads at $0.01 + each answered summary's 100 tokens at $1000 per million = $0.1
    results = [("Page /p1", "http://127.0.0.1:1/p1", ""), ("Page /p3", "http://127.0.0.1:1/p3", "")]

    async def main():
        routes = [("*", "/search", Script((200, serper(results)))), ("POST", "/jina", jina_reader),
                  ("POST", "/v1/chat/completions", Script(*answers))]  # fmt: skip
        async with serve(routes) as url:
            tool = _pipeline(url, Serper(endpoint=url + "/search", limits=FAST))
            tool.top_k, tool.summarizer.cost_per_million_tokens = 1, 1000.0
            tool.summarizer.client.limits = Limits(timeout_s=2.0, retries=0, breaker_failures=0)
            return await tool(ToolRequest("text_search", "q"))

    result = asyncio.run(main())
    assert result.cost == pytest.approx(dollars) and result.ok == ("Summary: Paris." in result.text)


@pytest.mark.parametrize("total_tokens", [-1000, 10**400])
def test_a_token_count_that_is_not_one_costs_nothing_and_keeps_the_summary(total_tokens):
    # a negative count made a negative cost, which no result may have: the whole search failed
    async def main():
        answer = chat_completion("Summary: Paris.", total_tokens=total_tokens)
        async with serve([("POST", "/v1/chat/completions", Script((200, answer)))]) as url:
            llm = OpenAISummarizer(base_url=url + "/v1", model="qwen", limits=FAST, cost_per_million_tokens=1.0)
            return await llm.summarize("page", "q")

    assert asyncio.run(main()) == ("Summary: Paris.", 0.0)


@pytest.mark.parametrize("snippet", ["web_text_search.yaml", "server.yaml"])
def test_the_qwen3_snippets_ask_the_summarizer_not_to_think(snippet):
    """The snippet's ``extra_body`` (a nested mapping, parsed as LightningCLI parses the snippet) reaches the
    server in the request body."""
    from jsonargparse import ArgumentParser

    config = yaml.safe_load((ROOT / "configs" / "tools" / snippet).read_text(encoding="utf-8"))
    tools = config["server"] if "server" in config else config["model"]["init_args"]
    entry = tools["text_search"]["init_args"]["tool"]["init_args"]["summarizer"]
    entry["init_args"]["base_url"] = "http://127.0.0.1:1/v1"
    parser = ArgumentParser()
    parser.add_argument("--summarizer", type=OpenAISummarizer)
    llm = parser.instantiate(parser.parse_object({"summarizer": entry})).summarizer
    body = llm._body("page", "q")
    assert llm.model == "Qwen/Qwen3-32B" and body["chat_template_kwargs"] == {"enable_thinking": False}
    assert body["max_tokens"] == 512 and body["messages"][1]["content"].endswith("page")


def test_extra_body_cannot_override_the_summarizers_own_fields():
    with pytest.raises(ValueError, match=r"extra_body sets \['max_tokens'\]"):
        OpenAISummarizer("http://127.0.0.1:1/v1", "m", extra_body={"max_tokens": 4096, "top_k": 20})
