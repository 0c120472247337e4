"""Survivors of a mutation audit of ``mmsr/prompt``: a sampled end of turn is no part of the turn's text, a failed
call's observation is its failure text alone, round-1 templates and template names are checked with errors that
say what is wrong, the chat template's system message is read as written (several lines, empty, or none)."""

import copy
import re
from dataclasses import replace

import pytest

from mmsr.models.tokenizer import QWEN2_5_VL_CHAT_TEMPLATE
from mmsr.prompt.chat_template import chat_format
from mmsr.prompt.encode import Encoder
from mmsr.prompt.render import ChatFormat, PromptBuilder, describe, template_path
from mmsr.reward.mmsearch_r1 import MMSearchR1Reward
from mmsr.rollout.actions import Answer
from mmsr.rollout.engine import GenerationOutput, SamplingParams, ScriptedEngine
from mmsr.rollout.loop import RolloutLoop
from mmsr.tools.base import failure
from mmsr.tools.spec import IMAGE_SEARCH
from tests.rollout.test_loop import ANS

QWEN_SYSTEM = "You are a helpful assistant."
PACKAGE_HINT = "a template inside another package is written 'package:path'"


class EndsOnItsEos(ScriptedEngine):
    """Writes ``ANS`` and ends the turn by sampling its end of turn, as an engine does that stops on its eos id
    (a user's engine, or one whose stop strings are not in the loop's list)."""

    def _one(self, request, sampling):
        ids = self.tokenizer.encode(ANS, add_special_tokens=False) + [self.eos_id]
        return GenerationOutput(ids, [-1.0] * len(ids), "eos")


def test_a_turn_ended_by_the_end_of_turn_token_reads_without_it(tiny_policy, fvqa_samples):
    """The sampled ``<|im_end|>`` is one of the turn's ids, not its text: decoded with the specials, the turn's text
    ended in it, its answer pattern (``...</answer>$``) did not match, and a well-formed answer scored format 0."""
    end_of_turn = tiny_policy.tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = tiny_policy.tokenizer.encode(ANS, add_special_tokens=False) + [end_of_turn]
    assert tiny_policy.encoder().decode(ids) == ANS
    sample, engine = fvqa_samples[0], EndsOnItsEos({}, tiny_policy.tokenizer)
    loop = RolloutLoop(engine, tiny_policy, PromptBuilder(), {"image_search": None, "text_search": None})
    (traj,) = loop.run([sample], 1, SamplingParams())
    assert traj.input_ids[traj.turns[0].span[1] - 1] == end_of_turn  # sampled: part of the turn's ids
    assert traj.assistant_texts == [ANS] and isinstance(traj.turns[0].action, Answer)
    assert MMSearchR1Reward().details(traj, sample)["format"] == 1.0


@pytest.mark.parametrize("kind", ["image_search", "text_search", IMAGE_SEARCH])
def test_a_failed_calls_observation_is_its_failure_text_alone(fvqa_samples, kind):
    """A failed call shows the failure text alone, so the model answers on its own: no "Searched results:", no
    restated question, no instruction to use results that are not there."""
    result = failure("text_search", "backend down")
    observation = PromptBuilder().observation_text(fvqa_samples[0], kind, result)
    expected = ("<information>[Text Search Results] The search failed (backend down). Please answer with your own "
                "knowledge.</information>")  # fmt: skip
    assert observation == expected


@pytest.mark.parametrize("body", ["Question: {question}", "<image> <image> Question: {question}"], ids=["none", "two"])
def test_a_round1_template_without_exactly_one_image_is_refused_at_start_up(tmp_path, body):
    """The question image's vision tokens go where the template's one ``<image>`` is: without it the image is never
    shown (the rollout failed later, counting markers against images, naming no template); with two, one is extra."""
    path = tmp_path / "round1.txt"
    path.write_text(body + "\n", encoding="utf-8")
    said = f"round-1 template '{path}' needs one '{{question}}' and one '<image>'"
    with pytest.raises(ValueError, match=re.escape(said)):
        PromptBuilder(round1=str(path))


def test_a_question_is_stripped_in_the_prompt(fvqa_samples):
    """Questions from data files carry stray spaces and newlines: the prompt shows the question stripped, right after
    ``<image> `` as upstream writes it (and the observation's restated question is stripped the same way)."""
    sample = replace(fvqa_samples[0], question="  What tower is this?\n ")
    assert PromptBuilder().first_user_text(sample).endswith("question:\n<image> What tower is this?")


def test_a_template_of_a_package_that_does_not_exist_gets_the_helpful_message():
    """``package:path`` with a misspelt package: the error says the template was not found and how a template of
    another package is written, not a bare ModuleNotFoundError about a module the user never meant to import."""
    name = "mmsr_no_such_package:templates/round1.txt"
    with pytest.raises(FileNotFoundError, match=re.escape(f"prompt template {name!r} not found")) as info:
        template_path(name)
    assert PACKAGE_HINT in str(info.value)
    with pytest.raises(FileNotFoundError, match=re.escape(PACKAGE_HINT)):
        PromptBuilder(round1=name)


@pytest.mark.parametrize(("name", "why"), [
    ("mmsr.export:templates/x.txt", "'mmsr.export' is not a package"),
    (":x.txt", "nothing before the ':' names a package")])  # fmt: skip
def test_a_template_name_whose_module_is_no_package_is_refused_naming_it(name, why):
    """``module:path`` with a module that is no package raised a bare ``TypeError: 'mmsr.export' is not a package``,
    and ``:x.txt`` ``ValueError: Empty module name``, naming neither template nor tool (``describe`` names the tool
    only for a template not found): now both are a template not found, saying why."""
    said = f"prompt template {name!r} not found: {why}; {PACKAGE_HINT}"
    with pytest.raises(FileNotFoundError, match=re.escape(said)):
        template_path(name)
    spec = replace(IMAGE_SEARCH, description=name)
    with pytest.raises(ValueError, match=re.escape(f"tool 'image_search': description template not found: {said}")):
        describe(spec)
    with pytest.raises(FileNotFoundError, match=re.escape(said)):
        PromptBuilder(after_text_search=name)


def test_a_tokenizer_without_a_chat_template_gets_qwen2_5_vls_system_message(tiny_policy, monkeypatch):
    """No template to read: the pieces are Qwen2.5-VL's, whose template opens every conversation with its default
    system message (a policy trained on that template would otherwise see prompts it never saw)."""
    monkeypatch.setattr(tiny_policy.tokenizer, "chat_template", None)
    chat = chat_format(tiny_policy.tokenizer)
    assert chat.system == QWEN_SYSTEM
    assert chat.first_prompt("Q") == f"<|im_start|>system\n{QWEN_SYSTEM}<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n" \
                                     "<|im_start|>assistant\n"  # fmt: skip


@pytest.mark.parametrize("system", ["You are a helpful assistant.\nAnswer briefly.\n\nCite sources.", ""],
                         ids=["several-lines", "empty"])  # fmt: skip
def test_a_chat_templates_system_message_is_read_as_written(tiny_policy, monkeypatch, system):
    """A default system message of several lines (a fine-tune's instructions) is one message, not a template refused
    as not ChatML; an empty one is still a system turn the template writes, so the pieces write it too."""
    assert QWEN2_5_VL_CHAT_TEMPLATE.count(QWEN_SYSTEM) == 1
    monkeypatch.setattr(tiny_policy.tokenizer, "chat_template", QWEN2_5_VL_CHAT_TEMPLATE.replace(QWEN_SYSTEM, system))
    chat = chat_format(tiny_policy.tokenizer)
    assert chat == ChatFormat(system=system)
    assert chat.first_prompt("Q").startswith(f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\nQ")


def test_an_empty_system_message_is_written():
    """``system=""`` is an empty system turn, not none: ``None`` alone leaves the turn out (Qwen3-VL)."""
    empty = ChatFormat(system="").first_prompt("Q")
    assert empty == "<|im_start|>system\n<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"
    assert ChatFormat(system=None).first_prompt("Q") == "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"


def test_the_encoder_refuses_a_token_its_tokenizer_reads_as_unknown(tiny_policy):
    """A tokenizer with an unknown token maps a token it lacks to that one, not to None: a vision token it lacks
    would give every image's pads the unknown id, and the model would see no image."""
    tokenizer = copy.deepcopy(tiny_policy.tokenizer)
    tokenizer.unk_token = "<|endoftext|>"
    assert tokenizer.convert_tokens_to_ids(["<|no_such_pad|>"]) == [tokenizer.unk_token_id]
    with pytest.raises(ValueError, match=re.escape("tokenizer has no token '<|no_such_pad|>'")):
        Encoder(tokenizer, image_token="<|no_such_pad|>")
    assert Encoder(tokenizer).image_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")  # known tokens still pass
