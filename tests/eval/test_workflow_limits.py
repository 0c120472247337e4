"""A run's ``tool_limits`` in the workflows that fix their own tools, and in an evaluation with other tools."""

from mmsr.eval.workflows import limits_for, setup
from mmsr.rollout.loop import RolloutSettings
from mmsr.tools.crop import Crop
from mmsr.tools.spec import MMSEARCH_R1_TOOLS


def test_direct_drops_a_runs_limit_of_a_tool_it_does_not_run():
    settings = RolloutSettings(tool_limits={"crop": 2})
    assert setup("direct", settings).settings.tool_limits == {}


def test_rag_searches_once_each_whatever_the_runs_tool_limits():
    fixed = setup("rag", RolloutSettings(tool_limits={"text_search": 3, "image_search": 2})).settings
    assert [fixed.limit(spec) for spec in MMSEARCH_R1_TOOLS] == [1, 1]


def test_an_evaluation_keeps_only_the_limits_of_the_tools_it_loads():
    settings = RolloutSettings(tool_limits={"crop": 2, "text_search": 1})
    assert limits_for(settings, {"image_search": None, "text_search": None}).tool_limits == {"text_search": 1}
    with_crop = {"crop": Crop()}
    assert limits_for(settings, with_crop).tool_limits == {"crop": 2}


def test_rag_runs_with_tool_entries_whose_limits_its_one_search_overrides(tiny_policy, fvqa_samples):
    """RAG sets one search of each kind, whatever the entries' own limits (``TextSearchTool(limit=2)``, as the
    recipes'); the check that refuses an overridden entry limit belongs to training's configured settings, and when
    the loop ran it too, the RAG workflow of such tools failed after the on-demand one."""
    from mmsr.eval.load import MMSEARCH_R1_ROLLOUT
    from mmsr.eval.run import Evaluator
    from mmsr.rollout.engine import ScriptedEngine
    from mmsr.tools.spec import ImageSearchTool, TextSearchTool, configured
    from tests.rollout.test_loop import FakeImageSearch, FakeTextSearch

    tools = configured([ImageSearchTool(FakeImageSearch(), limit=1), TextSearchTool(FakeTextSearch(), limit=2)])
    sample = fvqa_samples[0]
    script = {sample.id: [f"<reason>r</reason><answer>{sample.ground_truth}</answer>"]}
    for workflow in ("on-demand", "rag"):
        evaluator = Evaluator(tiny_policy, ScriptedEngine(script, tiny_policy.tokenizer), tools, MMSEARCH_R1_ROLLOUT)
        (record,) = evaluator.run([sample], workflow, "dev")
        assert record.calls == (2 if workflow == "rag" else 0), workflow
