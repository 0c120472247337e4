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


def teacher_turns(policy, teacher, samples: list[Sample], monkeypatch) -> list[str]:
    """The teacher's first turn of each sample as one SFT step trains it, checked to hold no special token among
    its targets."""
    module = SFTModule(Built(copy.deepcopy(policy)), teacher)
    seen, episodes = [], module._episodes
    monkeypatch.setattr(module, "_episodes", lambda samples, turns: seen.extend(run := episodes(samples, turns)) or run)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)  # fmt: skip
    trainer.fit(module, DataLoader(samples, batch_size=len(samples), collate_fn=list))
    special = set(module.policy.tokenizer.convert_tokens_to_ids(list(SPECIALS)))
    assert len(seen) == len(samples)
    for t in seen:
        targets = [i for i, m in zip(t.input_ids, t.loss_mask) if m]
        assert not special & set(targets), module.policy.tokenizer.decode(targets)
    return [t.turns[0].text for t in seen]


def test_data_set_text_in_teacher_turns_trains_as_text_not_as_special_tokens(tiny_policy, monkeypatch):
    """A question or answer spelling ``<|im_end|>`` or ``<|image_pad|>`` was tokenized into the teacher's
    targets as that special token (an end of turn, an image slot); it is text there, as in the prompt."""
    image = Image.new("RGB", (56, 56), "red")
    samples = [Sample("a", "Is it <|im_end|> red?", image, "red <|im_end|> x"), Sample("b", "What?", image, "<|image_pad|>")]
    assert teacher_turns(tiny_policy, EchoTeacher(), samples, monkeypatch) == [
        "<reason>Is it < |im_end|> red?</reason><answer> red < |im_end|> x</answer>",
        "<reason>What?</reason><answer> < |image_pad|></answer>"]  # fmt: skip


class EntityTeacher:
    """Reasons with ``extra['entity']`` (the data set's ``extra_info.entity``, as ``demo.teacher`` reads it)."""

    def turns(self, sample: Sample) -> list[str]:
        return [f"<reason>{sample.extra['entity']}</reason><answer> {sample.ground_truth}</answer>"]


def test_data_set_extra_info_in_teacher_turns_trains_as_text_not_as_special_tokens(tiny_policy, monkeypatch):
    """``extra_info`` values reach the teacher as the question does (``Encoder.plain``): an entity spelling
    ``<|im_end|>`` or ``<|image_pad|>`` is text among the targets, not an end of turn or an image slot."""
    image = Image.new("RGB", (56, 56), "red")
    samples = [Sample("a", "Who?", image, "x", extra={"entity": "Ka <|im_end|> Zu", "index": 0}),
               Sample("b", "What?", image, "y", extra={"entity": "<|image_pad|>"})]  # fmt: skip
    assert teacher_turns(tiny_policy, EntityTeacher(), samples, monkeypatch) == [
        "<reason>Ka < |im_end|> Zu</reason><answer> x</answer>", "<reason>< |image_pad|></reason><answer> y</answer>"]


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


class SearchesFor:
    """Calls ``call`` (a text search), then answers, for row ``a``; answers at once for the others."""

    def __init__(self, call: str = "<text_search> the old tower</text_search>") -> None:
        self.call = call

    def turns(self, sample: Sample) -> list[str]:
        answer = f"<reason>It is known.</reason><answer> {sample.ground_truth}</answer>"
        return [f"<reason>I search.</reason>{self.call}", answer] if sample.id == "a" else [answer]


class FillingResults:
    """A text search whose results (~4,000 tokens) fit no context of the tests."""

    async def __call__(self, request):
        from mmsr.tools.base import ToolResult

        return ToolResult("[Text Search Results]\n1. " + "the old stone tower " * 1000)


def crop_args() -> dict:
    """A teacher that crops and a crop tool allowed none (there is no ``rollout.crop_limit`` to name)."""
    from mmsr.tools.crop import Crop

    return {"tools": [Crop(limit=0)], "teacher": SearchesFor("<crop>[0, 0, 28, 28]</crop>")}


@pytest.mark.parametrize(("settings", "args", "why"), [
    ({"max_rounds": 1}, {}, r"rollout.max_rounds=1, raise it"),
    # set, the pair's setting overrides (and refuses) an entry's limit: the entry is not named
    ({"text_search_limit": 0}, {}, r"turn 1 called text_search over its limit of 0 an episode, raise it: "
                                   r"rollout.text_search_limit or rollout.tool_limits: \{text_search: N\}\)"),
    ({}, crop_args(), r"turn 1 called crop over its limit of 0 an episode, raise it: limit: in its tools entry or "
                      r"rollout.tool_limits: \{crop: N\}\)"),
    ({"max_context_tokens": 1024}, {"text_search": FillingResults()},
     r"the observation of turn 1's text_search call did not fit in rollout.max_context_tokens=1024")])  # fmt: skip
def test_teacher_turns_the_episode_never_reaches_are_counted_and_warned(tiny_policy, settings, args, why):
    """An episode that ends before the teacher's last turn (a rollout limit, an observation dropped at the context
    limit) trains none of the turns after it: it was left out without a word, only turns cut at
    ``max_tokens_per_turn`` were counted; now ``sft/unfinished_episodes`` counts it and the run warns, naming the row
    and the setting (for a tool over its limit, only settings that exist for that tool: a crop has no
    ``rollout.crop_limit``)."""
    from mmsr.rollout.loop import RolloutSettings

    args = {"teacher": SearchesFor(), **args}
    module = SFTModule(Built(copy.deepcopy(tiny_policy)), args.pop("teacher"), **args,
                       rollout=RolloutSettings(**settings))  # fmt: skip
    image = Image.new("RGB", (56, 56))
    samples = [Sample("a", "Where is the tower?", image, "x"), Sample("b", "What?", image, "y")]
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)  # fmt: skip
    with pytest.warns(UserWarning, match=r"row 'a': the teacher wrote 2 turns, its episode ended after 1 \(" + why):
        trainer.fit(module, DataLoader(samples, batch_size=2, collate_fn=list))
    assert trainer.callback_metrics["sft/unfinished_episodes"].item() == 0.5
    assert trainer.callback_metrics["sft/truncated_episodes"].item() == 0.0


def test_a_teacher_turn_cut_at_the_context_limit_is_warned_naming_that_limit(tiny_policy):
    """A teacher turn cut because the context had less room left than ``max_tokens_per_turn`` was warned as cut at
    ``rollout.max_tokens_per_turn``, the setting that did not cut it; the warning names ``max_context_tokens``."""
    from mmsr.rollout.loop import RolloutSettings

    long_turn = Sample("long", "Which building is in the picture, and when was it finished? " * 4, Image.new("RGB", (56, 56)), "x")
    prompt = SFTModule(Built(copy.deepcopy(tiny_policy)), EchoTeacher())._episodes([long_turn], {"long": ["x"]})[0].prompt_len
    settings = RolloutSettings(max_tokens_per_turn=256, max_context_tokens=prompt + 24)
    module = SFTModule(Built(copy.deepcopy(tiny_policy)), EchoTeacher(), rollout=settings)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)  # fmt: skip
    samples = [long_turn, Sample("short", "What?", Image.new("RGB", (56, 56)), "y")]
    cut = rf"row 'long' \(24 tokens kept\) was cut at rollout.max_context_tokens={prompt + 24}:"
    with pytest.warns(UserWarning, match=cut):
        trainer.fit(module, DataLoader(samples, batch_size=2, collate_fn=list))
    assert trainer.callback_metrics["sft/truncated_episodes"].item() == 0.5
    assert trainer.callback_metrics["sft/unfinished_episodes"].item() == 0.5


@pytest.mark.parametrize(("returned", "error", "said"), [
    ("<answer> x</answer>", TypeError, "returned a str"), ([], ValueError, "returned an empty list"),
    (["<answer> x</answer>", None], TypeError, "returned a list holding a NoneType")])  # fmt: skip
def test_a_teacher_returning_anything_but_a_list_of_turns_is_refused_naming_the_row(tiny_policy, returned, error, said):
    """A str was trained one character a turn (``_script`` indexed it); an empty list failed the step with a bare
    IndexError. Both are refused, naming the teacher and the row."""

    class Returns:
        def turns(self, sample: Sample) -> list[str]:
            return returned

    module = SFTModule(Built(copy.deepcopy(tiny_policy)), Returns())
    with pytest.raises(error, match=re.escape(f"Returns.turns {said} for row 'a'")):
        module._written(module.teacher, Sample("a", "What?", Image.new("RGB", (56, 56)), "x"))


@pytest.mark.parametrize(("precision", "autocast"), [("bf16-mixed", True), ("32-true", False)])
def test_validation_forwards_run_in_the_training_precision(tiny_policy, precision, autocast):
    """``val/sft_loss`` is computed in ``on_validation_epoch_end``, outside the autocast Lightning's mixed precision
    puts around steps: under bf16-mixed it ran in fp32. The policy now autocasts every forward to the compute dtype
    (as ``GRPOModule``'s); an fp32 run (the CPU demo's) still runs none."""
    import torch

    module = SFTModule(Built(copy.deepcopy(tiny_policy)), EchoTeacher(), lr=1e-9)
    seen = []
    module.model.register_forward_hook(lambda *_: seen.append((torch.is_grad_enabled(), torch.is_autocast_enabled("cpu"))))
    samples = [Sample("a", "What?", Image.new("RGB", (56, 56)), "x"), Sample("b", "Which?", Image.new("RGB", (56, 56)), "y")]
    trainer = L.Trainer(accelerator="cpu", precision=precision, max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1)  # fmt: skip
    loader = DataLoader(samples, batch_size=2, collate_fn=list)
    trainer.fit(module, loader, loader)
    validation = [on for grad, on in seen if not grad]
    assert validation and set(validation) == {autocast}
    assert "val/sft_loss" in trainer.callback_metrics


def test_reading_steps_keep_to_micro_batch_tokens(tiny_policy, monkeypatch):
    """A reading step ran all its texts in one forward whatever ``micro_batch_tokens`` said; over the budget it now
    runs micro-batches within it, with the same loss and gradient (the NLL summed over them, divided by every
    text's tokens); a step that fits still runs in one pass, as before."""
    import torch

    class Pages:
        def batch(self, step: int) -> list[str]:
            return [f"title: Ka Zu {i}\n" + "This is the old stone tower by the river. " * (2 + i) for i in range(6)]

    runs = {}
    for budget in (8192, 64):
        module = SFTModule(Built(copy.deepcopy(tiny_policy)), EchoTeacher(), micro_batch_tokens=budget, reading=Pages(),
                           reading_steps=1)  # fmt: skip
        shapes, forward, grads, step = [], module.policy.forward, {}, module._step
        monkeypatch.setattr(module.policy, "forward", lambda ids, *a, **k: shapes.append(tuple(ids.shape)) or forward(ids, *a, **k))
        # the gradient before the optimizer step (AdamW's first step is about lr x its sign: float noise flips tiny ones)
        monkeypatch.setattr(module, "_step", lambda opt, **k: grads.update(
            {n: p.grad.clone() for n, p in module.model.named_parameters() if p.grad is not None}) or step(opt, **k))
        trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False)  # fmt: skip
        trainer.fit(module, DataLoader([Sample("a", "What?", None, "x")], batch_size=1, collate_fn=list))
        runs[budget] = (shapes, trainer.callback_metrics["reading/loss"].item(), grads)
    (whole, loss, grads), (split, split_loss, split_grads) = runs[8192], runs[64]
    assert len(whole) == 1 and whole[0][0] == 6
    assert len(split) > 1 and all(n == 1 or n * t <= 64 for n, t in split) and sum(n for n, _ in split) == 6
    assert split_loss == pytest.approx(loss, rel=1e-5)
    assert grads.keys() == split_grads.keys() and grads
    for k in grads:
        torch.testing.assert_close(split_grads[k], grads[k], atol=1e-6, rtol=1e-4, msg=k)


def test_a_teacher_returning_a_tuple_of_turns_is_taken_as_its_list(tiny_policy):
    """A tuple of str trained as a list does (``_script`` indexes it): it is no mistake to refuse."""

    class Returns:
        def turns(self, sample: Sample) -> tuple[str, ...]:
            return ("<reason>r</reason><answer>x</answer>",)

    module = SFTModule(Built(copy.deepcopy(tiny_policy)), Returns())
    assert module._written(module.teacher, Sample("a", "What?", Image.new("RGB", (56, 56)), "x")) == [
        "<reason>r</reason><answer>x</answer>"]


class Adjusting(SFTModule):
    """A warm start that reads for 3 steps whatever it is given, at ten times the lr it is given."""

    def __init__(self, policy, teacher, lr: float = 1e-3, **kwargs):
        super().__init__(policy, teacher, lr=lr * 10, reading_steps=3, **kwargs)


def test_a_subclass_warm_starts_with_what_it_passes_on_not_its_own_arguments(tiny_policy):
    module = Adjusting(Built(copy.deepcopy(tiny_policy)), EchoTeacher(), lr=1e-3, reading=object())
    [optimizer], _ = module.configure_optimizers()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-2)
    assert module.init_args.reading_steps == 3


def test_an_overridden_tool_entry_limit_is_refused_before_the_warm_start_s_policy_is_built():
    from mmsr.rollout.loop import RolloutSettings
    from mmsr.tools.spec import ImageSearchTool

    with pytest.raises(ValueError, match=r"the image_search entry of tools sets limit: 3, and rollout.image_search_limit: 1"):
        SFTModule(Unbuildable(), teacher=object(), tools=[ImageSearchTool(limit=3)],
                  rollout=RolloutSettings(image_search_limit=1))  # fmt: skip
