"""Behaviour of the search server and its client that a mutation audit found unpinned: what a call through the
client is charged (``sent``, the cost in the answer), which failures stop the run, the start-up and budget checks
(one request, the backend asked for, a cap equal to the reserve, a server with no backend), a bearer token read with
its trailing newline, a URL ending in "/", and the request fields the server refuses with 400."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from mmsr.tools import ToolRequest, ToolResult
from mmsr.tools.budget import BudgetError
from mmsr.tools.cache import CachedTool
from mmsr.tools.server import HTTPSearchTool, SearchServer, result_from_json, result_to_json
from mmsr.tools.web.fake import serve
from mmsr.tools.web.http import Limits

from .fake_web import Script
from .test_server import (
    FAST,
    BudgetEcho,
    NeedsTime,
    OlderServer,
    SlowTool,
    _budget_refusal,
    _checked,
    _free_port,
    _with_server,
)


@pytest.fixture
def no_token(monkeypatch):
    monkeypatch.delenv("MMSR_SEARCH_TOKEN", raising=False)


def test_a_normal_answer_omits_sent_and_a_budgeted_client_cache_counts_its_call(no_token, tmp_path):
    # The server writes ``sent`` only when it is False: a client reading an absent one as False would give every
    # call back to its budget, and a run's max_calls would never stop it.
    async def body(url):
        cached = CachedTool(HTTPSearchTool(url, limits=FAST), str(tmp_path / "c.sqlite"), max_calls=5)
        result = await cached(ToolRequest("text_search", "q"))
        return result, cached.metrics()

    result, metrics = asyncio.run(_with_server(SearchServer(text_search=SlowTool(0.0), port=0), body))
    assert result.ok and result.sent and "sent" not in result_to_json(result)
    assert metrics["tools/text_search/api_calls"] == 1 and metrics["tools/text_search/run_api_calls"] == 1


def test_the_round_trip_keeps_cost_latency_partial_and_sent():
    """A client-side budget charges the dollars the server's backend spent (``cost``), not its seconds."""
    result = ToolResult("[Text Search Results] x", latency_s=0.25, cost=0.5, titles=("t",), partial=True, sent=False)
    back = result_from_json(json.loads(json.dumps(result_to_json(result))))
    assert (back.text, back.latency_s, back.cost, back.titles, back.partial, back.sent) == (
        result.text, 0.25, 0.5, ("t",), True, False)  # fmt: skip


def test_a_call_that_never_went_out_is_not_charged(no_token, tmp_path):
    # The client's own circuit opened after a 503: its next call never reached the server, and charging it would
    # spend a run's budget on nothing.
    limits = Limits(timeout_s=10.0, retries=0, breaker_failures=1, breaker_reset_s=300.0)

    async def main():
        async with serve([("POST", "/v1/search", Script((503, {"error": "busy"})))]) as url:
            cached = CachedTool(HTTPSearchTool(url, limits=limits), str(tmp_path / "c.sqlite"), max_calls=5)
            results = [await cached(ToolRequest("text_search", q)) for q in ("q1", "q2")]
            return results, cached.metrics()

    (busy, unsent), metrics = asyncio.run(main())
    assert not busy.ok and busy.sent and not unsent.ok and not unsent.sent and "circuit open" in unsent.text
    assert metrics["tools/text_search/api_calls"] == 1 and metrics["tools/text_search/run_api_calls"] == 1


def test_the_budget_check_asks_only_for_the_clients_backend(no_token):
    # A text_search client's cap was refused because the server's image backend (another client's) cannot fit it.
    server = SearchServer(image_search=NeedsTime(), text_search=BudgetEcho(), port=0)

    async def body(url):
        text = HTTPSearchTool(url, limits=FAST, reserve_s=1.0, kind="text_search")
        image = HTTPSearchTool(url, limits=FAST, reserve_s=1.0, kind="image_search")
        return await _budget_refusal(text, 15.0), await _budget_refusal(image, 15.0)

    text, image = asyncio.run(_with_server(server, body))
    assert text == "" and "image_search (NeedsTime): SlowSearch cannot fit" in image


def test_a_cap_equal_to_the_reserve_is_refused_without_asking_the_server():
    """The server would get 0 s (no search fits in it): refused at start-up, as a cap below the reserve is."""
    tool = HTTPSearchTool(f"http://127.0.0.1:{_free_port()}", limits=FAST, reserve_s=1.0)  # nothing listens there
    with pytest.raises(BudgetError, match="tool_timeout_s=1 s leaves the search server nothing after the 1 s"):
        tool.check_budget(1.0)


def test_a_500_is_a_failed_search_not_a_fatal_error(no_token):
    # Only 409 carries a backend's FatalToolError; a server's crash (500) is service trouble: the search fails and
    # the run goes on, as for 502/503.
    script = Script((500, {"error": "internal"}))

    async def main():
        async with serve([("POST", "/v1/search", script)]) as url:
            return await HTTPSearchTool(url, limits=FAST)(ToolRequest("text_search", "q"))

    result = asyncio.run(main())
    assert not result.ok and "HTTP 500" in result.text and len(script.requests) == 1


def test_the_start_up_check_sends_one_request_to_a_failing_server(no_token):
    # The check's own client does not retry: a server answering 503 is reported at once, not after backoffs.
    script = Script((503, {"error": "starting"}))

    async def main():
        async with serve([("GET", "/v1/ready", script)]) as url:
            return await _checked(HTTPSearchTool(url, limits=FAST, kind="text_search"))

    message = asyncio.run(main())
    assert message.startswith("ServerNotReady:") and "failed the start-up check" in message
    assert len(script.requests) == 1


def test_a_token_with_a_trailing_newline_works_on_both_sides(monkeypatch):
    # A token set from a file (an env file, a secret mount) keeps its newline: the server compared it whole and
    # refused every client, and the client's header with a newline could not be sent at all.
    monkeypatch.setenv("MMSR_SEARCH_TOKEN", "s3cret\n")
    server = SearchServer(text_search=SlowTool(0.0), port=0)

    async def body(url):
        monkeypatch.setenv("MMSR_SEARCH_TOKEN", "s3cret")  # the server's newline alone
        plain = await HTTPSearchTool(url, limits=FAST)(ToolRequest("text_search", "q"))
        monkeypatch.setenv("MMSR_SEARCH_TOKEN", "s3cret\n")  # the client's too
        newline = await HTTPSearchTool(url, limits=FAST)(ToolRequest("text_search", "q"))
        return plain, newline

    plain, newline = asyncio.run(_with_server(server, body))
    assert plain.ok and newline.ok and newline.titles == ("slow",)


@pytest.mark.parametrize("server_class", [SearchServer, OlderServer], ids=["ready", "older"])
def test_a_server_with_no_backend_fails_the_start_up_check_of_a_client_asking_for_any(no_token, server_class):
    """``kind=None`` asks for any backend: a server with none would fail every search of the run."""

    async def body(url):
        return await _checked(HTTPSearchTool(url, limits=FAST))

    message = asyncio.run(_with_server(server_class(port=0), body))
    assert message.startswith("ServerRefused:") and "check HTTPSearchTool.url" in message


def test_a_url_ending_in_a_slash_reaches_the_search_route(no_token):
    """``url: http://host:8765/`` in a config must not ask ``//v1/search`` (a 404 that stops the run)."""

    async def body(url):
        tool = HTTPSearchTool(url + "/", limits=FAST)
        return tool.provider_name == f"server:{url}", await tool(ToolRequest("text_search", "q"))

    named, result = asyncio.run(_with_server(SearchServer(text_search=SlowTool(0.0), port=0), body))
    assert named and result.ok and result.titles == ("slow",)


@pytest.mark.parametrize(
    "fields, field",
    [({"query": None}, "'query'"), ({"budget_s": True}, "'budget_s'"), ({"kind": "crop"}, "'kind'"),
     ({"image": 0}, "'image'"), ({"image": []}, "'image'")],
    ids=["null_query", "bool_budget", "crop_kind", "zero_image", "list_image"],
)  # fmt: skip
def test_a_field_of_the_wrong_type_or_an_unknown_kind_is_a_bad_request(no_token, fields, field):
    # A null query or a falsy non-string image reached the backend as a search; a JSON true read as a 1 s budget;
    # a kind no server has (a crop is the rollout's own tool) is the client's mistake (400), not a missing backend.
    data = {"kind": "text_search", "query": "q"} | fields

    async def post(url):
        async with aiohttp.ClientSession() as session, session.post(url + "/v1/search", json=data) as response:
            return response.status, (await response.json())["error"]

    status, error = asyncio.run(_with_server(SearchServer(text_search=BudgetEcho(), port=0), post))
    assert status == 400 and error.startswith(f"bad request: field {field}")
