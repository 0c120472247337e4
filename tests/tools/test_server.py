"""The search server and its client: round trip, token, errors, graceful shutdown, the CLI, config snippets."""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import aiohttp
import pytest
import yaml
from PIL import Image

from mmsr.tools import ToolRequest, ToolResult
from mmsr.tools.base import FatalToolError, SearchTool, check_ready
from mmsr.tools.budget import BudgetError, Stage, check_budgets, check_stages
from mmsr.tools.cache import ReplayMiss
from mmsr.tools.replay import ReplaySearch
from mmsr.tools.server import (
    HTTPSearchTool,
    SearchServer,
    ServerNotReady,
    ServerRefused,
    request_from_json,
    request_to_json,
    result_from_json,
    result_to_json,
)
from mmsr.tools.web.fake import serve
from mmsr.tools.web.http import Limits, ToolError

from ..conftest import FVQA, ROOT
from .fake_web import Script, broken_png

JSONL = str(FVQA / "fvqa_dev.jsonl")
ROWS = [json.loads(line) for line in (FVQA / "fvqa_dev.jsonl").read_text(encoding="utf-8").splitlines()]
FAST = Limits(timeout_s=10.0, retries=0, breaker_failures=0)


class SlowTool:
    def __init__(self, delay: float) -> None:
        self.delay = delay

    async def __call__(self, request: ToolRequest) -> ToolResult:
        await asyncio.sleep(self.delay)
        return ToolResult("[Text Search Results]\n1. (title: slow) done\n", titles=("slow",))


async def _with_server(server: SearchServer, body):
    port = await server.start()
    try:
        return await body(f"http://127.0.0.1:{port}")
    finally:
        await server.stop()


def test_client_round_trip_equals_the_backend(monkeypatch):
    monkeypatch.delenv("MMSR_SEARCH_TOKEN", raising=False)
    replay = ReplaySearch(JSONL)
    row = next(r for r in ROWS if r["mmsearch_r1_7b_run"]["rounds"][0]["action"] == "image_search")
    image = Image.open(FVQA / row["image"]).convert("RGB")
    request = ToolRequest("image_search", image=image, sample_id=row["data_id"])

    async def body(url):
        client = HTTPSearchTool(url, limits=FAST)
        remote = await client(request)
        with pytest.raises(ReplayMiss, match="HTTP 409"):
            await client(ToolRequest("text_search", "never recorded", sample_id="r0"))
        async with aiohttp.ClientSession() as session:
            async with session.get(url + "/health") as r:
                assert (await r.json()) == {"status": "ok", "backends": ["image_search", "text_search"]}
            async with session.post(url + "/v1/search", data=b"{not json") as r:
                assert r.status == 400 and "bad request" in (await r.json())["error"]
            async with session.post(url + "/v1/search", json={"kind": "video_search"}) as r:
                assert r.status == 400 and "field 'kind'" in (await r.json())["error"]
            async with session.post(url + "/v1/search", json={"kind": "text_search", "query": 3}) as r:
                assert r.status == 400 and "field 'query'" in (await r.json())["error"]
            # a backend raised on it and the server logged a traceback at ERROR, for a client's mistake
            async with session.post(url + "/v1/search", json={"kind": "image_search", "sample_id": "r0"}) as r:
                assert r.status == 400 and "an image_search needs one of them" in (await r.json())["error"]
            async with session.get(url + "/v1/metrics") as r:
                assert (await r.json())["server/requests"] == 6
        return remote

    remote = asyncio.run(_with_server(SearchServer(replay, replay, port=0), body))
    local = asyncio.run(replay(request))
    assert remote.text == local.text and remote.titles == local.titles and remote.ok
    assert [im.tobytes() for im in remote.images] == [im.tobytes() for im in local.images]


def test_the_server_listens_on_loopback_unless_told_otherwise(monkeypatch):
    """Whoever reaches a search server spends the run's API budget: by default (the class, and ``mmsr serve-search``
    without ``--server.host``) it binds 127.0.0.1 only."""
    from jsonargparse import ArgumentParser

    monkeypatch.delenv("MMSR_SEARCH_TOKEN", raising=False)
    parser = ArgumentParser()
    parser.add_class_arguments(SearchServer, "server")
    assert parser.get_defaults().server.host == "127.0.0.1"
    server = SearchServer(text_search=SlowTool(0.0), port=0)

    async def body(url):
        return list(server._runner.addresses)

    assert [address[0] for address in asyncio.run(_with_server(server, body))] == ["127.0.0.1"]


def test_bearer_token_and_missing_backends(monkeypatch):
    monkeypatch.setenv("MMSR_SEARCH_TOKEN", "s3cret")
    server = SearchServer(text_search=SlowTool(0.0), port=0)

    async def refusal(url, request):
        try:
            await HTTPSearchTool(url, limits=FAST)(request)
        except ServerRefused as exc:
            return str(exc)
        raise AssertionError("a refused client must stop the run, not fail one search")

    async def body(url):
        good = await HTTPSearchTool(url, limits=FAST)(ToolRequest("text_search", "q"))
        monkeypatch.setenv("MMSR_SEARCH_TOKEN", "wr0ng-t0ken")
        bad = await refusal(url, ToolRequest("text_search", "q"))
        monkeypatch.setenv("MMSR_SEARCH_TOKEN", "s3cret")
        missing = await refusal(url, ToolRequest("image_search", image=Image.new("RGB", (4, 4))))
        async with aiohttp.ClientSession() as session, session.get(url + "/health") as r:
            assert r.status == 200  # health needs no token
        return url, good, bad, missing

    url, good, bad, missing = asyncio.run(_with_server(server, body))
    assert good.ok and good.titles == ("slow",)
    assert f"search server {url} refused the text_search request" in bad and "HTTP 401" in bad
    assert "environment variable MMSR_SEARCH_TOKEN" in bad and "s3cret" not in bad and "wr0ng" not in bad
    assert "no image_search backend is configured" in missing and "check HTTPSearchTool.url" in missing


@pytest.mark.parametrize("status", [401, 403, 404])
def test_a_refused_client_stops_the_run_naming_the_url_and_token_variable(monkeypatch, status):
    monkeypatch.setenv("MMSR_SEARCH_TOKEN", "t0ken-value")
    script = Script((status, {"error": "refused"}))

    async def main():
        async with serve([("POST", "/v1/search", script)]) as url:
            with pytest.raises(ServerRefused, match=f"search server {url} refused.*HTTP {status}") as caught:
                await HTTPSearchTool(url, limits=FAST)(ToolRequest("text_search", "q"))
            return str(caught.value)

    message = asyncio.run(main())
    assert isinstance(ServerRefused(""), FatalToolError) and len(script.requests) == 1  # not retried
    assert ("MMSR_SEARCH_TOKEN" in message) == (status != 404) and "t0ken-value" not in message


async def _checked(tool: HTTPSearchTool) -> str:
    """``tool.check_ready()`` from the loop that serves (in a thread, or it would wait on itself): its error as
    ``"<type>: <message>"``, "" if it passed."""
    try:
        await asyncio.to_thread(tool.check_ready)
    except FatalToolError as exc:
        return f"{type(exc).__name__}: {exc}"
    return ""


def test_check_ready_passes_against_a_running_server_with_the_right_token(monkeypatch):
    monkeypatch.setenv("MMSR_SEARCH_TOKEN", "s3cret")

    async def body(url):
        tools = [HTTPSearchTool(url, limits=FAST, kind="text_search"), HTTPSearchTool(url, limits=FAST)]  # None: any
        return [await _checked(tool) for tool in tools], tools[0].metrics()

    messages, metrics = asyncio.run(_with_server(SearchServer(text_search=SlowTool(0.0), port=0), body))
    assert messages == ["", ""] and metrics == {}  # the check is no search: not counted as one


def test_check_ready_refuses_a_wrong_token_naming_its_variable_not_the_token(monkeypatch):
    monkeypatch.setenv("MMSR_SEARCH_TOKEN", "s3cret")
    server = SearchServer(text_search=SlowTool(0.0), port=0)

    async def body(url):
        monkeypatch.setenv("MMSR_SEARCH_TOKEN", "wr0ng-t0ken")
        wrong = await _checked(HTTPSearchTool(url, limits=FAST, kind="text_search"))
        monkeypatch.delenv("MMSR_SEARCH_TOKEN")
        unset = await _checked(HTTPSearchTool(url, limits=FAST, kind="text_search"))
        return url, wrong, unset

    url, wrong, unset = asyncio.run(_with_server(server, body))
    for message in (wrong, unset):
        assert message.startswith(f"ServerRefused: search server {url} refused the text_search request")
        assert "HTTP 401" in message and "environment variable MMSR_SEARCH_TOKEN" in message
        assert "s3cret" not in message and "wr0ng" not in message


def test_check_ready_refuses_a_backend_the_server_lacks(monkeypatch):
    monkeypatch.delenv("MMSR_SEARCH_TOKEN", raising=False)

    async def body(url):
        return await _checked(HTTPSearchTool(url, limits=FAST, kind="image_search"))

    message = asyncio.run(_with_server(SearchServer(text_search=SlowTool(0.0), port=0), body))
    assert message.startswith("ServerRefused:") and "HTTP 404: no image_search backend is configured" in message
    assert "check HTTPSearchTool.url and that the server configures a image_search backend" in message
    with pytest.raises(ValueError, match="HTTPSearchTool.kind must be one of"):
        HTTPSearchTool(kind="video_search")


@pytest.mark.parametrize("port", [70000, -1, 65536])
def test_a_port_outside_0_65535_is_refused_naming_it(port):
    """``--server.port 70000`` ended in socket's ``OverflowError: bind(): port must be 0-65535`` once serving
    began, naming no setting; the server refuses it when built (``mmsr serve-search``: before serving)."""
    from mmsr.tools.server import main as server_main

    named = rf"SearchServer.port must be in 0\.\.65535 \(0: any free port\), got {port}$"
    with pytest.raises(ValueError, match=named):
        SearchServer(port=port)
    with pytest.raises(ValueError, match=named):
        server_main(["--server.port", str(port)])
    assert SearchServer(port=65535).port == 65535 and SearchServer(port=0).port == 0


def test_check_ready_names_the_url_when_nothing_listens(monkeypatch):
    monkeypatch.delenv("MMSR_SEARCH_TOKEN", raising=False)
    url = f"http://127.0.0.1:{_free_port()}"  # closed again: nothing listens there
    tool = HTTPSearchTool(url, limits=FAST, kind="text_search")
    with pytest.raises(ServerNotReady, match=f"nothing answers at search server {url} .*mmsr serve-search"):
        check_ready({"image_search": None, "text_search": tool})  # as ``mmsr fit`` calls it, no event loop running

    async def in_a_loop():  # as the search server's own start calls its backends' checks
        with pytest.raises(ServerNotReady, match="connection failed"):
            tool.check_ready()

    asyncio.run(in_a_loop())


@pytest.mark.parametrize("status", [429, 503, 400])
def test_service_trouble_and_a_bad_request_stay_failed_searches(monkeypatch, status):
    monkeypatch.delenv("MMSR_SEARCH_TOKEN", raising=False)

    async def main():
        async with serve([("POST", "/v1/search", Script((status, {"error": "busy"})))]) as url:
            return await HTTPSearchTool(url, limits=FAST)(ToolRequest("text_search", "q"))

    result = asyncio.run(main())
    assert not result.ok and f"HTTP {status}" in result.text


def test_shutdown_lets_requests_in_flight_finish(monkeypatch):
    monkeypatch.delenv("MMSR_SEARCH_TOKEN", raising=False)
    server = SearchServer(text_search=SlowTool(0.5), port=0, shutdown_timeout_s=5.0)

    async def main():
        port = await server.start()
        pending = asyncio.create_task(
            HTTPSearchTool(f"http://127.0.0.1:{port}", limits=FAST)(ToolRequest("text_search", "q"))
        )
        await asyncio.sleep(0.2)
        await server.stop()
        result = await pending
        after = await HTTPSearchTool(f"http://127.0.0.1:{port}", limits=FAST)(ToolRequest("text_search", "q"))
        return result, after

    result, after = asyncio.run(main())
    assert result.ok and result.titles == ("slow",)
    assert not after.ok and "connection failed" in after.text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_search_command_serves_and_stops_on_sigterm():
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "MMSR_SEARCH_TOKEN"}
    cmd = [
        sys.executable,
        "-m",
        "mmsr",
        "serve-search",
        "-c",
        "configs/tools/server_replay.yaml",
        "--server.port",
        str(port),
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                    assert json.load(r)["backends"] == ["image_search", "text_search"]
                    break
            except OSError:
                assert proc.poll() is None, proc.stdout.read()
                time.sleep(0.2)
        else:
            pytest.fail("server did not come up")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and "mmsr search server stopped" in out


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "tools").glob("*.yaml")), ids=lambda p: p.name)
def test_config_snippets_build(path: Path, monkeypatch):
    """Every snippet under configs/tools builds its tools (no file or network is touched while building)."""
    from jsonargparse import ArgumentParser

    for var in ("SERPAPI_API_KEY", "SERPER_API_KEY", "IMAGE_HOST_TOKEN"):
        monkeypatch.setenv(var, "test-key")
    monkeypatch.chdir(ROOT)
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    parser = ArgumentParser()
    if "server" in config:
        parser.add_class_arguments(SearchServer, "server")
        built = parser.instantiate(parser.parse_object(config)).server
        assert set(built.tools) == {"image_search", "text_search"}
        return
    for kind, tool_config in config["model"]["init_args"].items():
        parser = ArgumentParser()
        parser.add_argument("--tool", type=SearchTool)
        tool = parser.instantiate(parser.parse_object({"tool": tool_config})).tool
        assert kind in ("image_search", "text_search") and isinstance(tool, SearchTool)


def test_a_fatal_backend_error_stops_the_client_not_a_failed_search(tmp_path):
    """An unreadable FVQA cache behind the server is as fatal to the trainer as it is locally (409, re-raised).
    (A missing one stops the server at start, ``tests/tools/test_fvqa_cache.py``.)"""
    import pickle

    from mmsr.tools.fvqa_cache import FVQACacheSearch
    from mmsr.tools.server import RemoteFatalError

    refused = tmp_path / "fvqa_train_image_search_results_cache.pkl"
    refused.write_bytes(pickle.dumps(["not", "a", "dict"]))
    server = SearchServer(image_search=FVQACacheSearch(str(refused), tool_cache=None), port=0)

    async def body(url):
        with pytest.raises(RemoteFatalError, match="FVQACacheError.*fvqa_train_image_search_results_cache.pkl: expected a dict"):
            await HTTPSearchTool(url, limits=FAST)(ToolRequest("image_search", image=Image.new("RGB", (4, 4)), sample_id="r0"))

    asyncio.run(_with_server(server, body))


def test_a_corrupt_image_in_a_request_is_a_bad_request(monkeypatch):
    """Pillow raises SyntaxError on a broken PNG: the server must answer 400 naming the field, not 500."""
    import base64

    monkeypatch.delenv("MMSR_SEARCH_TOKEN", raising=False)
    body = {"kind": "image_search", "image": base64.b64encode(broken_png()).decode("ascii")}
    with pytest.raises(ValueError, match=r"field 'image': not a base64-encoded image \(SyntaxError\)"):
        request_from_json(body)

    async def post(url):
        async with aiohttp.ClientSession() as session, session.post(url + "/v1/search", json=body) as response:
            return response.status, await response.json()

    status, answer = asyncio.run(_with_server(SearchServer(image_search=SlowTool(0.0), port=0), post))
    assert status == 400 and "field 'image'" in answer["error"]
    # a partial result says so over the wire (and only then: other answers are unchanged)
    partial = ToolResult("[Text Search Results] short", partial=True)
    assert result_from_json(result_to_json(partial)).partial and "partial" not in result_to_json(ToolResult("x"))


class BudgetEcho(SlowTool):
    """Answers with the budget it was given, and has a ``check_budget`` (as ``CachedTool`` and web tools do)."""

    def __init__(self) -> None:
        super().__init__(0.0)

    async def __call__(self, request: ToolRequest) -> ToolResult:
        return ToolResult(f"[Text Search Results] budget {request.budget_s}")

    def check_budget(self, cap_s: float) -> None:
        pass


def test_a_retry_sends_the_time_left_not_the_first_attempts_budget(monkeypatch):
    # the budget was computed once: a retry after a slow 502 re-sent it, and the server aimed past the caller's cap
    monkeypatch.delenv("MMSR_SEARCH_TOKEN", raising=False)
    attempts: list[tuple[float, float]] = []  # (budget_s sent, seconds the server held the attempt)

    async def slow_502_then_ok(request: aiohttp.web.Request) -> aiohttp.web.Response:
        arrived, budget = time.perf_counter(), (await request.json())["budget_s"]
        if not attempts:
            await asyncio.sleep(0.3)
        attempts.append((budget, time.perf_counter() - arrived))
        if len(attempts) == 1:
            return aiohttp.web.Response(status=502, text="bad gateway")
        return aiohttp.web.json_response(result_to_json(ToolResult("[Text Search Results] ok")))

    async def main():
        limits = Limits(timeout_s=10.0, retries=1, backoff_s=0.01, backoff_max_s=0.02, breaker_failures=0)
        async with serve([("POST", "/v1/search", slow_502_then_ok)]) as url:
            return await HTTPSearchTool(url, limits=limits)(ToolRequest("text_search", "q", budget_s=10.0))

    assert asyncio.run(main()).ok and len(attempts) == 2
    (first, held), (second, _) = attempts
    # the first budget was computed before the first attempt arrived, the second after it was answered
    assert first <= 9.0 and first - second >= held > 0.0


class NeedsTime(SlowTool):
    """A backend whose one attempt needs 20 s, plus a 1 s reserve: 21 s (``check_budget`` as a web tool's)."""

    def __init__(self) -> None:
        super().__init__(0.0)

    def check_budget(self, cap_s: float) -> None:
        check_stages("SlowSearch", [Stage("slow_api", Limits(timeout_s=20.0))], 1.0, cap_s)


async def _budget_refusal(tool: HTTPSearchTool, cap_s: float) -> str:
    """``check_budgets`` of ``tool`` as ``mmsr fit`` calls it (in a thread: this loop serves): its error, or ""."""
    try:
        await asyncio.to_thread(check_budgets, {"text_search": tool}, cap_s)
    except BudgetError as exc:
        return str(exc)
    return ""


def test_the_clients_budget_check_refuses_a_cap_the_servers_backend_cannot_fit(monkeypatch):
    # the client checked only its round-trip reserve: a cap too small for the server's backend passed, and every
    # search then failed at once with "no time left"
    monkeypatch.setenv("MMSR_SEARCH_TOKEN", "s3cret")

    async def body(url):
        tool = HTTPSearchTool(url, limits=FAST, reserve_s=1.0, kind="text_search")
        refusals = [await _budget_refusal(tool, cap) for cap in (15.0, 22.0, math.inf)]
        async with aiohttp.ClientSession(headers={"Authorization": "Bearer s3cret"}) as session:
            answers = []
            for params in ({"kind": "text_search"}, {"budget_s": "NaN"}):  # an older client's check; a bad budget
                async with session.get(url + "/v1/ready", params=params) as response:
                    answers.append((response.status, await response.json()))
        return url, refusals, answers

    url, (too_small, fits, no_cap), (older, bad) = asyncio.run(_with_server(SearchServer(text_search=NeedsTime(),
                                                                                         port=0), body))  # fmt: skip
    assert too_small.startswith(f"text_search (HTTPSearchTool): search server {url} cannot answer within "
                                "rollout.tool_timeout_s=15 s (its backends get 14 s after the 1 s round-trip reserve)")
    assert "text_search (NeedsTime): SlowSearch cannot fit" in too_small and "= 21 s > 14 s" in too_small
    assert fits == no_cap == ""
    assert older == (200, {"status": "ok", "backends": ["text_search"]})
    assert bad[0] == 400 and "field 'budget_s'" in bad[1]["error"]

    async def against_an_older_server(url):  # no /v1/ready: nothing to ask, check_ready checks the rest
        return await _budget_refusal(HTTPSearchTool(url, limits=FAST, reserve_s=1.0, kind="text_search"), 15.0)

    assert asyncio.run(_with_server(OlderServer(text_search=NeedsTime(), port=0), against_an_older_server)) == ""


def test_an_infinite_budget_is_no_cap_and_nan_is_a_bad_request(monkeypatch):
    # Python's json reads Infinity and 1e400 as inf: round(inf) in the budget check was a 500 on every search
    # with rollout.tool_timeout_s: .inf
    monkeypatch.delenv("MMSR_SEARCH_TOKEN", raising=False)

    async def body(url):
        statuses = {}
        async with aiohttp.ClientSession() as session:
            for value in ("Infinity", "1e400", "NaN", "-Infinity"):
                data = f'{{"kind": "text_search", "query": "q", "budget_s": {value}}}'
                async with session.post(url + "/v1/search", data=data) as r:
                    statuses[value] = (r.status, await r.json())
        client = await HTTPSearchTool(url, limits=FAST)(ToolRequest("text_search", "q", budget_s=float("inf")))
        return statuses, client

    statuses, client = asyncio.run(_with_server(SearchServer(text_search=BudgetEcho(), port=0), body))
    assert statuses["Infinity"] == statuses["1e400"] and statuses["Infinity"][0] == 200
    assert statuses["Infinity"][1]["text"].endswith("budget None")
    for bad in ("NaN", "-Infinity"):
        assert statuses[bad][0] == 400 and "field 'budget_s'" in statuses[bad][1]["error"]
    assert client.ok and client.text.endswith("budget None")
    assert request_to_json(ToolRequest("text_search", budget_s=float("inf")))["budget_s"] is None


@pytest.mark.parametrize(
    "data, field",
    [(b'{"kind": "text_search", "query": "q", "budget_s": 1' + b"0" * 400 + b"}", "field 'budget_s'"),
     (b'{"kind": "text_search", "query": "a\\ud800b"}', "field 'query'"),
     (b'{"kind": "text_search", "query": "q", "question": "\\udfff"}', "field 'question'"),
     (b'{"kind": "text_search", "image_url": "\\ud800"}', "field 'image_url'"),
     (b"[" * 100_000 + b"]" * 100_000, "nested too deeply")],
    ids=["huge_budget", "surrogate_query", "surrogate_question", "surrogate_image_url", "deep_nesting"],
)  # fmt: skip
def test_a_body_json_reads_but_no_request_holds_is_a_bad_request_naming_the_field(monkeypatch, caplog, data, field):
    # a 400-digit budget_s overflowed float() and deep nesting overflowed json's recursion (both a 500); a lone
    # surrogate reached the backend, whose HTTP call or cache raised UnicodeEncodeError (a failed search, logged)
    monkeypatch.delenv("MMSR_SEARCH_TOKEN", raising=False)

    async def post(url):
        async with aiohttp.ClientSession() as session, session.post(url + "/v1/search", data=data) as response:
            return response.status, await response.text()

    status, answer = asyncio.run(_with_server(SearchServer(text_search=BudgetEcho(), port=0), post))
    assert (status, json.loads(answer)["error"].startswith("bad request: ")) == (400, True) and field in answer
    assert not [r for r in caplog.records if r.levelno >= 40]  # nothing logged as a server error


def _status_with(port: int, authorization: bytes) -> str:
    """The status line of a search sent with raw ``Authorization`` header bytes (aiohttp's client refuses some)."""
    body = b'{"kind": "text_search", "query": "q"}'
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"POST /v1/search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAuthorization: "
                  + authorization + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n"
                  + body)  # fmt: skip
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    return answer.split(b"\r\n", 1)[0].decode().split(" ", 2)[1]


@pytest.mark.parametrize(
    "authorization, status",
    [(b"Bearer s3cret", "200"), (b"bearer s3cret", "200"), (b"BEARER  s3cret", "200"), (b"s3cret", "401"),
     (b"Basic s3cret", "401"), (b"Bearer", "401"), (b"Bearer \xff\xfe", "401")],
)  # fmt: skip
def test_the_bearer_scheme_is_required_and_matched_case_insensitively(monkeypatch, authorization, status):
    monkeypatch.setenv("MMSR_SEARCH_TOKEN", "s3cret")
    server = SearchServer(text_search=SlowTool(0.0), port=0)

    async def body(url):
        return await asyncio.to_thread(_status_with, int(url.rsplit(":", 1)[1]), authorization)

    assert asyncio.run(_with_server(server, body)) == status


def test_server_metrics_are_per_backend_and_never_sent_travels(monkeypatch, tmp_path):
    from mmsr.tools.base import failure
    from mmsr.tools.cache import CachedTool

    monkeypatch.delenv("MMSR_SEARCH_TOKEN", raising=False)
    path = str(tmp_path / "c.sqlite")
    image, text = CachedTool(SlowTool(0.0), path, provider="a"), CachedTool(SlowTool(0.0), path, provider="b")
    server = SearchServer(image_search=image, text_search=text, port=0)

    async def body(url):
        client = HTTPSearchTool(url, limits=FAST)
        await client(ToolRequest("text_search", "q1"))
        await client(ToolRequest("text_search", "q2"))
        async with aiohttp.ClientSession() as session, session.get(url + "/v1/metrics") as r:
            return await r.json()

    metrics = asyncio.run(_with_server(server, body))
    assert metrics["tools/text_search/api_calls"] == 2 and metrics["tools/image_search/api_calls"] == 0
    assert not result_from_json(result_to_json(failure("text_search", "circuit open", sent=False))).sent
    assert "sent" not in result_to_json(ToolResult("x"))


def test_server_metrics_name_a_cached_backends_counters_as_the_trainer_does(monkeypatch, tmp_path):
    # One CachedTool serves both kinds: text search "q" misses then hits, image search misses. The server named
    # them tools/text_search/text_search/cache_hits, and filed both kinds' calls under each kind.
    from mmsr.metrics import tool_counters
    from mmsr.tools.cache import CachedTool

    monkeypatch.delenv("MMSR_SEARCH_TOKEN", raising=False)
    shared = CachedTool(SlowTool(0.0), str(tmp_path / "c.sqlite"), provider="a")
    server = SearchServer(image_search=shared, text_search=shared, port=0)

    async def body(url):
        client = HTTPSearchTool(url, limits=FAST)
        for request in (ToolRequest("text_search", "q"), ToolRequest("text_search", "q"),
                        ToolRequest("image_search", image_url="https://img.example/1.jpg")):  # fmt: skip
            assert (await client(request)).ok
        async with aiohttp.ClientSession() as session, session.get(url + "/v1/metrics") as r:
            return await r.json()

    served = asyncio.run(_with_server(server, body))
    assert served["tools/text_search/cache_misses"] == 1 and served["tools/text_search/cache_hits"] == 1
    assert served["tools/image_search/cache_misses"] == 1 and "tools/image_search/cache_hits" not in served
    assert served["tools/text_search/api_calls"] == 1 and served["tools/image_search/api_calls"] == 1
    assert {k: v for k, v in served.items() if k != "server/requests"} == tool_counters(server.tools)


@pytest.mark.parametrize("field", ["cost", "latency_s"])
def test_an_answer_with_a_nan_cost_or_latency_is_not_a_tool_result(field):
    # Python's json reads NaN: a server's bad number must fail the search (ToolError), not reach a budget
    body = result_to_json(ToolResult("[Text Search Results] x", cost=0.5)) | {field: float("nan")}
    with pytest.raises(ToolError, match=f"not a tool result.*ToolResult {field} must be a finite number"):
        result_from_json(body)


class OlderServer(SearchServer):
    """A search server from before ``GET /v1/ready`` (its routes then: /health, /v1/metrics, /v1/search)."""

    def app(self):
        app = aiohttp.web.Application(client_max_size=self.max_request_bytes, middlewares=[self._auth])
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/metrics", self._metrics)
        app.router.add_post("/v1/search", self._search)
        return app


def test_check_ready_against_a_server_from_before_v1_ready_checks_its_health_and_token(monkeypatch):
    # Its 404 for the unknown route was read as a wrong URL or a missing backend: a good client was refused.
    monkeypatch.setenv("MMSR_SEARCH_TOKEN", "s3cret")

    async def body(url):
        good = [await _checked(HTTPSearchTool(url, limits=FAST, kind=kind)) for kind in ("text_search", None)]
        missing = await _checked(HTTPSearchTool(url, limits=FAST, kind="image_search"))
        monkeypatch.setenv("MMSR_SEARCH_TOKEN", "wr0ng-t0ken")
        wrong = await _checked(HTTPSearchTool(url, limits=FAST, kind="text_search"))
        return url, good, missing, wrong

    url, good, missing, wrong = asyncio.run(_with_server(OlderServer(text_search=SlowTool(0.0), port=0), body))
    assert good == ["", ""]
    assert missing.startswith(f"ServerRefused: search server {url} refused the image_search request")
    assert "check HTTPSearchTool.url and that the server configures a image_search backend" in missing
    assert "HTTP 401" in wrong and "environment variable MMSR_SEARCH_TOKEN" in wrong and "wr0ng" not in wrong


def test_check_ready_names_a_url_where_no_search_server_answers(monkeypatch):
    monkeypatch.delenv("MMSR_SEARCH_TOKEN", raising=False)

    async def main():
        async with serve([("GET", "/other", Script((200, {})))]) as url:  # a web server, not a search server
            return url, await _checked(HTTPSearchTool(url + "/api", limits=FAST, kind="text_search"))

    url, message = asyncio.run(main())
    assert message.startswith(f"ServerRefused: {url}/api is no mmsr search server (GET /v1/ready: ")
    assert "HTTP 404" in message and message.endswith("lists no backends): check HTTPSearchTool.url")


class Summarizer(SlowTool):
    """The server's web text search: summaries written for the request's question."""

    def __init__(self) -> None:
        super().__init__(0.0)

    async def __call__(self, request: ToolRequest) -> ToolResult:
        return ToolResult(f"[Text Search Results] {request.query} for: {request.question}")


@pytest.mark.parametrize("focused", [True, False])
def test_a_client_cache_keys_the_servers_text_search_by_question_unless_told_not_to(monkeypatch, tmp_path, focused):
    # Two rows search the same query through a client-side cache: the second row got the summaries the server
    # wrote for the first row's question (the client declared no question_focused, so the key was "q:<query>").
    from mmsr.tools.cache import CachedTool

    monkeypatch.delenv("MMSR_SEARCH_TOKEN", raising=False)
    asked = [ToolRequest("text_search", "eiffel tower", question=q) for q in ("How tall?", "Who built it?")]

    async def body(url):
        client = HTTPSearchTool(url, limits=FAST) if focused else HTTPSearchTool(url, limits=FAST, question_focused=False)
        cached = CachedTool(client, str(tmp_path / "c.sqlite"))
        return cached.question_focused, [(await cached(r)).text for r in asked]

    keyed, texts = asyncio.run(_with_server(SearchServer(text_search=Summarizer(), port=0), body))
    served = ("How tall?", "Who built it?") if focused else ("How tall?", "How tall?")
    assert keyed is focused and texts == [f"[Text Search Results] eiffel tower for: {q}" for q in served]
