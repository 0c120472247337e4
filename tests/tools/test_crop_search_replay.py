"""Crop-then-search against replay: a region search run on a live backend (the offline pHash index) is
recorded as a ``crop_search`` round, then replayed through the real rollout loop; the same box answers with the
recorded titles, any other box is a failure observation (a replay miss is not a crash)."""

from __future__ import annotations

import json

import pytest

from mmsr.prompt.render import PromptBuilder
from mmsr.rollout.engine import SamplingParams, ScriptedEngine
from mmsr.rollout.loop import RolloutLoop, RolloutSettings
from mmsr.tools.crop import CropSearch
from mmsr.tools.local import LocalImageSearch
from mmsr.tools.replay import ReplaySearch, recorded_results
from mmsr.tools.spec import configured
from tests.conftest import FVQA

ANS = "<reason>seen</reason><answer>a sign</answer>"


def seen_size(policy, image) -> tuple[int, int]:
    """(width, height) of ``image`` as the policy sees it: its patch grid times the patch size."""
    _, h, w = policy.process_image(image).grid_thw
    return int(w) * policy.image_processor.patch_size, int(h) * policy.image_processor.patch_size


def crop_episode(policy, sample, backend, box):
    turn = f"<reason>zoom</reason><crop_search>{box}</crop_search>"
    engine = ScriptedEngine({f"{sample.id}#0": [turn, ANS]}, policy.tokenizer)
    loop = RolloutLoop(engine, policy, PromptBuilder(), configured([CropSearch(backend)]), RolloutSettings())
    (traj,) = loop.run([sample], 1, SamplingParams())
    return traj


def record(tmp_path, sample, box, size, titles):
    """The row of ``sample`` with one recorded crop_search round, as a jsonl file next to nothing else."""
    row = json.loads((FVQA / "fvqa_dev.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert row["data_id"] == sample.id
    row["image"] = str((FVQA / row["image"]).resolve())
    tool = {"box": box, "image_size": list(size), "titles": list(titles)}
    row["mmsearch_r1_7b_run"]["rounds"] = [{"round": 1, "action": "crop_search", "tool": tool}]
    path = tmp_path / "recorded.jsonl"
    path.write_text(json.dumps(row) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("on_miss", ["error", "failure"])
def test_a_recorded_region_search_replays_and_another_region_is_a_failure(tiny_policy, fvqa_samples, tmp_path, on_miss):
    sample = fvqa_samples[0]
    w, h = seen_size(tiny_policy, sample.image)
    box = [w // 4, h // 4, w * 3 // 4, h * 3 // 4]
    live = LocalImageSearch(index=str(FVQA / "search" / "image_index.jsonl"), top_k=3)
    recorded = crop_episode(tiny_policy, sample, live, str(box)).turns[0].tool_call.result
    assert recorded.ok and len(recorded.titles) == 3
    replay = ReplaySearch(str(record(tmp_path, sample, box, (w, h), recorded.titles)), on_miss=on_miss)

    again = crop_episode(tiny_policy, sample, replay, str(box))
    result = again.turns[0].tool_call.result
    assert result.ok and result.titles == recorded.titles and again.finish_reason == "answer"
    assert len(again.vision) == 1 + 3 and result.text.startswith("[Image Search Results]")
    sx, sy = sample.image.width / w, sample.image.height / h
    region = sample.image.convert("RGB").crop((round(box[0] * sx), round(box[1] * sy), round(box[2] * sx), round(box[3] * sy)))
    region.thumbnail((64, 64))
    assert result.images[0].tobytes() == region.tobytes()  # the stand-in thumbnail is the region itself

    other = crop_episode(tiny_policy, sample, replay, f"[0, 0, {w // 2}, {h // 2}]")
    missed = other.turns[0].tool_call.result
    assert not missed.ok and "The search failed" in missed.text and len(other.vision) == 1
    assert other.finish_reason == "answer"
    whole = crop_episode(tiny_policy, sample, replay, f"[0, 0, {w}, {h}]")  # the row's own image: not recorded here
    assert not whole.turns[0].tool_call.result.ok


def test_a_bad_recorded_box_names_the_row_and_round(fvqa_samples, tmp_path):
    path = record(tmp_path, fvqa_samples[0], [10, 10, 5, 20], (100, 100), ["x"])
    with pytest.raises(ValueError, match=r"recorded.jsonl:1 round 1: tool.box \[10, 10, 5, 20\].*is not inside"):
        recorded_results(path)
