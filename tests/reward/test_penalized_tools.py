"""Which tool calls the search penalty counts (``ToolSpec.penalized``): MMSearch-R1's searches and crop search
always, a crop unless configured free (``Crop(penalized=False)``, in YAML too). The search-ratio metrics and
``details()["searched"]`` still count every tool call."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mmsr.cli import lightning_cli
from mmsr.prompt.render import PromptBuilder
from mmsr.reward import MMSearchR1Reward, format_ok, mmsearch_r1_reward, penalized_count, search_count
from mmsr.rollout.engine import SamplingParams, ScriptedEngine
from mmsr.rollout.loop import RolloutLoop, RolloutSettings
from mmsr.tools.crop import Crop, CropSearch
from mmsr.tools.local import LocalImageSearch
from mmsr.tools.spec import IMAGE_SEARCH, MMSEARCH_R1_TOOLS, TEXT_SEARCH, ImageSearchTool, configured, declared
from tests.conftest import FVQA

ROOT = Path(__file__).resolve().parents[2]
R = "<reason>zoom</reason>"
CROP = f"{R}<crop>[0, 0, 28, 28]</crop>"
CROP_SEARCH = f"{R}<crop_search>[0, 0, 28, 28]</crop_search>"
IMG = f"{R}<search><img></search>"
TXT = f"{R}<text_search>who</text_search>"
RIGHT = f"{R}<answer>Gustave Eiffel</answer>"
GT = "Gustave Eiffel"
FREE, PAID = Crop(penalized=False).spec, Crop().spec
TOOLS = (FREE, CropSearch.spec, IMAGE_SEARCH, TEXT_SEARCH)  # format order: crop, crop search, image, text


def test_the_declarations() -> None:
    assert all(s.penalized for s in (*MMSEARCH_R1_TOOLS, PAID, CropSearch(object()).spec))
    assert not FREE.penalized and Crop.spec.penalized  # the instance's spec, not the class's
    assert Crop(limit=1, penalized=False).spec.limit == 1  # both overrides hold together


def test_only_penalized_calls_are_counted() -> None:
    assert penalized_count([CROP, IMG, TXT, RIGHT], TOOLS) == 2 and search_count([CROP, IMG, TXT, RIGHT], TOOLS) == 3
    assert penalized_count([CROP, CROP, RIGHT], TOOLS) == 0 and search_count([CROP, CROP, RIGHT], TOOLS) == 2
    assert penalized_count([CROP_SEARCH, RIGHT], TOOLS) == 1  # a crop that searches is a search
    assert penalized_count([CROP, CROP, RIGHT], (PAID, *TOOLS[1:])) == 2
    assert penalized_count([f"{CROP}<search> <img></search>", RIGHT], TOOLS) == 1  # a search tag in it counts
    assert penalized_count([IMG], TOOLS) == 0  # the final turn never counts


@pytest.mark.parametrize(
    ("crop", "turns", "per_search", "expected"),
    [
        # 0.9 * (1 - 0.5)^(penalized calls) * correct + 0.1 * format
        (FREE, [CROP, IMG, RIGHT], True, 0.9 * 0.5 + 0.1),  # the image search alone
        (PAID, [CROP, IMG, RIGHT], True, 0.9 * 0.25 + 0.1),  # the crop too
        (FREE, [CROP, IMG, TXT, RIGHT], True, 0.9 * 0.25 + 0.1),
        (PAID, [CROP, IMG, RIGHT], False, 0.9 * 0.5 + 0.1),  # once, however many
        (FREE, [CROP, RIGHT], True, 1.0),  # crop only: no penalty
        (FREE, [CROP, RIGHT], False, 1.0),
        (PAID, [CROP, RIGHT], False, 0.9 * 0.5 + 0.1),
        (FREE, [CROP_SEARCH, RIGHT], False, 0.9 * 0.5 + 0.1),
        (FREE, [CROP, f"{R}<answer>Victor Hugo</answer>"], False, 0.1),  # wrong: format only, as before
    ],
)
def test_reward(crop, turns, per_search, expected) -> None:
    tools = (crop, *TOOLS[1:])
    assert format_ok(turns, tools)
    reward = mmsearch_r1_reward(turns, GT, search_penalty=0.5, per_search_penalty=per_search, tools=tools)
    assert reward == pytest.approx(expected)


@pytest.mark.parametrize(("penalized", "expected"), [(False, 0.9 * 0.5 + 0.1), (True, 0.9 * 0.25 + 0.1)])
def test_an_episode_with_a_crop_and_an_image_search(tiny_policy, fvqa_samples, penalized, expected) -> None:
    """Through the real loop: the trajectory carries the configured crop's spec to the reward."""
    sample = fvqa_samples[0]
    local = LocalImageSearch(index=str(FVQA / "search" / "image_index.jsonl"), top_k=1)
    answer = f"{R}<answer>{sample.ground_truth}</answer>"
    engine = ScriptedEngine({f"{sample.id}#0": [CROP, IMG, answer]}, tiny_policy.tokenizer)
    tools = configured([Crop(penalized=penalized), ImageSearchTool(local)])
    loop = RolloutLoop(engine, tiny_policy, PromptBuilder(), tools, RolloutSettings(max_rounds=3))
    (traj,) = loop.run([sample], 1, SamplingParams())
    assert traj.num_calls("crop") == traj.num_calls("image_search") == 1 and traj.finish_reason == "answer"
    reward = MMSearchR1Reward(search_penalty=0.5, per_search_penalty=True)
    assert reward(traj, sample) == pytest.approx(expected)
    assert reward.details(traj, sample) == {"correct": 1.0, "format": 1.0, "searched": 1.0}


def test_crop_only_episode_is_unpenalized_but_still_searched(tiny_policy, fvqa_samples) -> None:
    sample = fvqa_samples[0]
    answer = f"{R}<answer>{sample.ground_truth}</answer>"
    engine = ScriptedEngine({f"{sample.id}#0": [CROP, answer]}, tiny_policy.tokenizer)
    loop = RolloutLoop(engine, tiny_policy, PromptBuilder(), configured([Crop(penalized=False)]), RolloutSettings())
    (traj,) = loop.run([sample], 1, SamplingParams())
    assert traj.num_calls("crop") == 1 and traj.turns[0].tool_call.result.ok
    assert MMSearchR1Reward()(traj, sample) == pytest.approx(1.0)
    assert MMSearchR1Reward().details(traj, sample)["searched"] == 1.0  # search ratios count every tool


def test_yaml_sets_it_through_the_cli(tmp_path, monkeypatch) -> None:
    """The crop_search example with its crop made free: the built module's loop declares it so."""
    config = yaml.safe_load((ROOT / "configs" / "examples" / "crop_search.yaml").read_text())
    tools = config["model"]["init_args"]["tools"]
    assert tools[0]["class_path"] == "mmsr.tools.crop.Crop"
    tools[0]["init_args"]["penalized"] = False
    extra = tmp_path / "free_crop.yaml"
    extra.write_text(yaml.safe_dump({"model": {"init_args": {"tools": tools}}}))
    monkeypatch.chdir(ROOT)
    cli = lightning_cli(["-c", str(ROOT / "configs" / "examples" / "crop_search.yaml"), "-c", str(extra)], run=False)
    specs = {s.name: s for s in declared(cli.model.loop.tools)}
    assert [n for n, s in specs.items() if not s.penalized] == ["crop"]
    assert specs["crop"].limit == 1 and list(specs) == ["crop", "crop_search", "image_search", "text_search"]
