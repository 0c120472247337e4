"""The round-1 prompt describes the configured tools: each tool's ``description`` template fills the
template's ``{tools}`` line unless the template writes the tool's call itself. MMSearch-R1's prompts
(the pair configured, the demo's) stay byte-for-byte what they were before tools could describe themselves,
but for the pair's space between the image and the question (upstream's ``<image> {question}``, spec section 5)."""

import hashlib
from dataclasses import replace
from pathlib import Path

import pytest

from mmsr.cli import lightning_cli
from mmsr.data.sample import Sample
from mmsr.prompt.render import TEMPLATES, PromptBuilder, list_actions, template_path
from mmsr.rollout.engine import SamplingParams, ScriptedEngine
from mmsr.rollout.loop import RolloutLoop
from mmsr.tools.base import IMAGE_MARKER, ToolResult
from mmsr.tools.crop import Crop, CropSearch
from mmsr.tools.spec import IMAGE_SEARCH, MMSEARCH_R1_TOOLS, TEXT_SEARCH, ImageSearchTool, TextSearchTool, Tool, configured
from tests.rollout.test_loop import ANS, FakeImageSearch, FakeTextSearch

ROOT = Path(__file__).resolve().parents[2]
# sha256 of the 20 FVQA dev rows' round-1 user texts joined by NUL, as rendered before this change
# (commit b2e332e): what every existing run, recorded transcript and demo checkpoint was made with.
PAIR = "fbefb34b28e6f3c4b69b2c0adca357064926c23b2fb3e7c6066740f19236c777"
DEMO = "0e48a21e5d0bb98abb92f0a025b966cd91fafafa2d54a7298b224ef3faf5e90f"


def loop(policy, tools, prompts=None, script=None):
    engine = ScriptedEngine(script or {}, policy.tokenizer)
    return RolloutLoop(engine, policy, prompts or PromptBuilder(), tools)


def digest(builder: PromptBuilder, samples, unspaced: bool = False) -> str:
    """``unspaced``: with the space after the image taken out again, as the pair's prompt was rendered."""
    texts = (builder.first_user_text(s) for s in samples)
    texts = (t.replace(f"{IMAGE_MARKER} ", IMAGE_MARKER, 1) for t in texts) if unspaced else texts
    return hashlib.sha256("\x00".join(texts).encode()).hexdigest()


def description(name: str) -> str:
    return template_path(name).read_text(encoding="utf-8").strip()


@pytest.mark.parametrize("form", ["backends", "tools"])
def test_the_pairs_round1_prompt_is_unchanged(tiny_policy, fvqa_samples, form):
    backends = {"image_search": FakeImageSearch(), "text_search": FakeTextSearch()}
    tools = backends if form == "backends" else configured([ImageSearchTool(backends["image_search"]),
                                                            TextSearchTool(backends["text_search"])])  # fmt: skip
    pair = loop(tiny_policy, tools).prompts
    assert all(f"{IMAGE_MARKER} {s.question.strip()}" in pair.first_user_text(s) for s in fvqa_samples)
    assert digest(pair, fvqa_samples, unspaced=True) == PAIR
    demo = PromptBuilder(round1="mmsr.demo:templates/round1.txt")
    assert digest(loop(tiny_policy, tools, demo).prompts, fvqa_samples) == DEMO


def test_the_default_template_is_round1_with_the_pair_bound():
    """round1.txt stays as it was (the tiny tokenizers train on it); the default, bound to the pair (as an
    unbound builder is), differs only by upstream's space between the image and the question."""
    template = (TEMPLATES / "round1_tools.txt").read_text(encoding="utf-8")
    assert template.count("{tools}\n") == 1 and template.count("<image> {question}") == 1 and "<search>" not in template
    round1 = (TEMPLATES / "round1.txt").read_text(encoding="utf-8").rstrip("\n")
    for builder in (PromptBuilder(), PromptBuilder().for_tools(MMSEARCH_R1_TOOLS)):
        assert builder.round1.replace("<image> {question}", "<image>{question}") == round1


def test_configured_crop_tools_are_described_in_the_prompt_text_and_tokens(tiny_policy, fvqa_samples):
    sample = fvqa_samples[0]
    tools = configured([Crop(), CropSearch(FakeImageSearch()), ImageSearchTool(FakeImageSearch())])
    rollout = loop(tiny_policy, tools, script={f"{sample.id}#0": [ANS]})
    (traj,) = rollout.run([sample], 1, SamplingParams())
    prompt = tiny_policy.tokenizer.decode(traj.input_ids[: traj.prompt_len])
    crop, crop_search = description("describe_crop.txt"), description("describe_crop_search.txt")
    assert crop in prompt and crop_search in prompt and "{tools}" not in prompt
    # In the tools line: MMSearch-R1's configured search first (round1.txt's own line), then the others in the
    # tools' order, before the rules; text search is not configured, so neither described nor offered.
    image = description("describe_image_search.txt")
    assert prompt.index(image) < prompt.index(crop) < prompt.index(crop_search) < prompt.index("Rules:")
    assert "<text_search>" not in prompt and prompt.count("<search><img></search> to run") == 1
    assert "exactly one action: an answer, <search><img></search>, <crop>[x1, y1, x2, y2]</crop>, or " \
           "<crop_search>[x1, y1, x2, y2]</crop_search>." in prompt  # fmt: skip
    # The prompt's tokens are the tokenization of that text (encoded once, not re-tokenized).
    text = tiny_policy.chat.first_prompt(rollout.prompts.first_user_text(sample))
    assert traj.input_ids[: traj.prompt_len] == rollout.encoder.encode(text, [traj.vision[0].num_tokens])


def test_prompts_offer_only_the_configured_tools():
    """Crop with text search alone: round 1 and the after-crop instruction told the policy to end with
    <search><img></search>, which then parsed as no action and ended the episode (no_action)."""
    sample = Sample("a", "Who?", None, "x")
    crop = ToolResult("[Crop Results] region [0, 0, 10, 10]: ")
    two = PromptBuilder().for_tools((Crop.spec, TEXT_SEARCH))
    for text in (two.round1, two.observation_text(sample, Crop.spec, crop)):
        assert "<search>" not in text and "<text_search>" in text and "<crop>[x1, y1, x2, y2]</crop>" in text
    assert two.observation_text(sample, Crop.spec, crop).endswith(
        "an answer inside <answer> </answer>, <text_search>query</text_search>, or <crop>[x1, y1, x2, y2]</crop>.")
    three = PromptBuilder().for_tools((Crop.spec, IMAGE_SEARCH, TEXT_SEARCH))
    assert three.instruction(Crop.spec).endswith(", <search><img></search>, <text_search>query</text_search>, or "
                                                 "<crop>[x1, y1, x2, y2]</crop>.")  # fmt: skip
    assert "<search><img></search> to run" in three.round1 and "<text_search>your query" in three.round1
    # One tool, or none: the list still reads.
    assert list_actions((TEXT_SEARCH,)) == " or <text_search>query</text_search>" and list_actions(()) == ""


def test_a_template_that_writes_the_call_describes_the_tool_itself(tmp_path):
    (tmp_path / "r1.txt").write_text("Zoom with <crop>[x1, y1, x2, y2]</crop>.\n{tools}\n<image>{question}\n")
    bound = PromptBuilder(round1=str(tmp_path / "r1.txt")).for_tools((Crop.spec, CropSearch.spec))
    assert bound.round1.split("\n") == ["Zoom with <crop>[x1, y1, x2, y2]</crop>.", description("describe_crop_search.txt"),
                                         "<image>{question}"]  # fmt: skip

def test_no_prompt_offers_or_counts_a_search_that_is_not_configured():
    """Crop with text search: round 1 said "You may use two search tools"; CropSearch without text search: its
    instruction (after_image_search.txt) ended "end with <text_search>your query</text_search>"; round1_crop.txt
    offered both searches whatever was configured, and its crop box "in pixels" for relative_1000 boxes too."""
    sample, found = Sample("a", "Who?", None, "x"), ToolResult("[Image Search Results] ...")
    crop_text = PromptBuilder().for_tools((Crop.spec, TEXT_SEARCH))
    texts = [crop_text.round1, crop_text.instruction(Crop.spec)]
    both = PromptBuilder().for_tools((Crop.spec, CropSearch.spec, TEXT_SEARCH))
    texts += [both.round1, both.observation_text(sample, CropSearch.spec, found)]
    assert all("<search>" not in t and "search tool" not in t for t in texts)
    assert "You may use two tools," in texts[0] and "You may use three tools," in texts[2]
    alone = PromptBuilder().for_tools((CropSearch.spec,))
    for text in (alone.round1, alone.instruction(CropSearch.spec)):
        assert "<text_search>" not in text and "<search>" not in text and text.endswith(
            "an answer inside <answer> </answer> or <crop_search>[x1, y1, x2, y2]</crop_search>.") == (text != alone.round1)
    # round1_crop.txt describes the configured tools, in the crop's own units.
    zoom = PromptBuilder(round1="round1_crop.txt").for_tools((Crop(box_units="relative_1000").spec,)).round1
    assert description("describe_crop_relative.txt") in zoom and "pixels" not in zoom and "search" not in zoom
    assert "You may use one tool," in zoom and "one action: an answer or <crop>[x1, y1, x2, y2]</crop>." in zoom


def test_a_template_of_only_a_tools_line_gets_the_pairs_own_lines(tmp_path):
    """The pair's descriptions are round1.txt's own bullets: a new template can list them by the line alone."""
    (tmp_path / "r1.txt").write_text("Tools:\n{tools}\n<image>{question}\n")
    bound = PromptBuilder(round1=str(tmp_path / "r1.txt")).for_tools(MMSEARCH_R1_TOOLS)
    lines = (TEMPLATES / "round1.txt").read_text(encoding="utf-8").splitlines()[4:6]
    assert bound.round1 == "\n".join(["Tools:", *lines, "<image>{question}"])


class Undescribed(Tool):
    spec = replace(IMAGE_SEARCH, name="lens", tag="lens", description=None)


class MissingDescription(Tool):
    spec = replace(IMAGE_SEARCH, name="lens", tag="lens", description="no_such_description.txt")


def test_a_missing_description_is_an_error_naming_the_tool(tiny_policy):
    with pytest.raises(ValueError, match=r"tool 'lens': description template not found.*no_such_description\.txt"):
        loop(tiny_policy, configured([MissingDescription()]))
    with pytest.raises(ValueError, match=r"tool 'lens' has no round-1 description.*<lens>"):
        loop(tiny_policy, configured([Undescribed()]))
    # A template without a tools line is used as written: the demo's, the direct-answer workflow's.
    loop(tiny_policy, configured([Undescribed()]), PromptBuilder(round1="direct_answer.txt"))


def test_the_tools_line_is_a_line_of_its_own_at_most_once(tmp_path):
    for bad in ("Tools: {tools}\n<image>{question}", "{tools}\n{tools}\n<image>{question}"):
        (tmp_path / "bad.txt").write_text(bad)
        with pytest.raises(ValueError, match="must be a line of its own, at most once"):
            PromptBuilder(round1=str(tmp_path / "bad.txt"))


def test_the_crop_search_example_describes_its_tools(monkeypatch):
    monkeypatch.chdir(ROOT)
    cli = lightning_cli(["-c", "configs/examples/crop_search.yaml"], run=False)
    round1 = cli.model.loop.prompts.round1
    assert [s.name for s in cli.model.loop.specs] == ["crop", "crop_search", "image_search", "text_search"]
    assert description("describe_crop.txt") in round1 and description("describe_crop_search.txt") in round1
