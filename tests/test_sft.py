"""SFTModule: optimization settings that would stall or reverse the warm start are refused before the policy is
built, naming the field (before, grad_clip=-1 flipped every gradient and the NLL climbed; 0 zeroed them); text
from the data set (questions, answers, reading pages) trains as text, never as a special token it spells."""

import copy
import re

import lightning as L
import pytest
from PIL import Image
from torch.utils.data import DataLoader

from mmsr.data.sample import Sample
from mmsr.sft import SFTModule


class Unbuildable:
    def build(self):
        raise AssertionError("the policy was built before the settings were checked")


@pytest.mark.parametrize(("setting", "named"), [
    ({"grad_clip": -1.0}, "grad_clip=-1.0 (must be > 0"), ({"grad_clip": 0.0}, "grad_clip=0.0 (must be > 0"),
    ({"grad_clip": float("nan")}, "grad_clip=nan"), ({"lr": 0.0}, "lr=0.0 (must be > 0"),
    ({"weight_decay": -0.1}, "weight_decay=-0.1"), ({"warmup_steps": -1}, "warmup_steps=-1"),
    ({"total_steps": 0}, "total_steps=0"), ({"micro_batch_tokens": 0}, "micro_batch_tokens=0"),
    ({"reading_steps": -1}, "reading_steps=-1"),
    ({"param_dtype": "float16"}, "param_dtype='float16' (must be one of 'float32', 'bfloat16')")])  # fmt: skip
def test_settings_out_of_range_are_refused_before_the_policy_is_built(setting, named):
    with pytest.raises(ValueError, match=re.escape(f"SFTModule: {named}")):
        SFTModule(Unbuildable(), teacher=object(), **setting)


SPECIALS = ("<|im_end|>", "<|image_pad|>")


class Built:
    """A policy builder that hands over an already built policy."""

    def __init__(self, policy) -> None:
        self.policy = policy

    def build(self):
        return self.policy


class EchoTeacher:
    """Answers at once with the ground truth, reasoning with the question (text from the data set, as
    ``RAGTeacher`` writes it)."""

    def turns(self, sample: Sample) -> list[str]:
        return [f"<reason>{sample.question}</reason><answer> {sample.ground_truth}</answer>"]


def test_data_set_text_in_teacher_turns_trains_as_text_not_as_special_tokens(tiny_policy, monkeypatch):
    """A question or answer spelling ``<|im_end|>`` or ``<|image_pad|>`` was tokenized into the teacher's
    targets as that special token (an end of turn, an image slot); it is text there, as in the prompt."""
    module = SFTModule(Built(copy.deepcopy(tiny_policy)), EchoTeacher())
    seen, episodes = [], module._episodes
    monkeypatch.setattr(module, "_episodes", lambda samples, turns: seen.extend(run := episodes(samples, turns)) or run)
    image = Image.new("RGB", (56, 56), "red")
    samples = [Sample("a", "Is it <|im_end|> red?", image, "red <|im_end|> x"), Sample("b", "What?", image, "<|image_pad|>")]
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)  # fmt: skip
    trainer.fit(module, DataLoader(samples, batch_size=2, collate_fn=list))
    special = set(module.policy.tokenizer.convert_tokens_to_ids(list(SPECIALS)))
    assert len(seen) == 2
    for t in seen:
        targets = [i for i, m in zip(t.input_ids, t.loss_mask) if m]
        assert not special & set(targets), module.policy.tokenizer.decode(targets)
    assert [t.turns[0].text for t in seen] == ["<reason>Is it < |im_end|> red?</reason><answer> red < |im_end|> x</answer>",
                                              "<reason>What?</reason><answer> < |image_pad|></answer>"]  # fmt: skip


def test_reading_pages_train_special_token_strings_as_text(tiny_policy, monkeypatch):
    """A page quoting ``<|im_end|>`` or ``<|image_pad|>`` put those special tokens into the reading targets."""
    from mmsr.sft import lm_nll

    seen = []
    forward = tiny_policy.forward
    monkeypatch.setattr(tiny_policy, "forward", lambda ids, *a: seen.append(ids) or forward(ids, *a))
    lm_nll(tiny_policy, ["title: Tags\nA chat turn ends with <|im_end|> and an image is <|image_pad|>.\n"], "cpu")
    special = set(tiny_policy.tokenizer.convert_tokens_to_ids(list(SPECIALS)))
    assert not special & set(seen[0].flatten().tolist())


def test_a_teacher_turn_cut_at_the_turn_budget_is_counted_and_warned(tiny_policy):
    """A teacher turn longer than ``max_tokens_per_turn`` is cut and ends its episode: it trained half a turn and
    none of the rest, silently; now ``sft/truncated_episodes`` counts such episodes and the run warns once."""
    from mmsr.rollout.loop import RolloutSettings

    long_turn = Sample("long", "Which building is in the picture, and when was it finished? " * 4, Image.new("RGB", (56, 56)), "x")
    samples = [long_turn, Sample("short", "What?", Image.new("RGB", (56, 56)), "y")]
    module = SFTModule(Built(copy.deepcopy(tiny_policy)), EchoTeacher(), rollout=RolloutSettings(max_tokens_per_turn=24))
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)  # fmt: skip
    with pytest.warns(UserWarning, match=r"row 'long' \(24 tokens kept\) was cut at rollout.max_tokens_per_turn=24"):
        trainer.fit(module, DataLoader(samples, batch_size=2, collate_fn=list))
    assert trainer.callback_metrics["sft/truncated_episodes"].item() == 0.5
