"""No configured key leaves the tool layer (issue #18): against fakes that quote the keys they were sent, the
key is absent from results, failure texts, titles, metrics, logs, the search server's answers and the
trajectory records the logger writes."""

from __future__ import annotations

import asyncio
import json
import logging
from types import SimpleNamespace
from urllib.parse import quote

import aiohttp
import pytest
import torch
from aiohttp import web

from mmsr.callbacks.trajectory_logger import TrajectoryLogger
from mmsr.data.sample import Sample
from mmsr.module import StepRollout
from mmsr.rollout.actions import Answer, TextSearch
from mmsr.rollout.trajectory import ToolCall, Trajectory, Turn
from mmsr.tools import ToolRequest, ToolResult
from mmsr.tools import secrets
from mmsr.tools.secrets import install_log_redaction, redact, redact_all, register_secret_env
from mmsr.tools.server import HTTPSearchTool, SearchServer
from mmsr.tools.web.fake import echo_200_error, echo_401, echo_page, echo_results, echo_summary, sent_key, serve
from mmsr.tools.web.http import Limits, ProviderRefused, ToolError
from mmsr.tools.web.providers import SerpAPIGoogle, Serper
from mmsr.tools.web.reader import JinaReader
from mmsr.tools.web.summarizer import OpenAISummarizer
from mmsr.tools.web.text_search import WebTextSearch

FAST = Limits(timeout_s=2.0, retries=1, backoff_s=0.01, backoff_max_s=0.02, breaker_failures=0)
KEYS = {  # each provider its own key, so a leak names the variable it came from
    "SERPAPI_API_KEY": "serpapi-0123456789abcdef0123456789abcdef",
    "SERPER_API_KEY": "serper-fedcba9876543210fedcba98",
    "JINA_API_KEY": "jina_4f3e2d1c0b9a8f7e6d5c4b3a",
    "OPENAI_API_KEY": "sk-proj-AbCdEfGhIjKlMnOpQrStUvWx+/=",  # characters that URL-encoding changes
    "MMSR_SEARCH_TOKEN": "srv-token-5a6b7c8d9e0f",
}


@pytest.fixture(autouse=True)
def keys(monkeypatch):
    for var, value in KEYS.items():
        monkeypatch.setenv(var, value)


def assert_clean(*texts: object) -> None:
    """No key, whole, URL-encoded or cut to 12 characters, in any of ``texts`` (str() of each)."""
    for text in map(str, texts):
        for value in KEYS.values():
            for form in (value, quote(value, safe=""), value[:12], value[-12:]):
                assert form not in text, f"{form!r} leaked into {text[:300]!r}"


# --- redact ----------------------------------------------------------------------------------------------------


def test_redact_covers_whole_url_encoded_and_cut_short_keys():
    key = KEYS["OPENAI_API_KEY"]
    text = f"a {key} b {quote(key, safe='')} c {key[:14]}... d ...{key[-13:]} e"
    clean = redact(text)
    assert_clean(clean)
    assert clean.count("[redacted OPENAI_API_KEY]") == 4 and clean.startswith("a ") and clean.endswith(" e")


def test_redact_leaves_ordinary_text_short_values_and_short_runs(monkeypatch):
    monkeypatch.setenv("TINY_API_KEY", "abc123")  # under MIN_CHARS: never masked (it would hit ordinary words)
    text = "abc123 is a word; sk-proj- is a public prefix; serpapi-012 is an 11-character run"
    assert redact(text) == text
    assert redact("") == ""


def test_secret_names_registered_listed_and_by_suffix(monkeypatch):
    monkeypatch.setenv("MY_PROVIDER_KEY", "custom-value-123456")
    assert redact("x custom-value-123456") == "x custom-value-123456"
    monkeypatch.setattr(secrets, "SECRET_ENVS", set(secrets.SECRET_ENVS))
    register_secret_env("MY_PROVIDER_KEY")  # what every component with an api_key_env does
    assert redact("x custom-value-123456") == "x [redacted MY_PROVIDER_KEY]"
    monkeypatch.setenv("ODD_NAME", "odd-value-7890abc")
    monkeypatch.setenv("MMSR_SECRET_ENVS", "ODD_NAME, OTHER")
    monkeypatch.setenv("WANDB_API_KEY", "wandb-value-123456789")
    assert redact("odd-value-7890abc wandb-value-123456789") == "[redacted ODD_NAME] [redacted WANDB_API_KEY]"


def test_results_errors_and_records_are_clean_at_construction():
    key = KEYS["SERPER_API_KEY"]
    result = ToolResult(f"[Text Search Results] 1. {key}", titles=(f"title {key}",))
    error = ToolError(f"refused (HTTP 401: invalid {key})", "http_4xx")
    assert_clean(result.text, result.titles, error.reason, str(error))
    record = {"turns": [("text", key)], "n": 3, "nested": [SimpleNamespace()]}
    assert_clean(redact_all(record)["turns"])


def test_log_records_are_redacted_whatever_the_logger(caplog):
    install_log_redaction()
    key = KEYS["JINA_API_KEY"]
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("aiohttp.client").debug("GET https://r.jina.ai/?key=%s", key)
        logging.getLogger("mmsr.tools.web").warning(f"reader said {key}")
        try:
            raise RuntimeError(f"boom {key}")
        except RuntimeError:
            logging.getLogger("some.library").exception("failed")
    assert len(caplog.records) == 3
    assert_clean(caplog.text, [r.getMessage() for r in caplog.records])
    assert "[redacted JINA_API_KEY]" in caplog.text and "RuntimeError: boom" in caplog.text


# --- end to end, against echoing fakes ---------------------------------------------------------------------------


def _tool(url: str, provider) -> WebTextSearch:
    reader = JinaReader(endpoint=url + "/jina", allow_private=True, limits=FAST)
    llm = OpenAISummarizer(base_url=url + "/v1", model="m", limits=FAST)
    return WebTextSearch(provider, reader, llm, top_k=2, max_candidates=3)


def test_web_text_search_never_returns_a_key(caplog):
    pages_seen: list[str] = []  # what the summarizer was sent
    urls_seen: list[str] = []  # what the reader was sent (the search API echoed its key into the links)

    async def summarizer(request: web.Request) -> web.Response:
        pages_seen.append((await request.json())["messages"][1]["content"])
        return await echo_summary(request)

    async def reader(request: web.Request) -> web.Response:
        urls_seen.append((await request.json())["url"])
        return await echo_page(request)

    answers = [echo_results(3)]  # the search API answers once, then refuses its key (revoked mid-run)

    async def answered_then_401(request: web.Request) -> web.Response:
        return await (answers.pop() if answers else echo_401)(request)

    async def main():
        routes = [("GET", "/401", echo_401), ("GET", "/err", echo_200_error), ("POST", "/ok", echo_results(3)),
                  ("GET", "/later401", answered_then_401), ("POST", "/jina", reader),
                  ("POST", "/v1/chat/completions", summarizer)]  # fmt: skip
        async with serve(routes) as url:
            with pytest.raises(ProviderRefused) as never_answered:  # a wrong key: the run stops
                await _tool(url, SerpAPIGoogle(endpoint=url + "/401", limits=FAST))(ToolRequest("text_search", "q"))
            refused = _tool(url, SerpAPIGoogle(endpoint=url + "/later401", limits=FAST))
            out_of_searches = _tool(url, SerpAPIGoogle(endpoint=url + "/err", limits=FAST))
            ok = _tool(url, Serper(endpoint=url + "/ok", limits=FAST))
            request = ToolRequest("text_search", "eiffel tower", question="where?", budget_s=10.0)
            assert (await refused(request)).ok
            results = [await t(request) for t in (refused, out_of_searches, ok)]
            return results, [t.metrics() for t in (refused, out_of_searches, ok)], str(never_answered.value)

    with caplog.at_level(logging.DEBUG):
        (refused, out_of_searches, ok), metrics, never_answered = asyncio.run(main())
    assert "HTTP 401: Invalid API key [redacted SERPAPI_API_KEY]" in never_answered
    assert "environment variable SERPAPI_API_KEY" in never_answered
    assert not refused.ok and "HTTP 401: Invalid API key [redacted SERPAPI_API_KEY]" in refused.text
    assert not out_of_searches.ok and "[redacted SERPAPI_API_KEY]" in out_of_searches.text
    assert ok.ok and len(ok.titles) == 2 and "[redacted SERPER_API_KEY]" in ok.titles[0]
    assert "[redacted OPENAI_API_KEY]" in ok.text  # the summarizer quoted its own key
    assert_clean(never_answered, refused.text, out_of_searches.text, ok.text, ok.titles, metrics, caplog.text)
    assert pages_seen and "[redacted JINA_API_KEY]" in pages_seen[0]  # redacted before the summarizer saw it
    assert urls_seen and "[redacted SERPER_API_KEY]" in urls_seen[-1]
    assert_clean(pages_seen, urls_seen)


async def echo_error_at(request: web.Request) -> web.Response:
    """An ``{"error": ...}`` answer (``?status=``) quoting the sent key at character ``?at=`` of its message, so
    a cut of the message at a fixed length can land inside the key."""
    message = "x" * int(request.query["at"]) + sent_key(request)
    return web.json_response({"error": message}, status=int(request.query["status"]))


@pytest.mark.parametrize(("status", "cut"), [(400, 300), (200, 200)])  # HTTPClient's 4xx detail; an API's error
def test_an_error_cut_inside_an_echoed_key_keeps_none_of_it(status, cut):
    """Error texts are masked whole, then cut: a cut keeping fewer than ``PARTIAL_CHARS`` of the key's characters
    would leave them unrecognizable to the masker."""
    key = KEYS["SERPER_API_KEY"]

    async def main():
        reasons = []
        async with serve([("POST", "/search", echo_error_at)]) as url:
            for at in range(cut - 11, cut - 2):  # the cut keeps 11 down to 3 of the key's characters
                provider = Serper(endpoint=f"{url}/search?status={status}&at={at}", limits=FAST)
                with pytest.raises(ToolError) as caught:
                    await provider.search("q")
                reasons.append(caught.value.reason)
        return reasons

    for reason in asyncio.run(main()):
        assert "x" + key[:3] not in reason, f"the key's head leaked: {reason[-40:]!r}"
        assert reason.count("x") > cut - 15  # the cut landed where the key was


def test_search_server_answers_carry_no_key(caplog):
    """The server's own keys stay out of its HTTP answers: results, a crashing backend's message, errors."""

    class Leaky:
        async def __call__(self, request: ToolRequest) -> ToolResult:
            raise RuntimeError(f"backend broke with {KEYS['SERPER_API_KEY']}")

    async def main():
        routes = [("POST", "/ok", echo_results(3)), ("POST", "/jina", echo_page),
                  ("POST", "/v1/chat/completions", echo_summary)]  # fmt: skip
        async with serve(routes) as fake:
            server = SearchServer(image_search=Leaky(), text_search=_tool(fake, Serper(endpoint=fake + "/ok")), port=0)
            port = await server.start()
            base, auth = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {KEYS['MMSR_SEARCH_TOKEN']}"}
            bodies = []
            async with aiohttp.ClientSession() as session:
                for kind in ("text_search", "image_search", KEYS["SERPAPI_API_KEY"]):  # the last one is echoed back
                    body = {"kind": kind, "query": "q", "image_url": "https://x.example/i.jpg"}
                    async with session.post(base + "/v1/search", json=body, headers=auth) as response:
                        bodies.append(await response.text())
                async with session.get(base + "/v1/metrics", headers=auth) as response:
                    bodies.append(await response.text())
            via_client = await HTTPSearchTool(base)(ToolRequest("text_search", "q", budget_s=10.0))
            await server.stop()
            return bodies, via_client

    with caplog.at_level(logging.INFO):
        bodies, via_client = asyncio.run(main())
    text, crashed, bad, metrics = (json.loads(b) for b in bodies)
    assert text["ok"] and "[redacted SERPER_API_KEY]" in text["titles"][0]
    assert not crashed["ok"] and "RuntimeError: backend broke with [redacted SERPER_API_KEY]" in crashed["text"]
    assert "[redacted SERPAPI_API_KEY]" in bad["error"] and "tools/text_search/serper/calls" in str(metrics)
    assert via_client.ok and "backend broke" in caplog.text
    assert_clean(bodies, via_client.text, via_client.titles, caplog.text)


def test_trajectory_records_written_by_the_logger_carry_no_key(tmp_path):
    """Defense in depth: even text that never was a ToolResult (the policy echoing a key) is masked."""
    key = KEYS["OPENAI_API_KEY"]
    result = ToolResult(f"[Text Search Results] 1. (title: t) summary with {key}", titles=(f"t {key}",))
    traj = Trajectory("row1", 0, list(range(12)), [0] * 4 + [1] * 8, [0.0] * 12, [], 4)
    traj.turns = [Turn(f"<text_search>{key}</text_search>", TextSearch(key), (4, 8),
                       tool_call=ToolCall("text_search", key, result)),
                  Turn(f"<answer>{key}</answer>", Answer(key), (8, 12))]  # fmt: skip
    traj.finish_reason = "answer"
    sample = Sample("row1", f"what is {key}?", None, "paris")
    rollout = StepRollout([traj], [sample], torch.tensor([0.5]), torch.tensor([0.1]), [{"correct": 0.0}])
    trainer = SimpleNamespace(loggers=[], default_root_dir=str(tmp_path), is_global_zero=True, global_step=1,
                              fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(_batches_that_stepped=1)))  # fmt: skip
    TrajectoryLogger().on_train_batch_end(trainer, SimpleNamespace(last_rollout=rollout), None, None, 0)
    written = (tmp_path / "trajectories.jsonl").read_text()
    assert "[redacted OPENAI_API_KEY]" in written and json.loads(written)["turns"][0]["action"] == "text_search"
    assert_clean(written)
