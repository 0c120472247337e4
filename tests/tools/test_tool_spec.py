"""Tools as data: the README's calculator (a ``Tool`` subclass plus a YAML entry) runs a scripted episode
through the real loop, parser, prompt, format reward and metrics, with nothing in mmsr/ knowing its name."""

import re
import sys
from pathlib import Path

import pytest
import yaml
from jsonargparse import ArgumentParser

from mmsr.cli import lightning_cli
from mmsr.metrics import rollout_metrics, tool_metrics
from mmsr.prompt.render import PromptBuilder
from mmsr.reward.format import format_ok, turn_kind
from mmsr.reward.mmsearch_r1 import MMSearchR1Reward
from mmsr.rollout.actions import Answer, Invalid, ToolUse, stop_strings
from mmsr.rollout.engine import SamplingParams, ScriptedEngine
from mmsr.rollout.loop import RolloutLoop, RolloutSettings
from mmsr.rollout.parse import parse_action
from mmsr.tools.spec import (IMAGE_SEARCH, MMSEARCH_R1_TOOLS, TEXT_SEARCH, ImageSearchTool, TextSearchTool, Tool, ToolSpec,
                             configured, declared)

ROOT = Path(__file__).resolve().parents[2]
R = "<reason>add</reason>"


def readme_block(lang: str, first_line: str) -> str:
    """The README code block in ``lang`` that starts with ``first_line``."""
    blocks = re.findall(rf"```{lang}\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL)
    (block,) = [b for b in blocks if b.startswith(first_line)]
    return block


@pytest.fixture
def calculator(tmp_path, monkeypatch) -> Tool:
    """The README's ``calc_tool.py`` as a module of its own, its description beside it, built from the
    README's YAML entry."""
    (tmp_path / "calc_tool.py").write_text(readme_block("python", "# calc_tool.py"))
    (tmp_path / "calc_tool.txt").write_text(readme_block("text", "- If the question needs arithmetic"))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "calc_tool", raising=False)
    entry = yaml.safe_load(readme_block("yaml", "model:\n  init_args:\n    tools:"))["model"]["init_args"]
    parser = ArgumentParser()
    parser.add_argument("--tools", type=list[Tool])
    (tool,) = parser.instantiate(parser.parse_object(entry)).tools
    return tool


def run(policy, sample, tool, script, settings=RolloutSettings()):
    loop = RolloutLoop(ScriptedEngine({f"{sample.id}#0": script}, policy.tokenizer), policy, PromptBuilder(),
                       configured([tool]), settings)  # fmt: skip
    (traj,) = loop.run([sample], 1, SamplingParams())
    return loop, traj


def test_readme_calculator_runs_a_scripted_episode(tiny_policy, fvqa_samples, calculator):
    sample = fvqa_samples[0]
    assert calculator.spec.name == "calculator" and calculator.spec.limit == 3  # the YAML's limit
    turns = [f"{R}<calc>2 * (3 + 4)</calc> and text the stop string cuts", f"{R}<answer>14</answer>"]
    loop, traj = run(tiny_policy, sample, calculator, turns)
    assert [t.action for t in traj.turns] == [ToolUse("calculator", "2 * (3 + 4)"), Answer("14")]
    assert traj.turns[0].text == f"{R}<calc>2 * (3 + 4)</calc>"
    # The round-1 prompt describes the calculator with its own template, in the template's tools line.
    prompt = tiny_policy.tokenizer.decode(traj.input_ids[: traj.prompt_len])
    described = readme_block("text", "- If the question needs arithmetic").strip()
    assert described in prompt and "{tools}" not in prompt and prompt.index(described) < prompt.index("Rules:")
    assert traj.turns[0].tool_call.result.text == "[Calculator Results] 2 * (3 + 4) = 14"
    # The observation is in context with mask 0; the mask's 1-runs are exactly the two sampled turns.
    between = tiny_policy.tokenizer.decode(traj.input_ids[traj.turns[0].span[1] : traj.turns[1].span[0]])
    assert "<information>[Calculator Results] 2 * (3 + 4) = 14</information>" in between
    ones = [i for i, m in enumerate(traj.loss_mask) if m]
    assert ones == [i for t in traj.turns for i in range(*t.span)]
    # Counters, metrics and the format reward read the tool's declaration.
    assert traj.tools == (calculator.spec,) and traj.num_calls("calculator") == traj.num_tool_calls == 1
    assert tool_metrics(loop.stats, loop.tools)["tools/calculator_calls"] == 1.0
    metrics = rollout_metrics([traj], [sample], [1.0], [{}], loop.settings)
    assert metrics["rollout/search_ratio/calc"] == 1.0 and metrics["rollout/search_ratio/calls"] == 0.5
    assert MMSearchR1Reward().details(traj, sample)["format"] == 1.0


def test_bad_expression_is_a_failure_observation_and_the_limit_holds(tiny_policy, fvqa_samples, calculator):
    script = [f"{R}<calc>1 / 0</calc>", *[f"{R}<calc>{k} + 1</calc>" for k in range(3)]]
    _, traj = run(tiny_policy, fvqa_samples[0], calculator, script, RolloutSettings(max_rounds=6))
    first = traj.turns[0].tool_call.result
    assert not first.ok and first.text.startswith("[Calculator Results] The search failed (cannot evaluate '1 / 0'")
    assert traj.num_calls("calculator") == 3 and traj.finish_reason == "search_limit"  # the 4th call is refused


def test_only_the_configured_tools_are_in_the_grammar(calculator):
    tools = (calculator.spec,)
    assert stop_strings(tools) == ("</calc>", "</answer>")
    assert parse_action("<search><img></search>", tools) == Invalid("no action tag")
    assert parse_action("<calc> 1 +\n 2 </calc>", tools) == ToolUse("calculator", "1 + 2")
    assert parse_action("<calc>  </calc>", tools) == Invalid("empty calc query")
    assert parse_action("<calc>1 <answer>x</answer></calc>", tools) == Answer("x")  # tags do not nest


def test_format_accepts_tools_in_declared_order_each_once(calculator):
    tools = (IMAGE_SEARCH, TEXT_SEARCH, calculator.spec)
    img, calc, ans = f"{R}<search><img></search>", f"{R}<calc>1+1</calc>", f"{R}<answer>2</answer>"
    assert turn_kind(calc, tools) == "calculator" and turn_kind(calc) is None  # unknown to the default pair
    assert format_ok([img, calc, ans], tools) and format_ok([calc, ans], tools)
    assert not format_ok([calc, img, ans], tools) and not format_ok([calc, calc, ans], tools)


def test_declarations_are_checked(calculator):
    assert declared({"image_search": None, "text_search": None}) == MMSEARCH_R1_TOOLS
    with pytest.raises(ValueError, match="not declared: configure them as Tool subclasses"):
        declared({"calculator": object()})
    with pytest.raises(ValueError, match="'image_search' is configured twice"):
        configured([ImageSearchTool()], image_search=object())
    with pytest.raises(ValueError, match="tag 'answer' must be a word"):
        type(calculator.spec)("x", "answer")


def test_the_image_marker_is_no_tool_tag():
    """``<image>`` is the image marker (``IMAGE_MARKER``): a tool tagged ``image`` was accepted and its call, written
    in the round-1 prompt, made the first rollout die with "text has 2 image markers but 1 images"."""
    with pytest.raises(ValueError, match=r"tool 'zoom': tag 'image' must be a word that is not .*/image"):
        ToolSpec("zoom", "image")


def test_two_tools_with_one_tag_are_refused_naming_both(calculator):
    """Every call parses as the first tool's, so the second never ran, without a word."""

    class Wiki(Tool):
        spec = ToolSpec("wiki", "text_search", "text")

    with pytest.raises(ValueError, match=r"tools 'text_search' and 'wiki' both declare the tag <text_search>"):
        declared(configured([TextSearchTool(), Wiki()]))
    assert [s.tag for s in declared(configured([TextSearchTool(), calculator]))] == ["text_search", "calc"]


def test_a_config_with_tools_parses_through_the_cli(tmp_path, calculator):
    extra = tmp_path / "tools.yaml"
    extra.write_text(yaml.safe_dump({"model": {"init_args": {"tools": [
        {"class_path": "calc_tool.Calculator"},
        {"class_path": "mmsr.tools.spec.TextSearchTool", "init_args": {"limit": 1}},
    ]}}}))  # fmt: skip
    cli = lightning_cli(["-c", str(ROOT / "configs" / "smoke.yaml"), "-c", str(extra)], run=False, parse_only=True)
    tools = cli.config["model"]["init_args"]["tools"]
    assert [t["class_path"] for t in tools] == ["calc_tool.Calculator", "mmsr.tools.spec.TextSearchTool"]


def test_eval_counts_calls_of_every_configured_tool():
    from mmsr.eval.report import EvalRecord, metrics

    fields = dict(set="s", workflow="on-demand", sample_id="1", data_source="d", category=None, question="q",
                  ground_truth="a", candidate_answers=[], answer="a", em=True, subem=True, reward=1.0,
                  format_ok=True, image_searches=0, text_searches=0, allowed_calls=2, finish_reason="answer",
                  num_tokens=10)  # fmt: skip
    crop_only = EvalRecord(**fields, tool_calls={"crop": 1, "image_search": 0, "text_search": 0})
    old = EvalRecord(**{**fields, "text_searches": 2})  # a record written before tool_calls
    m = metrics([crop_only, EvalRecord(**fields)])
    assert m["search_ratio"] == 0.5 and m["call_ratio"] == 0.25 and m["image_only"] == m["text_only"] == 0.0
    assert metrics([old])["call_ratio"] == 1.0


def test_eval_tools_file_takes_tools_entries(tmp_path, calculator):
    from mmsr.eval.load import load_tools

    path = tmp_path / "tools.yaml"
    path.write_text(yaml.safe_dump({"image_search": {"class_path": "mmsr.tools.local.LocalImageSearch", "init_args": {
        "index": str(ROOT / "data" / "fvqa_dev_20" / "search" / "image_index.jsonl")}},
        "tools": [{"class_path": "calc_tool.Calculator"}]}))  # fmt: skip
    tools = load_tools(path)
    assert list(tools) == ["image_search", "calculator"] and isinstance(tools["image_search"], ImageSearchTool)
    assert declared(tools) == (MMSEARCH_R1_TOOLS[0], type(calculator).spec)


def test_eval_tools_file_takes_a_configs_tools_snippet(monkeypatch):
    """The refusal without tools points at ``configs/tools/``, whose snippets hold the tools under
    ``model.init_args`` (merged over run configs): ``--tools`` takes them as they are."""
    from mmsr.eval.load import load_tools
    from mmsr.tools.replay import ReplaySearch

    monkeypatch.chdir(ROOT)
    tools = load_tools(ROOT / "configs" / "tools" / "replay.yaml")
    assert list(tools) == ["image_search", "text_search"]
    assert all(isinstance(t, ReplaySearch) or isinstance(getattr(t, "backend", None), ReplaySearch) for t in tools.values())
