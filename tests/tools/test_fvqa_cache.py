"""The FVQA image-search cache backend, on small pickles written here in the released layout (``data_id ->
{tool_returned_web_title_list, tool_returned_images_urls}``, URL strings and pickled Pillow images), URL
thumbnails served by a local server; and the restricted unpickler refusing what the layout does not need."""

from __future__ import annotations

import asyncio
import functools
import io
import json
import os
import pickle
from pathlib import Path

import pytest
import yaml
from PIL import Image

from mmsr.tools import IMAGE_MARKER, ToolRequest
from mmsr.tools.base import FatalToolError
from mmsr.tools.budget import BudgetError
from mmsr.tools.fvqa_cache import DeadThumbnail, FVQACacheError, FVQACacheSearch
from mmsr.tools.fvqa_pickle import UnsafePickle, safe_load
from mmsr.tools.web.fake import png, serve
from mmsr.tools.web.http import Limits
from tools.check_fvqa_cache import main as check_main  # a script of the top-level tools/

from .fake_web import Script

FAST = Limits(timeout_s=2.0, retries=0, breaker_failures=0)
ROOT = Path(__file__).resolve().parents[2]


def jpeg_file(color: str, size: tuple[int, int] = (30, 20)) -> Image.Image:
    """A decoded ``JpegImageFile``: what the released pickles hold for an inline thumbnail."""
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="JPEG", quality=95)
    image = Image.open(io.BytesIO(buffer.getvalue()))
    image.load()
    return image


def write_cache(path: Path, url: str, protocol: int = pickle.HIGHEST_PROTOCOL) -> Path:
    rows = {
        "fvqa_train_1": {
            "tool_returned_web_title_list": ["Red page", "Blue page", "Dead page", "Green page"],
            "tool_returned_images_urls": [f"{url}/red.png", jpeg_file("blue"), f"{url}/gone.png", f"{url}/green.png"],
        },
        "fvqa_train_2": {
            "tool_returned_web_title_list": ["Only inline"],
            "tool_returned_images_urls": [jpeg_file("white", (600, 300))],
        },  # fmt: skip
        "fvqa_train_3": {
            "tool_returned_web_title_list": ["Dead 1", "Dead 2"],
            "tool_returned_images_urls": [f"{url}/gone.png", f"{url}/gone.png"],
        },  # fmt: skip
    }
    path.write_bytes(pickle.dumps(rows, protocol=protocol))
    return path


def thumbnail_server():
    scripts = {"/red.png": Script((200, png("red"))), "/green.png": Script((200, png("green"))),
               "/gone.png": Script((404, "Not Found"))}  # fmt: skip
    return scripts, serve([("GET", p, s) for p, s in scripts.items()])


def tool_for(path: Path, tool_cache: Path | None, **kwargs) -> FVQACacheSearch:
    return FVQACacheSearch(str(path), tool_cache=str(tool_cache) if tool_cache else None, allow_private=True,
                           thumbnail_limits=FAST, max_side=64, **kwargs)  # fmt: skip


def request(data_id: str) -> ToolRequest:
    return ToolRequest("image_search", image=Image.new("RGB", (8, 8)), sample_id=data_id, budget_s=30.0)


def fetched(scripts: dict[str, Script]) -> int:
    return sum(len(s.requests) for s in scripts.values())


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_row_results_in_rank_order_with_dead_thumbnails_reported_and_cached(tmp_path, protocol):
    scripts, server = thumbnail_server()

    async def main():
        async with server as url:
            path = write_cache(tmp_path / "cache.pkl", url, protocol)
            tool = tool_for(path, tmp_path / "tools.sqlite")
            first = await tool(request("fvqa_train_1"))
            after_first = fetched(scripts)
            again = await tool(request("fvqa_train_1"))
            other_process = tool_for(path, tmp_path / "tools.sqlite")  # same SQLite file, fresh tool
            third = await other_process(request("fvqa_train_1"))
            return url, tool, other_process, first, again, third, after_first

    url, tool, other_process, first, again, third, after_first = asyncio.run(main())
    assert first.ok and first.titles == ("Red page", "Blue page", "Green page")  # the 404 is skipped, order kept
    assert first.text.startswith("[Image Search Results]") and first.text.count(IMAGE_MARKER) == 3
    assert "Dead page" not in first.text
    assert [im.getpixel((0, 0)) for im in (first.images[0], first.images[2])] == [(255, 0, 0), (0, 128, 0)]
    assert all(abs(a - b) <= 3 for a, b in zip(first.images[1].getpixel((5, 5)), (0, 0, 255)))  # the JPEG, inline
    assert [im.size for im in first.images] == [(40, 30), (30, 20), (40, 30)]
    [dead] = tool.dead_thumbnails()["fvqa_train_1"]
    assert dead == DeadThumbnail(3, f"{url}/gone.png", dead.reason) and "404" in dead.reason
    assert list(tool.dead_thumbnails()) == ["fvqa_train_1"]
    assert after_first == 3 and fetched(scripts) == 3  # the second call and the other tool hit the SQLite cache
    for hit in (again, third):
        assert hit.titles == first.titles and hit.text == first.text
        assert [im.tobytes() for im in hit.images] == [im.tobytes() for im in first.images]
    metrics = tool.metrics()
    assert metrics["tools/fvqa_cache/rows_with_dead_thumbnails"] == 1
    assert metrics["tools/fvqa_cache/thumbnail_http_4xx"] == 1 and metrics["tools/fvqa_cache/tool_cache_hits"] == 1
    assert other_process.metrics()["tools/fvqa_cache/tool_cache_hits"] == 1


def test_inline_rows_missing_ids_and_all_dead_rows_are_observations(tmp_path):
    scripts, server = thumbnail_server()

    async def main():
        async with server as url:
            tool = tool_for(write_cache(tmp_path / "cache.pkl", url), None)
            calls = [tool(request(d)) for d in ("fvqa_train_2", "fvqa_test_9", "fvqa_train_3")]
            return tool, await asyncio.gather(*calls)

    tool, (inline, missing, dead) = asyncio.run(main())
    assert inline.ok and inline.titles == ("Only inline",) and inline.images[0].size == (64, 32)  # shrunk
    assert not missing.ok and "no cached image search" in missing.text and not missing.images
    assert not dead.ok and "none of the 2 result images could be loaded" in dead.text
    assert [d.rank for d in tool.dead_thumbnails()["fvqa_train_3"]] == [1, 2]
    assert tool.metrics()["tools/fvqa_cache/missing_rows"] == 1


def test_top_k_cuts_after_skipping(tmp_path):
    scripts, server = thumbnail_server()

    async def main():
        async with server as url:
            tool = tool_for(write_cache(tmp_path / "cache.pkl", url), None, top_k=2)
            return await tool(request("fvqa_train_1"))

    assert asyncio.run(main()).titles == ("Red page", "Blue page")


def test_a_row_cut_short_by_a_transient_failure_is_not_stored(tmp_path):
    busy = Script((503, "busy"), (200, png("blue")))  # busy once, then fine
    gone = Script((404, "Not Found"))  # a permanent failure: a complete answer without it

    async def main():
        async with serve([("GET", "/red.png", Script((200, png("red")))), ("GET", "/busy.png", busy),
                          ("GET", "/gone.png", gone)]) as url:  # fmt: skip
            rows = {"row": {"tool_returned_web_title_list": ["Red", "Busy", "Gone"],
                            "tool_returned_images_urls": [f"{url}/red.png", f"{url}/busy.png", f"{url}/gone.png"]}}
            (tmp_path / "c.pkl").write_bytes(pickle.dumps(rows))
            tool = tool_for(tmp_path / "c.pkl", tmp_path / "tools.sqlite")
            return [await tool(request("row")) for _ in range(3)]

    short, whole, hit = asyncio.run(main())
    assert short.ok and short.partial and short.titles == ("Red",)
    assert whole.titles == hit.titles == ("Red", "Busy") and not whole.partial
    assert len(busy.requests) == 2 and len(gone.requests) == 2  # the third call was served from the tool cache


class RunsCommand:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class CallsEval:
    def __reduce__(self):
        return eval, ("1 + 1",)


@pytest.mark.parametrize("payload", ["os.system", "builtins.eval", "class"])
def test_a_malicious_pickle_is_refused_naming_file_and_class_without_running_it(tmp_path, payload):
    marker = tmp_path / "pwned"
    evil = {"os.system": RunsCommand(marker), "builtins.eval": CallsEval(), "class": Script()}[payload]
    rows = {"fvqa_train_1": {"tool_returned_web_title_list": ["x"], "tool_returned_images_urls": [evil]}}
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(rows))
    tool = FVQACacheSearch(str(path), tool_cache=None)  # building reads nothing
    with pytest.raises(FVQACacheError) as caught:
        asyncio.run(tool(request("fvqa_train_1")))  # fatal: the rollout re-raises it, the run stops
    assert isinstance(caught.value.__cause__, UnsafePickle)
    message = str(caught.value)
    assert str(path) in message
    named = {"os.system": "system", "builtins.eval": "builtins.eval", "class": "fake_web.Script"}[payload]
    assert named in message and "refusing" in message
    assert not marker.exists()
    with pytest.raises(UnsafePickle):
        safe_load(path)


def tampered_jpeg() -> Image.Image:
    """A ``JpegImageFile`` that pickles as Pillow's own (NEWOBJ + BUILD) but whose state claims 1000 x 1000
    pixels and holds 12 bytes."""
    image = jpeg_file("red")
    image.__getstate__ = lambda: [{}, "RGB", (1000, 1000), None, b"\0" * 12, None, [], 0]
    return image


def test_a_tampered_pickled_image_is_a_dead_thumbnail_not_a_crash(tmp_path):
    rows = {"fvqa_train_1": {"tool_returned_web_title_list": ["bad", "good"],
                             "tool_returned_images_urls": [tampered_jpeg(), jpeg_file("red")]}}  # fmt: skip
    path = tmp_path / "cache.pkl"
    path.write_bytes(pickle.dumps(rows))
    tool = tool_for(path, None)
    result = asyncio.run(tool(request("fvqa_train_1")))
    assert result.ok and result.titles == ("good",)
    assert "pickled image is unreadable" in tool.dead_thumbnails()["fvqa_train_1"][0].reason
    assert tool.metrics()["tools/fvqa_cache/thumbnail_bad_pickled_image"] == 1


@pytest.mark.parametrize("size, data, says", [
    ((100_000, 100_000), b"\0" * 12, "at most 64000000 pixels"),  # would ask Pillow for 30 GB
    ((1000, 1000), b"\0" * 12, "needs 3000000 bytes, the pickle holds 12"),
])
def test_a_pickled_size_is_checked_against_its_data_before_anything_is_allocated(size, data, says):
    from mmsr.tools.fvqa_pickle import image_from_state

    with pytest.raises(ValueError, match=says):
        image_from_state([{}, "RGB", size, None, data])
    assert image_from_state([{}, "L", (3, 2), None, bytes(range(6))]).size == (3, 2)


def test_missing_file_and_bad_rows_are_fatal_clear_errors(tmp_path):
    missing = FVQACacheSearch(str(tmp_path / "fvqa_train_image_search_results_cache.pkl"))
    with pytest.raises(FVQACacheError, match="hf download lmms-lab/FVQA fvqa_train_image_search_results_cache"):
        asyncio.run(missing(request("fvqa_train_1")))
    assert isinstance(FVQACacheError("x"), FatalToolError)
    path = tmp_path / "bad.pkl"
    path.write_bytes(pickle.dumps({"fvqa_train_5": {"tool_returned_web_title_list": "not a list",
                                                    "tool_returned_images_urls": []}}))  # fmt: skip
    with pytest.raises(FVQACacheError, match=r"bad.pkl: row 'fvqa_train_5': tool_returned_web_title_list"):
        FVQACacheSearch(str(path)).rows


def test_a_corrupt_pickle_is_fatal_and_names_the_file_whatever_it_raises(tmp_path):
    # Protocol 2 stores bytes as _codecs.encode(str, "latin1"): one flipped byte in the codec's name makes
    # loading raise LookupError, which escaped as a failed search on every call instead of stopping the run.
    path = tmp_path / "fvqa_train_image_search_results_cache.pkl"
    data = {"fvqa_train_1": {"tool_returned_web_title_list": ["t"], "tool_returned_images_urls": [b"\xff"]}}
    good = pickle.dumps(data, protocol=2)
    assert b"latin1" in good
    path.write_bytes(good.replace(b"latin1", b"latxn1"))
    with pytest.raises(pickle.UnpicklingError, match=f"{path}: not a readable pickle \\(LookupError"):
        safe_load(path)
    with pytest.raises(FVQACacheError, match="fvqa_train_image_search_results_cache.pkl: not a readable pickle"):
        asyncio.run(FVQACacheSearch(str(path), tool_cache=None)(request("fvqa_train_1")))


def test_check_script_lists_rows_with_dead_thumbnails(tmp_path):
    scripts, server = thumbnail_server()
    out = tmp_path / "dead.jsonl"

    async def main():
        async with server as url:
            path = write_cache(tmp_path / "cache.pkl", url)
            return await asyncio.to_thread(check_main, [str(path), "--allow-private", "--out", str(out)])

    summary = asyncio.run(main())
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary == lines[-1] == {"rows": 3, "rows_with_dead_thumbnails": 2, "dead_thumbnails": 3,
                                    "rows_with_unreachable_thumbnails": 0, "rows_empty": 1}  # fmt: skip
    assert [(r["data_id"], [d["rank"] for d in r["dead"]], r["unreachable"], r["kept"]) for r in lines[:-1]] == [
        ("fvqa_train_1", [3], [], 3), ("fvqa_train_3", [1, 2], [], 0)]  # fmt: skip


def test_a_thumbnail_a_transient_failure_kept_is_unreachable_not_gone_until_a_call_fetches_it(tmp_path):
    """A 503 (a rate limit, a server's bad minute) was recorded as a gone thumbnail: the row was counted in
    ``rows_with_dead_thumbnails`` and listed by the check script, and stayed so after the next call fetched it."""
    scripts = {"/busy.png": Script((503, "busy"), (200, png("red")))}
    rows = {"fvqa_train_1": {"tool_returned_web_title_list": ["Busy"], "tool_returned_images_urls": ["{url}/busy.png"]}}

    async def main():
        async with serve([("GET", p, sc) for p, sc in scripts.items()]) as url:
            rows["fvqa_train_1"]["tool_returned_images_urls"] = [f"{url}/busy.png"]
            (tmp_path / "cache.pkl").write_bytes(pickle.dumps(rows))
            tool = tool_for(tmp_path / "cache.pkl", None)
            first = await tool(request("fvqa_train_1"))
            seen = (tool.dead_thumbnails(), list(tool.dead_thumbnails(unreachable=True)), tool.metrics())
            second = await tool(request("fvqa_train_1"))
            return first, seen, second, tool

    first, (dead, unreachable, metrics), second, tool = asyncio.run(main())
    assert not first.ok and dead == {} and unreachable == ["fvqa_train_1"]
    assert metrics["tools/fvqa_cache/rows_with_dead_thumbnails"] == 0 and metrics["tools/fvqa_cache/thumbnail_http_5xx"] == 1
    assert second.ok and tool.dead_thumbnails(unreachable=True) == {} and tool.dead_thumbnails() == {}


def test_an_unreachable_thumbnail_found_gone_later_is_listed_as_gone_only(tmp_path):
    scripts = {"/going.png": Script((503, "busy"), (404, "Not Found"))}

    async def main():
        async with serve([("GET", p, sc) for p, sc in scripts.items()]) as url:
            rows = {"fvqa_train_1": {"tool_returned_web_title_list": ["Going"], "tool_returned_images_urls": [f"{url}/going.png"]}}
            (tmp_path / "cache.pkl").write_bytes(pickle.dumps(rows))
            tool = tool_for(tmp_path / "cache.pkl", None)
            await tool(request("fvqa_train_1"))
            await tool(request("fvqa_train_1"))
            return tool

    tool = asyncio.run(main())
    assert list(tool.dead_thumbnails()) == ["fvqa_train_1"] and tool.dead_thumbnails(unreachable=True) == {}


@pytest.mark.parametrize("recipe", ["qwen2_5_vl_7b_1x8", "qwen2_5_vl_7b_4x8"])
def test_7b_recipes_search_images_in_the_fvqa_cache(recipe, tmp_path, monkeypatch):
    """The recipe's entry builds this backend, and a recipe run without the download says what to fetch (the
    full CLI parse of the recipes is tests/test_configs.py's)."""
    config = yaml.safe_load((ROOT / "configs" / "mmsearch_r1" / f"{recipe}.yaml").read_text())["model"]["init_args"]
    entry = config["image_search"]
    assert entry["class_path"] == "mmsr.tools.fvqa_cache.FVQACacheSearch" and "text_search" not in config
    monkeypatch.chdir(tmp_path)  # the recipe's relative path, where nothing was downloaded
    with pytest.raises(FVQACacheError, match="data/fvqa/fvqa_train_image_search_results_cache.pkl not found"):
        FVQACacheSearch(**entry["init_args"]).rows
    (tmp_path / "data" / "fvqa").mkdir(parents=True)
    write_cache(tmp_path / entry["init_args"]["path"], "http://127.0.0.1:9")
    tool = FVQACacheSearch(**entry["init_args"])
    assert set(tool.rows) == {"fvqa_train_1", "fvqa_train_2", "fvqa_train_3"} and tool.top_k == 5
    tool.check_budget(120.0)  # the recipes' rollout.tool_timeout_s: one thumbnail attempt (15 s) + 1 s reserve
    with pytest.raises(BudgetError, match="FVQACacheSearch cannot fit"):
        tool.check_budget(10.0)


# --- the start-up check: a missing file stops a run before its model loads ----------------------------------------


def test_start_up_check_names_a_missing_file_without_reading_any(tmp_path):
    from mmsr.tools.base import check_ready
    from mmsr.tools.cache import CachedTool, ReplayMiss
    from mmsr.tools.spec import ImageSearchTool

    missing = tmp_path / "data" / "fvqa_test_image_search_results_cache.pkl"
    present = write_cache(tmp_path / "train.pkl", "http://127.0.0.1:9")
    tool = FVQACacheSearch([str(present), str(missing)])
    for wrapped in (tool, ImageSearchTool(tool), CachedTool(tool, str(tmp_path / "cache.sqlite"))):
        with pytest.raises(FVQACacheError, match=r"fvqa_test_image_search_results_cache.pkl not found. Download it "
                                                 r"\(hf download lmms-lab/FVQA fvqa_test_"):  # fmt: skip
            check_ready({"image_search": wrapped, "text_search": None})
    assert tool._rows is None and not (tmp_path / "cache.sqlite").exists()  # checked, nothing read or opened
    check_ready({"image_search": FVQACacheSearch(str(present))})
    replay = CachedTool(None, str(tmp_path / "recorded.sqlite"), mode="replay_only")
    with pytest.raises(ReplayMiss, match="replay-only cache .*recorded.sqlite does not exist"):
        check_ready({"text_search": replay})
    assert not (tmp_path / "recorded.sqlite").exists()


def test_fit_eval_and_the_search_server_check_the_cache_before_anything_loads(tmp_path, monkeypatch):
    """``mmsr fit`` stops before the policy is built, ``mmsr eval --tools`` before the policy loads, the search
    server before it listens."""
    from mmsr.cli import lightning_cli
    from mmsr.eval.cli import load_from_args, parser
    from mmsr.models.build import TinyQwen2_5_VL
    from mmsr.tools.server import SearchServer

    @functools.wraps(TinyQwen2_5_VL.build)  # its signature: the config's protocol check reads it
    def no_policy(self):
        raise AssertionError("the policy was built before the tools were checked")

    monkeypatch.setattr(TinyQwen2_5_VL, "build", no_policy)
    monkeypatch.chdir(ROOT)
    missing = str(tmp_path / "fvqa_train_image_search_results_cache.pkl")
    fvqa = ["--model.init_args.image_search.class_path", "mmsr.tools.fvqa_cache.FVQACacheSearch",
            "--model.init_args.image_search.init_args.path", missing]  # fmt: skip
    with pytest.raises(FVQACacheError, match="fvqa_train_image_search_results_cache.pkl not found"):
        lightning_cli(["fit", "-c", "configs/smoke.yaml", *fvqa])
    tools = tmp_path / "tools.yaml"
    tools.write_text(yaml.safe_dump({"image_search": {"class_path": "mmsr.tools.fvqa_cache.FVQACacheSearch",
                                                      "init_args": {"path": missing}}}))  # fmt: skip
    args = parser().parse_args(["--policy", str(tmp_path / "no_policy.yaml"), "--tools", str(tools),
                                "--data", str(tmp_path / "no_data.parquet")])  # fmt: skip
    with pytest.raises(FVQACacheError, match="not found"):  # not the policy file's FileNotFoundError
        load_from_args(args)
    server = SearchServer(image_search=FVQACacheSearch(missing), port=0)
    with pytest.raises(FVQACacheError, match="not found"):
        asyncio.run(server.start())
    assert server._runner is None


def test_tools_that_check_nothing_themselves_are_not_built_twice(tmp_path):
    """``LocalTextSearch`` reads its corpus when built (seconds for the demo's image index): a config of such
    tools only is not built for the start-up check; one with a checking class is (the FVQA cache, in a list)."""
    from mmsr.cli_checks import check_tools_ready

    local = {"class_path": "mmsr.tools.local.LocalTextSearch", "init_args": {"corpus": str(tmp_path / "none.jsonl")}}
    check_tools_ready({"init_args": {"text_search": local}}, None)  # built, it would raise FileNotFoundError
    fvqa = {"class_path": "mmsr.tools.spec.ImageSearchTool", "init_args": {"backend": {
        "class_path": "mmsr.tools.fvqa_cache.FVQACacheSearch", "init_args": {"path": str(tmp_path / "x.pkl")}}}}
    with pytest.raises(FVQACacheError, match="x.pkl not found"):
        check_tools_ready({"init_args": {"tools": [fvqa]}}, None)


def test_a_thumbnail_host_a_dns_outage_could_not_resolve_is_unreachable_and_asked_again(tmp_path, monkeypatch):
    """A lookup that failed for now (``EAI_AGAIN``: the DNS server down) was a refused URL: the thumbnail was listed
    as gone, not retried, and the row cut short by it stored in the tool cache for good."""
    import socket

    lookups = []

    async def dns_down(self, host, *args, **kwargs):
        lookups.append(host)
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(asyncio.BaseEventLoop, "getaddrinfo", dns_down)
    inline = jpeg_file("blue")
    rows = {"fvqa_train_1": {"tool_returned_web_title_list": ["Far", "Inline"],
                             "tool_returned_images_urls": ["https://thumbs.example.org/a.png", inline]}}  # fmt: skip
    (tmp_path / "c.pkl").write_bytes(pickle.dumps(rows))

    def tool():
        return FVQACacheSearch(str(tmp_path / "c.pkl"), tool_cache=str(tmp_path / "tools.sqlite"), max_side=64,
                               thumbnail_limits=Limits(timeout_s=2.0, retries=1, backoff_s=0.0, breaker_failures=0))  # fmt: skip

    first = tool()
    short = asyncio.run(first(request("fvqa_train_1")))
    assert short.titles == ("Inline",) and short.partial and lookups == ["thumbs.example.org"] * 2  # retried
    assert first.dead_thumbnails() == {} and list(first.dead_thumbnails(unreachable=True)) == ["fvqa_train_1"]
    asyncio.run(tool()(request("fvqa_train_1")))  # a later process: the short row was not stored
    assert len(lookups) == 4


@pytest.mark.parametrize(("errno", "raised"), [("EAI_NONAME", "BlockedURL"), ("EAI_AGAIN", "UnresolvedHost"),
                                               ("EAI_FAIL", "UnresolvedHost")])  # fmt: skip
def test_a_name_that_does_not_exist_is_refused_and_a_lookup_that_failed_for_now_is_not(monkeypatch, errno, raised):
    import socket

    from mmsr.tools.web import guard

    async def lookup(self, host, *args, **kwargs):
        raise socket.gaierror(getattr(socket, errno), "lookup failed")

    monkeypatch.setattr(asyncio.BaseEventLoop, "getaddrinfo", lookup)
    with pytest.raises(getattr(guard, raised), match="cannot resolve 'thumbs.example.org'"):
        asyncio.run(guard.check_url("https://thumbs.example.org/a.png"))
