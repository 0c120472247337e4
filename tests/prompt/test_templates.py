"""The shipped round-1 prompt ends as upstream's does, and after-search templates are checked at start-up."""

import re
from dataclasses import replace
from pathlib import Path

import pytest

from mmsr.prompt.render import PromptBuilder
from mmsr.rollout.engine import ScriptedEngine
from mmsr.rollout.loop import RolloutLoop
from mmsr.tools.spec import IMAGE_SEARCH, MMSEARCH_R1_TOOLS, Tool, configured

TAIL = "Here is the image and the question:\n"


def test_round1_puts_a_space_between_the_image_and_the_question(fvqa_samples):
    """Spec section 5: the prompt ends ``question:\\n<image> `` and the question follows (upstream's
    rollout splits the decoded context on ``question:\\n `` to find the question again)."""
    sample = fvqa_samples[0]
    for builder in (PromptBuilder(), PromptBuilder().for_tools(MMSEARCH_R1_TOOLS)):
        assert builder.first_user_text(sample).endswith(f"{TAIL}<image> {sample.question}")
        # without an image the space goes with the marker: the question starts its line
        assert builder.first_user_text(replace(sample, image=None)).endswith(f"{TAIL}{sample.question}")


@pytest.mark.parametrize("kind", ["text_search", "image_search"])
def test_repeat_question_decides_whether_an_observation_restates_the_question(fvqa_samples, kind):
    """MMSearch-R1 restates the question after the results; ``repeat_question=False`` is the setting that leaves
    it out, and both must hold (a builder that always restated it made the setting do nothing)."""
    from mmsr.tools.base import ToolResult

    sample, result = fvqa_samples[0], ToolResult(text="page")
    restated = f"Original user's question: {sample.question.strip()}\n"
    repeated = PromptBuilder(repeat_question=True).observation_text(sample, kind, result)
    assert repeated.startswith("Searched results: <information>page</information>\n" + restated)
    assert "Original user's question" not in PromptBuilder(repeat_question=False).observation_text(sample, kind, result)


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "after.txt"
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("which", ["after_image_search", "after_text_search"])
@pytest.mark.parametrize("slot", ["<image>", "{question}", "{tools}"])
def test_an_after_search_template_with_a_round1_placeholder_is_refused(tmp_path, which, slot):
    name = write(tmp_path, f"Use the results above {slot} and answer.\n")
    what = which.replace("_", "-")
    with pytest.raises(ValueError, match=re.escape(f"{what} template '{name}' may not contain '{slot}'")):
        PromptBuilder(**{which: name})


def test_a_tools_instruction_with_a_marker_stops_the_loop_at_start_up(tiny_policy, tmp_path):
    """Before: the loop was built, then the first call's observation held one marker more than the result's
    images and the rollout raised 'text has 3 image markers but 2 images', naming no template."""

    class Lens(Tool):
        spec = replace(IMAGE_SEARCH, name="lens", tag="lens", instruction=write(tmp_path, "Results for <image>:\n"))

    engine = ScriptedEngine({}, tiny_policy.tokenizer)
    with pytest.raises(ValueError, match=r"tool 'lens': instruction template .*after\.txt' may not contain '<image>'"):
        RolloutLoop(engine, tiny_policy, PromptBuilder(), configured([Lens()]))
