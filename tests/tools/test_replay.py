"""Replaying the recorded MMSearch-R1-7B runs of the FVQA dev rows reproduces what the model was shown."""

from __future__ import annotations

import asyncio
import json

import pytest
from PIL import Image

from mmsr.reward.answer import episode_answer
from mmsr.prompt.render import PromptBuilder
from mmsr.rollout.engine import SamplingParams, ScriptedEngine
from mmsr.rollout.loop import RolloutLoop, RolloutSettings
from mmsr.tools import IMAGE_MARKER, ToolRequest
from mmsr.tools.cache import CachedTool, ReplayMiss
from mmsr.tools.format import one_line
from mmsr.tools.replay import PROVIDER, ReplaySearch, main, record_into_cache

from ..conftest import FVQA

ROWS = [json.loads(line) for line in (FVQA / "fvqa_dev.jsonl").read_text(encoding="utf-8").splitlines()]
JSONL = str(FVQA / "fvqa_dev.jsonl")


@pytest.fixture(scope="module")
def replay() -> ReplaySearch:
    return ReplaySearch(JSONL)


def _rounds(row: dict) -> list[dict]:
    return row["mmsearch_r1_7b_run"]["rounds"]


def _check_observation(kind: str, tool: dict, result) -> None:
    """The observation holds exactly what the recording says the model saw."""
    if kind == "image_search":
        assert result.ok and list(result.titles) == tool["titles"]
        assert len(result.images) == len(tool["titles"]) == result.text.count(IMAGE_MARKER)
        return
    by_rank = {r["rank"]: r for r in tool["results"]}
    assert list(result.titles) == [by_rank[s["rank"]]["title"] for s in tool["summaries"]]
    for s in tool["summaries"]:
        assert one_line(s["summary"]) in result.text and by_rank[s["rank"]]["url"] in result.text


def test_rollout_replay_reproduces_the_recorded_observations(tiny_policy, fvqa_samples, replay):
    """Every row, its recorded model turns played by a ScriptedEngine through the real rollout loop."""
    script = {row["data_id"]: [r["model_response"] for r in _rounds(row)] for row in ROWS}
    loop = RolloutLoop(ScriptedEngine(script, tiny_policy.tokenizer), tiny_policy, PromptBuilder(),
                       {"image_search": replay, "text_search": replay},
                       RolloutSettings(max_tokens_per_turn=4096, max_context_tokens=65536))  # fmt: skip
    trajectories = loop.run(fvqa_samples, 1, SamplingParams(max_tokens=4096))
    rows = {row["data_id"]: row for row in ROWS}
    checked = 0
    for traj in trajectories:
        row = rows[traj.sample_id]
        for turn, recorded in zip(traj.turns, _rounds(row)):
            if recorded["action"] == "answer":
                assert turn.tool_call is None and episode_answer(traj.assistant_texts) == row["mmsearch_r1_7b_run"]["final_answer"]
                continue
            assert turn.tool_call.kind == recorded["action"]
            _check_observation(recorded["action"], recorded["tool"], turn.tool_call.result)
            checked += 1
    assert checked == 31 and loop.stats.tool_failures == 0  # 18 image + 13 text searches


def test_image_results_are_keyed_by_the_rows_image(replay):
    row = next(r for r in ROWS if _rounds(r)[0]["action"] == "image_search")
    image = Image.open(FVQA / row["image"]).convert("RGB")
    by_image = asyncio.run(replay(ToolRequest("image_search", image=image)))
    by_id = asyncio.run(replay(ToolRequest("image_search", sample_id=row["data_id"])))
    assert list(by_image.titles) == list(by_id.titles) == _rounds(row)[0]["tool"]["titles"]
    # the replayed thumbnail is the question image itself, shrunk (the recorded thumbnails are URLs only)
    assert max(by_image.images[0].size) == 64
    assert by_image.images[0].getpixel((0, 0)) == pytest.approx(
        image.resize(by_image.images[0].size).getpixel((0, 0)), abs=40
    )


def test_a_miss_is_an_error_or_a_failure_observation(replay):
    with pytest.raises(ReplayMiss, match="no recorded text_search for row 'x1'"):
        asyncio.run(replay(ToolRequest("text_search", "never asked", sample_id="x1")))
    with pytest.raises(ReplayMiss):
        asyncio.run(replay(ToolRequest("image_search", image=Image.new("RGB", (9, 9)))))
    lenient = ReplaySearch(JSONL, on_miss="failure")
    result = asyncio.run(lenient(ToolRequest("text_search", "never asked")))
    assert not result.ok and "no recorded result" in result.text


def test_recordings_load_into_the_cache_for_replay_only_runs(tmp_path, replay, capsys):
    cache = str(tmp_path / "cache.sqlite")
    main(["--src", JSONL, "--cache", cache])
    assert "wrote 31 recorded results" in capsys.readouterr().out
    assert record_into_cache(JSONL, cache) == 31  # idempotent
    cached = CachedTool(None, cache, mode="replay_only", provider=PROVIDER)
    row = next(r for r in ROWS if any(x["action"] == "text_search" for x in _rounds(r)))
    query = next(x["tool"]["query"] for x in _rounds(row) if x["action"] == "text_search")
    from_cache = asyncio.run(cached(ToolRequest("text_search", query.upper())))
    direct = asyncio.run(replay(ToolRequest("text_search", query)))
    assert from_cache.text == direct.text and from_cache.titles == direct.titles
    image = Image.open(FVQA / row["image"]).convert("RGB")
    assert asyncio.run(cached(ToolRequest("image_search", image=image))).titles == tuple(
        _rounds(row)[0]["tool"]["titles"]
    )


def _recording(path, rows: list[dict]) -> str:
    """``rows`` as a jsonl at ``path``, their image paths made absolute (the images stay in the FVQA folder)."""
    absolute = [dict(r, image=str(FVQA / r["image"]) if r.get("image") else None) for r in rows]
    path.write_text("".join(json.dumps(r) + "\n" for r in absolute), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("ids", ["numeric data_id", "id instead of data_id", "no id"])
def test_rows_are_identified_as_the_loader_identifies_them(tmp_path, ids):
    # load_samples ids a row by data_id, else id, as a string: the replay looked up row["data_id"] as it was;
    # a row without either is its folder, stem and index
    row = next(r for r in ROWS if _rounds(r)[0]["action"] == "image_search")
    if ids == "numeric data_id":
        changed, sample_id = dict(row, data_id=1000), "1000"
    elif ids == "no id":
        changed, sample_id = {k: v for k, v in row.items() if k != "data_id"}, f"{tmp_path.name}/rec-0"
    else:
        changed, sample_id = {("id" if k == "data_id" else k): v for k, v in row.items()}, row["data_id"]
    replay = ReplaySearch(_recording(tmp_path / "rec.jsonl", [changed]))
    by_id = asyncio.run(replay(ToolRequest("image_search", sample_id=sample_id)))
    assert list(by_id.titles) == _rounds(row)[0]["tool"]["titles"]


def test_a_recording_holding_a_unicode_line_separator_loads(tmp_path):
    """``json.dumps(ensure_ascii=False)`` writes U+2028 raw inside strings; ``str.splitlines`` cut the line
    there, and the recording was refused as malformed."""
    row = next(r for r in ROWS if _rounds(r)[0]["action"] == "image_search")
    path = tmp_path / "rec.jsonl"
    path.write_text(json.dumps(dict(row, question=row["question"] + "\u2028(one word)", image=str(FVQA / row["image"])),
                               ensure_ascii=False) + "\n", encoding="utf-8")  # fmt: skip
    assert "\u2028" in path.read_text(encoding="utf-8")
    by_id = asyncio.run(ReplaySearch(str(path))(ToolRequest("image_search", sample_id=row["data_id"])))
    assert list(by_id.titles) == _rounds(row)[0]["tool"]["titles"]


def test_a_recorded_image_search_without_an_image_names_the_line(tmp_path):
    first, second = [r for r in ROWS if _rounds(r)[0]["action"] == "image_search"][:2]
    path = _recording(tmp_path / "rec.jsonl", [first, dict(second, image=None)])
    with pytest.raises(ValueError, match=r"rec.jsonl:2 round \S+: a recorded image_search but the row has no image"):
        ReplaySearch(path)
