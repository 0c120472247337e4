"""A provider that refuses its key (401/403) or is not found (404) before it ever answered stops the run,
naming itself, its URL and the key's variable (never the key); after it has answered, the same statuses are
ordinary failures; a site's 403/404 met while reading a page is one failed page."""

from __future__ import annotations

import asyncio
import gc
import logging

import pytest

from mmsr.tools import ToolRequest
from mmsr.tools.base import FatalToolError
from mmsr.tools.server import HTTPSearchTool, RemoteFatalError, SearchServer
from mmsr.tools.web.fake import FakeWeb, chat_completion, jina, png, serpapi_google, serpapi_lens, serper, serve
from mmsr.tools.web.http import Limits, ProviderRefused
from mmsr.tools.web.image_search import WebImageSearch
from mmsr.tools.web.providers import SerpAPIGoogle, SerpAPILens, Serper
from mmsr.tools.web.reader import DirectReader, JinaReader
from mmsr.tools.web.summarizer import OpenAISummarizer
from mmsr.tools.web.text_search import WebTextSearch

from .fake_web import Script

FAST = Limits(timeout_s=2.0, retries=1, backoff_s=0.01, backoff_max_s=0.02, breaker_failures=0)
KEY = "sk-refused-key-0123456789"
ENVS = {"serpapi_google": "SERPAPI_API_KEY", "serper": "SERPER_API_KEY", "serpapi_lens": "SERPAPI_API_KEY",
        "jina_reader": "JINA_API_KEY", "summarizer": "OPENAI_API_KEY"}  # fmt: skip


def _good(kind: str, url: str) -> dict:
    """A good answer of ``kind``'s endpoint (its results point at the test server's pages and thumbnails)."""
    results = [("Paris", url + "/p1", "")]
    return {"serpapi_google": serpapi_google(results), "serper": serper(results),
            "jina_reader": jina("Paris", url + "/p1", "Paris is the capital of France. " * 5),
            "summarizer": chat_completion("Paris is in France."),
            "serpapi_lens": serpapi_lens([("Tower", url + "/t.png")])}[kind]  # fmt: skip


REFUSED = (401, {"error": f"Invalid API key {KEY}"})  # as some APIs answer: quoting the key they refused


@pytest.fixture(autouse=True)
def keys(monkeypatch):
    for var in set(ENVS.values()):
        monkeypatch.setenv(var, KEY)


def _tool(kind: str, url: str):
    """The search tool around the provider ``kind``; its other stages are the test server's good ones."""
    if kind == "serpapi_lens":
        return WebImageSearch(SerpAPILens(endpoint=url + "/serpapi_lens", limits=FAST), allow_private=True,
                              thumbnail_limits=FAST)  # fmt: skip
    search = (SerpAPIGoogle if kind == "serpapi_google" else Serper)(endpoint=f"{url}/{kind}", limits=FAST)
    reader = JinaReader(endpoint=url + "/jina_reader", allow_private=True, limits=FAST)
    llm = OpenAISummarizer(base_url=url + "/summarizer", model="m", limits=FAST)
    return WebTextSearch(search if kind == "serpapi_google" else Serper(url + "/serper", limits=FAST), reader, llm,
                         top_k=1, max_candidates=1)  # fmt: skip


async def _calls(kind: str, *responses) -> list:
    """One tool call per scripted response of ``kind``'s endpoint: the base URL, the tool's metrics, then each
    call's result or the ``FatalToolError`` it raised."""
    late: dict[str, Script] = {}  # the good answers need the URL: filled in once the server is up

    async def endpoint(name: str, request):
        return await late[name](request)

    paths = {k: f"/{k}/chat/completions" if k == "summarizer" else f"/{k}" for k in ENVS}
    routes = [("*", path, lambda r, k=k: endpoint(k, r)) for k, path in paths.items()]
    out = []
    async with serve([*routes, ("GET", "/t.png", Script((200, png("red"))))]) as url:
        late.update({k: Script((200, _good(k, url))) for k in ENVS})
        late[kind] = Script(*[(s, _good(kind, url) if b is None else b) for s, b in responses])
        tool = _tool(kind, url)
        image = kind == "serpapi_lens"
        request = ToolRequest("image_search", image_url="https://cdn.example/q.jpg") if image else (
            ToolRequest("text_search", "paris"))  # fmt: skip
        for _ in responses:
            try:
                out.append(await tool(request))
            except FatalToolError as exc:
                out.append(exc)
    return [url, tool.metrics(), *out]


@pytest.mark.parametrize("kind", list(ENVS))
def test_a_key_refused_before_any_answer_stops_the_run_naming_the_variable(kind):
    url, _, refused = asyncio.run(_calls(kind, REFUSED))
    assert isinstance(refused, ProviderRefused), refused
    message = str(refused)
    assert message.startswith(f"{kind} at {url}/{kind}") and "HTTP 401" in message
    assert f"environment variable {ENVS[kind]} (set)" in message and KEY not in message and KEY[:12] not in message


@pytest.mark.parametrize("kind", list(ENVS))
def test_a_refusal_after_an_answer_is_an_ordinary_failure(kind):
    _, metrics, answered, refused = asyncio.run(_calls(kind, (200, None), REFUSED))
    assert answered.ok and not refused.ok, (answered, refused)  # a failure observation, not an exception
    assert KEY not in refused.text and metrics[f"tools/{kind}/http_4xx"] == 1  # counted under its kind


@pytest.mark.parametrize("status", [403, 404])
def test_a_forbidden_key_or_a_missing_endpoint_stops_the_run_too(monkeypatch, status):
    monkeypatch.delenv("OPENAI_API_KEY")  # a local server needs none: the message says none was sent
    _, _, refused = asyncio.run(_calls("summarizer", (status, {"error": {"message": "The model `m` does not exist."}})))
    assert isinstance(refused, ProviderRefused) and "does not exist" in str(refused)
    assert "OPENAI_API_KEY (unset, so no key was sent)" in str(refused)
    assert ("check the URL and the model name" in str(refused)) == (status == 404)


def test_the_url_shown_drops_user_info_and_query():
    async def main():
        script = Script(REFUSED)
        async with serve([("GET", "/search", script)]) as url:
            endpoint = url.replace("http://", "http://user:pw@") + "/search?token=t0ps3cret"
            with pytest.raises(ProviderRefused) as caught:
                await SerpAPIGoogle(endpoint=endpoint, limits=FAST).search("q")
            return url, str(caught.value)

    url, message = asyncio.run(main())
    assert f"serpapi_google at {url}/search refused the key" in message
    assert "t0ps3cret" not in message and "pw@" not in message


@pytest.mark.parametrize("status", [403, 404])
def test_a_sites_403_or_404_is_one_failed_page_for_the_direct_reader(status):
    article = "<p>The Eiffel Tower is a wrought-iron lattice tower in Paris, France.</p>" * 3
    pages = {"/p1": Script((status, "no")), "/p2": Script((200, f"<html><body>{article}</body></html>"))}

    async def main():
        routes = [("GET", path, script) for path, script in pages.items()]
        routes += [("POST", "/summarizer/chat/completions", Script((200, chat_completion("A tower."))))]
        async with serve(routes) as url:
            search = Script((200, serper([("Gone", url + "/p1", ""), ("Tower", url + "/p2", "")])))
            async with serve([("POST", "/serper", search)]) as api:
                reader = DirectReader(allow_private=True, limits=FAST)
                llm = OpenAISummarizer(base_url=url + "/summarizer", model="m", limits=FAST)
                tool = WebTextSearch(Serper(api + "/serper", limits=FAST), reader, llm, top_k=1, max_candidates=2)
                result = await tool(ToolRequest("text_search", "eiffel"))
                return result, tool.metrics()

    result, metrics = asyncio.run(main())
    assert result.ok and result.titles == ("Tower",)  # the refused page is skipped for the next result
    assert metrics["tools/text_search/page_http_4xx"] == 1 and metrics["tools/direct_reader/http_4xx"] == 1


def test_a_servers_refused_provider_stops_the_trainer(monkeypatch):
    """Behind ``mmsr serve-search`` the refusal comes back as a 409 and the client raises it again."""
    monkeypatch.setenv("MMSR_SEARCH_TOKEN", "srv-token-0123")

    async def main():
        async with serve([("POST", "/serper", Script(REFUSED))]) as api:
            backend = WebTextSearch(Serper(api + "/serper", limits=FAST), JinaReader(limits=FAST),
                                    OpenAISummarizer("http://127.0.0.1:1/v1", "m", limits=FAST))  # fmt: skip
            server = SearchServer(text_search=backend, port=0)
            port = await server.start()
            try:
                with pytest.raises(RemoteFatalError) as caught:
                    await HTTPSearchTool(f"http://127.0.0.1:{port}")(ToolRequest("text_search", "q"))
            finally:
                await server.stop()
            return str(caught.value)

    message = asyncio.run(main())
    assert "ProviderRefused: serper at" in message and "SERPER_API_KEY" in message and KEY not in message


def test_the_fake_web_sends_no_401_before_a_route_has_answered():
    fake = FakeWeb(fault_rate=0.5, faults=("http_429", "echo_401"), refuse_after=3, seed=0)
    draws = [fake.draw("serper") for _ in range(200)]
    first_401 = draws.index("echo_401")
    assert draws[:first_401].count(None) >= 3 and fake.stats()["injected"]["serper"]["echo_401"] > 20


def test_pages_refused_together_raise_one_error_and_leave_no_asyncio_noise(monkeypatch, caplog):
    # Every page's summary meets the refused key in the same instant: one ProviderRefused comes out, and no
    # "Task exception was never retrieved" for the others.
    async def main():
        asked, together = [], asyncio.Event()

        async def refused(text: str, query: str):
            asked.append(query)
            if len(asked) == 5:
                together.set()
            await together.wait()
            raise ProviderRefused("summarizer at http://x refused the key (HTTP 401)")

        async with serve([("POST", "/jina", Script((200, jina("P", "http://x", "Paris is in France. " * 5))))]) as url:
            pages = [(f"Page {i}", f"https://site{i}.example/p", "") for i in range(5)]
            async with serve([("POST", "/serper", Script((200, serper(pages))))]) as api:
                llm = OpenAISummarizer(base_url=url + "/v1", model="m", limits=FAST)
                monkeypatch.setattr(llm, "summarize", refused)
                tool = WebTextSearch(Serper(api + "/serper", limits=FAST), JinaReader(endpoint=url + "/jina",
                                     allow_private=True, limits=FAST), llm, top_k=5, max_candidates=5)  # fmt: skip
                with pytest.raises(ProviderRefused, match="refused the key"):
                    await tool(ToolRequest("text_search", "paris"))
        return len(asked), [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        asked, left = asyncio.run(main())
        gc.collect()  # an unretrieved task error is logged when the task is collected
    assert asked == 5 and left == [] and not [r for r in caplog.records if r.name == "asyncio"]


def test_a_403_from_the_jina_reader_before_any_answer_is_one_failed_page():
    # Cloudflare in front of r.jina.ai refuses the first page's read with 403 (an HTML page), the next page is
    # read. The 403 stopped the run as a refused key (ProviderRefused), since Jina had not answered yet; Jina
    # refuses a bad key with 401, which still does (test_a_key_refused_before_any_answer_stops_the_run_...).
    cloudflare = (403, "<html><title>Attention Required! | Cloudflare</title>Sorry, you have been blocked</html>")

    async def main():
        reads = Script(cloudflare, (200, jina("Tower", "https://b.example/p", "The Eiffel Tower is in Paris. " * 5)))
        routes = [("POST", "/jina", reads), ("POST", "/summarizer/chat/completions",
                                             Script((200, chat_completion("A tower in Paris."))))]  # fmt: skip
        async with serve(routes) as url:
            pages = [("Blocked", "https://a.example/p", ""), ("Tower", "https://b.example/p", "")]
            found = Script((200, serper(pages)))
            async with serve([("POST", "/serper", found)]) as api:
                reader = JinaReader(endpoint=url + "/jina", allow_private=True, limits=FAST)
                llm = OpenAISummarizer(base_url=url + "/summarizer", model="m", limits=FAST)
                tool = WebTextSearch(Serper(api + "/serper", limits=FAST), reader, llm, top_k=1, max_candidates=2)
                return await tool(ToolRequest("text_search", "eiffel")), tool.metrics(), len(reads.requests)

    result, metrics, reads = asyncio.run(main())
    assert result.ok and result.titles == ("Tower",) and reads == 2  # not retried: a 403 is no service trouble
    assert metrics["tools/text_search/page_http_4xx"] == 1 and metrics["tools/jina_reader/http_4xx"] == 1
