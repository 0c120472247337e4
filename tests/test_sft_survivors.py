"""SFTModule: behaviours a mutation audit of ``mmsr.sft`` found untested (each test names what it guards). A
warm start that accumulated gradients, trained prompt tokens, misreported its reading loss or ignored its
limits would still run, and only a worse policy would show it."""

import copy
import re
import warnings

import lightning as L
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from mmsr.data.sample import Sample
from mmsr.rollout.loop import RolloutSettings
from mmsr.sft import SFTModule, lm_nll
from mmsr.sft.lm import reading_passes
from mmsr.train.batch import collate
from tests.test_sft import Built, EchoTeacher, Unbuildable
from tests.train.test_sft_loss import ANSWERS, Answers, full_logit_logprobs

IMAGE = Image.new("RGB", (56, 56), "red")


def trainer(max_steps: int = 1, **kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, **kwargs)  # fmt: skip


def loader(samples: list[Sample], batch_size: int | None = None) -> DataLoader:
    return DataLoader(samples, batch_size=batch_size or len(samples), collate_fn=list)


class Pages:
    """Two pages of unequal length a reading step."""

    def batch(self, step: int) -> list[str]:
        return ["title: Ka Zu\nThis is Ka Zu, the old stone tower by the river.\n", "title: Zu\nZu.\n"]


def test_imitation_steps_without_validation_start_from_no_gradient(tiny_policy, monkeypatch):
    """Each imitation step's update is its own batch's gradient: without ``zero_grad`` the second step would also
    carry the first's (Lightning zeroes gradients only before a validation, so a run validating every step hid it)."""
    module = SFTModule(Built(copy.deepcopy(tiny_policy)), EchoTeacher())
    held, imitate = [], module._imitate

    def imitate_checked(trajs):
        held.append([n for n, p in module.model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0])
        return imitate(trajs)

    monkeypatch.setattr(module, "_imitate", imitate_checked)
    samples = [Sample("a", "What?", IMAGE, "x"), Sample("b", "Which tower?", IMAGE, "the old one")]
    fit = trainer(max_steps=2)
    fit.fit(module, loader(samples, batch_size=1))
    assert fit.global_step == 2 and held == [[], []]


def test_whole_rows_imitation_loss_is_the_nll_of_the_teacher_tokens_only(tiny_policy, fvqa_samples):
    """With ``share_prefix=False`` (whole rows, flash-attention-2 GPUs) the LM head runs at every position where
    some row's next token is the teacher's: the other rows' prompt and pad tokens there must stay out of the loss."""
    module = SFTModule(Built(copy.deepcopy(tiny_policy)), Answers(), share_prefix=False)
    samples = [Sample(s.id, s.question, s.image, truth, category="search_free")
               for s, truth in zip(fvqa_samples, ANSWERS)]  # fmt: skip
    trajs = module._episodes(samples, {s.id: Answers().turns(s) for s in samples})
    batch = collate(trajs, range(len(trajs)), module.policy, "cpu")
    assert len({len(t) for t in trajs}) == 3
    with torch.no_grad():
        full = full_logit_logprobs(module.policy, batch)
    expected = float(-(full * batch.loss_mask).sum() / batch.loss_mask.sum())
    fit = trainer()
    fit.fit(module, loader(samples))
    assert fit.callback_metrics["sft/loss"].item() == pytest.approx(expected, rel=1e-5)
    assert fit.callback_metrics["sft/tokens"].item() == batch.loss_mask.sum()


def test_reading_loss_is_the_token_mean_nll_of_the_texts(tiny_policy):
    """``reading/loss`` is the NLL per predicted token: a text of n tokens has n - 1 targets (dividing by n made
    the logged loss, and the gradient, too low)."""
    with torch.no_grad():
        nll, count = lm_nll(tiny_policy, Pages().batch(0), "cpu")
    lengths = [len(tiny_policy.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in Pages().batch(0)]
    assert count == sum(lengths) - 2  # the count it is checked against: each text's first token is no target
    module = SFTModule(Built(copy.deepcopy(tiny_policy)), EchoTeacher(), reading=Pages(), reading_steps=1)
    fit = trainer()
    fit.fit(module, loader([Sample("a", "What?", None, "x")]))
    assert fit.callback_metrics["reading/loss"].item() == pytest.approx(float(nll / count), rel=1e-5)


def test_grad_clip_caps_the_gradient_the_optimizer_steps_with(tiny_policy, monkeypatch):
    """``grad_clip`` bounds the norm of the gradient AdamW receives; ``train/grad_norm`` logs the norm before it."""
    module = SFTModule(Built(copy.deepcopy(tiny_policy)), EchoTeacher(), grad_clip=1e-3)
    norms, step = [], module.nonfinite.step

    def step_recorded(opt, grad_norm, global_step):
        grads = [p.grad for p in module.model.parameters() if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        return step(opt, grad_norm, global_step)

    monkeypatch.setattr(module.nonfinite, "step", step_recorded)
    fit = trainer()
    fit.fit(module, loader([Sample("a", "What?", IMAGE, "x"), Sample("b", "Which?", IMAGE, "y")]))
    assert fit.callback_metrics["train/grad_norm"].item() > 1e-2  # well over the cap before clipping
    assert norms == [pytest.approx(1e-3, rel=1e-3)]


def test_reading_texts_over_the_budget_padded_run_in_several_passes():
    """One pass costs texts x longest (right padding), not the sum of their lengths: texts of 10 and 2 tokens
    (12 in all) padded to 20 do not fit a budget of 15, and run one a pass."""
    passes = reading_passes([10, 2], 15)
    assert sorted(map(sorted, passes)) == [[0], [1]]
    assert reading_passes([5, 5], 10) == [[0, 1]]  # a padded size that fits still runs in one pass


def test_validation_forwards_keep_to_micro_batch_tokens(tiny_policy, fvqa_samples, monkeypatch):
    """``val/sft_loss`` scores the held-out episodes in micro-batches within ``micro_batch_tokens``, as training
    does: one forward of every held-out episode could run out of memory on a large held-out set."""
    budget = 256  # fewer tokens than two held-out episodes
    module = SFTModule(Built(copy.deepcopy(tiny_policy)), Answers(), micro_batch_tokens=budget)
    passes, nll = [], module._teacher_nll

    def nll_recorded(trajs, micro):
        passes.append([len(trajs[i]) for i in micro])
        return nll(trajs, micro)

    monkeypatch.setattr(module, "_teacher_nll", nll_recorded)
    held_out = [Sample(s.id, s.question, s.image, "Zu", category="search_free") for s in fvqa_samples[:3]]
    fit = trainer()
    fit.validate(module, loader(held_out))
    assert sum(map(len, passes)) == 3 and len(passes) > 1
    assert all(len(p) == 1 or len(p) * max(p) <= budget for p in passes), passes
    assert "val/sft_loss" in fit.callback_metrics


def test_reading_steps_without_a_reading_corpus_are_refused():
    """``reading_steps > 0`` and no ``reading``: refused when the module is made (it failed the first step with
    an AttributeError), before the policy is built."""
    with pytest.raises(ValueError, match="reading_steps > 0 needs a reading corpus"):
        SFTModule(Unbuildable(), teacher=object(), reading_steps=2)


def test_a_policy_loaded_in_eval_mode_is_trained_in_train_mode(tiny_policy):
    """``from_pretrained`` returns a model in eval mode, where Hugging Face turns gradient checkpointing off
    (and dropout): the warm start puts it in train mode, Lightning no longer does."""
    policy = copy.deepcopy(tiny_policy)
    policy.model.eval()
    module = SFTModule(Built(policy), EchoTeacher())
    assert module.model.training and all(m.training for m in module.model.modules())


def test_a_sample_id_holding_a_hash_gets_its_own_teacher_turns(tiny_policy):
    """Request keys are ``sample_id#k``: a sample id with ``#`` in it must still find its turns (split at the
    first ``#`` it looked up another row, or none)."""
    module = SFTModule(Built(copy.deepcopy(tiny_policy)), EchoTeacher())
    turn = "<reason>r</reason><answer> x</answer>"
    (traj,) = module._episodes([Sample("q#1", "What?", IMAGE, "x")], {"q#1": [turn], "q": ["<answer> y</answer>"]})
    assert [t.text for t in traj.turns] == [turn]


class ShortResults:
    """A text search with one short result."""

    async def __call__(self, request):
        from mmsr.tools.base import ToolResult

        return ToolResult("[Text Search Results]\n1. the old stone tower")


class SearchesThenRambles:
    """Row ``a``: a text search, then an answer far over any small turn budget; the others answer at once."""

    def turns(self, sample: Sample) -> list[str]:
        answer = f"<reason>It is known.</reason><answer> {sample.ground_truth}</answer>"
        if sample.id != "a":
            return [answer]
        ramble = "The old stone tower stands by the river. " * 8
        return ["<reason>I search.</reason><text_search> the old tower</text_search>",
                f"<reason>{ramble}</reason><answer> {sample.ground_truth}</answer>"]


def test_a_multi_turn_episode_whose_last_turn_is_cut_counts_as_truncated(tiny_policy):
    """``sft/truncated_episodes`` counts an episode with any teacher turn cut at a token limit, not only one whose
    every turn was cut: a search, then an answer cut at ``max_tokens_per_turn``, is one of them."""
    module = SFTModule(Built(copy.deepcopy(tiny_policy)), SearchesThenRambles(), text_search=ShortResults(),
                       rollout=RolloutSettings(max_tokens_per_turn=32))  # fmt: skip
    fit = trainer()
    with pytest.warns(UserWarning, match=r"the teacher's turn 2 of 2 of row 'a' \(32 tokens kept\) was cut"):
        fit.fit(module, loader([Sample("a", "Where is the tower?", IMAGE, "x"), Sample("b", "What?", IMAGE, "y")]))
    assert fit.callback_metrics["rollout/turns"].item() == 1.5
    assert fit.callback_metrics["sft/truncated_episodes"].item() == 0.5


def test_a_prompt_that_fills_the_context_is_warned_not_a_crash(tiny_policy):
    """An episode whose prompt alone fills ``max_context_tokens`` has no turn: it is counted and warned of (the
    prompt did not fit), where reading its last turn raised an IndexError."""
    module = SFTModule(Built(copy.deepcopy(tiny_policy)), EchoTeacher(),
                       rollout=RolloutSettings(max_tokens_per_turn=32, max_context_tokens=160))  # fmt: skip
    samples = [Sample("long", "Which building is it? " * 60, IMAGE, "x"), Sample("short", "What?", IMAGE, "y")]
    fit = trainer()
    with pytest.warns(UserWarning, match=r"row 'long': the teacher wrote 1 turns, its episode ended after 0 \(the "
                                         r"prompt did not fit in rollout.max_context_tokens=160"):  # fmt: skip
        fit.fit(module, loader(samples))
    assert fit.global_step == 1 and fit.callback_metrics["sft/unfinished_episodes"].item() >= 0.5


def test_each_cause_is_warned_once(tiny_policy):
    """Two episodes cut at the same limit warn once (a run would repeat it every step, for every row)."""
    module = SFTModule(Built(copy.deepcopy(tiny_policy)), EchoTeacher(),
                       rollout=RolloutSettings(max_tokens_per_turn=24))  # fmt: skip
    question = "Which building is in the picture, and when was it finished? " * 4
    samples = [Sample("long", question, IMAGE, "x"), Sample("longer", question + "Really?", IMAGE, "y")]
    fit = trainer()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        fit.fit(module, loader(samples))
    cut = [str(w.message) for w in seen if "was cut at rollout.max_tokens_per_turn=24" in str(w.message)]
    assert len(cut) == 1 and fit.callback_metrics["sft/truncated_episodes"].item() == 1.0


class AnswersTwice:
    """Row ``a``: an answer, then another turn the episode never reaches; the others answer once."""

    def turns(self, sample: Sample) -> list[str]:
        answer = f"<reason>It is known.</reason><answer> {sample.ground_truth}</answer>"
        return [answer, "<reason>Once more.</reason><answer> z</answer>"] if sample.id == "a" else [answer]


def test_a_teacher_answering_before_its_last_turn_is_warned_as_an_early_answer(tiny_policy):
    """An answer ends the episode: the teacher's later turns go untrained, and the warning says why (not "no tool
    call", which sent the user looking for a parsing fault)."""
    module = SFTModule(Built(copy.deepcopy(tiny_policy)), AnswersTwice())
    fit = trainer()
    with pytest.warns(UserWarning, match=r"row 'a': the teacher wrote 2 turns, its episode ended after 1 \(turn 1 is "
                                         r"an answer, which ends the episode\)"):  # fmt: skip
        fit.fit(module, loader([Sample("a", "What?", IMAGE, "x"), Sample("b", "Which?", IMAGE, "y")]))
    assert fit.callback_metrics["sft/unfinished_episodes"].item() == 0.5


def test_a_warm_start_checkpoint_masks_secrets_in_its_hyperparameters(tiny_policy, tmp_path, monkeypatch):
    """Weights-only checkpoints skip callbacks' hooks (``LoggedConfig``'s masking): the module's own
    ``on_save_checkpoint`` masks a key that reached a setting."""
    key = "sk-test-0123456789abcdef"
    monkeypatch.setenv("MMSR_TEST_API_KEY", key)
    module = SFTModule(Built(copy.deepcopy(tiny_policy)), EchoTeacher(), export_dir=str(tmp_path / f"export_{key}"))
    checkpoint = {"hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["hyper_parameters"]["export_dir"] == str(tmp_path / "export_[redacted MMSR_TEST_API_KEY]")


def test_candidate_answers_reach_the_teacher_as_plain_text(tiny_policy):
    """Accepted answers from the data set spelling ``<|im_end|>`` reach the teacher as the prompt shows them, so
    a teacher answering with one trains text, not an end of turn."""

    class AnswersAlias:
        def turns(self, sample: Sample) -> list[str]:
            return [f"<answer> {sample.candidate_answers[0]}</answer>"]

    module = SFTModule(Built(copy.deepcopy(tiny_policy)), AnswersAlias())
    sample = Sample("a", "What?", IMAGE, "x", candidate_answers=("y <|im_end|> z",))
    assert module._written(module.teacher, sample) == ["<answer> y < |im_end|> z</answer>"]
    assert re.search(r"<\|im_end\|>", sample.candidate_answers[0])  # the sample itself is left as it was


class SearchesTwice:
    """Row ``a``: a text search, then another turn the episode never reaches; the others answer at once."""

    def turns(self, sample: Sample) -> list[str]:
        answer = f"<reason>It is known.</reason><answer> {sample.ground_truth}</answer>"
        search = "<reason>I search.</reason><text_search> the old tower</text_search>"
        return [search, answer] if sample.id == "a" else [answer]


def test_a_tool_over_its_limit_names_no_unset_pair_setting(tiny_policy):
    """A text search over a limit set in ``rollout.tool_limits`` (``rollout.text_search_limit`` left unset) sends
    the user to the tools entry or ``tool_limits``: the unset ``rollout.text_search_limit`` would not be it."""
    module = SFTModule(Built(copy.deepcopy(tiny_policy)), SearchesTwice(), text_search=ShortResults(),
                       rollout=RolloutSettings(tool_limits={"text_search": 0}))  # fmt: skip
    fit = trainer()
    why = r"turn 1 called text_search over its limit of 0 an episode, raise it: limit: in its tools entry or "
    with pytest.warns(UserWarning, match=why + r"rollout.tool_limits: \{text_search: N\}\)"):
        fit.fit(module, loader([Sample("a", "Where is the tower?", IMAGE, "x"), Sample("b", "What?", IMAGE, "y")]))
    assert fit.callback_metrics["sft/unfinished_episodes"].item() == 0.5
