"""Pins behaviours of ``GRPOModule`` (``mmsr.module`` and its ``module_checks`` / ``module_rewards`` /
``module_validation`` mixins) that a mutation audit found no test held: each test here fails on its mutant (named
in its docstring) and states what a user would lose to it."""

from __future__ import annotations

import math

import pytest
import torch

import mmsr.parallel
from mmsr.data.sample import Sample
from mmsr.module import GRPOModule
from mmsr.module_checks import warn_unserved_tools
from mmsr.reward.judge import JudgeRefused
from mmsr.rollout.trajectory import Trajectory
from mmsr.tools.base import FatalToolError
from tests.test_module import SleepingEngine, make_module, script
from tests.test_unserved_tools import RECIPE_FIX, loop_of

TRAJS = [Trajectory(f"q{g}", g, [1, 2], [0, 1], [0.0, -1.0], [], 1) for g in range(4)]
SAMPLES = [Sample(f"q{g}", "q", None, "x") for g in range(4)]  # group g's prompt is SAMPLES[g]


class Returning(GRPOModule):
    """An override returning whatever the test gives it (``given``), or raising it where it is an exception."""

    given: object = None

    def compute_rewards(self, trajectories, samples):
        if isinstance(self.given, Exception):
            raise self.given
        return self.given


@pytest.fixture(scope="module")
def returning() -> Returning:
    module = make_module()
    module.__class__ = Returning
    return module


@pytest.fixture(scope="module")
def held_out(fvqa_samples) -> list[Sample]:
    """Two held-out prompts (the scripted engine answers each episode 0 right)."""
    return [s for s in fvqa_samples if s.ground_truth == "musketeers"][:1] + fvqa_samples[:1]


# -- warn_unserved_tools (module_checks.py) -------------------------------------------------------------------
def test_a_loop_serving_neither_search_warns_of_both():
    """Mutants: only the first unserved tool warned of (``[:1]``), and ``image_search`` never warned of. A run
    launched with neither search backend trained on two kinds of failed searches; a warning naming one left the
    other to be found hours later."""
    with pytest.warns(UserWarning) as caught:
        warn_unserved_tools(loop_of())
    assert len(caught) == 2, [str(w.message) for w in caught]
    image, text = (str(w.message) for w in caught)
    assert image == ("GRPOModule: the prompt offers image_search, but no backend serves it: every image_search call "
                     "the policy makes comes back as a failed search and the run trains on that; set "
                     "model.image_search, or model.rollout.image_search_limit: 0")  # fmt: skip
    assert text.startswith("GRPOModule: the prompt offers text_search, but no backend serves it")
    assert text.endswith(RECIPE_FIX)


# -- checked_rewards (module_rewards.py) ----------------------------------------------------------------------
@pytest.mark.parametrize("value", [math.inf, -math.inf], ids=["inf", "-inf"])
def test_an_override_s_infinite_reward_is_refused_like_a_nan(returning, value):
    """Mutant: the finite check weakened to ``isnan``. An infinite reward makes its group's mean and std infinite:
    every advantage of the group NaN (``inf - inf``), then every weight of the update."""
    returning.given = torch.tensor([1.0, 0.0, value, 0.5])
    with pytest.raises(ValueError, match=rf"^Returning.compute_rewards returned {value} for episode 2 \(sample 'q2'\); "
                                         r"rewards are finite numbers$"):  # fmt: skip
        returning.checked_rewards(TRAJS, SAMPLES)


def test_of_several_non_finite_rewards_the_first_episode_is_named(returning):
    """Mutant: the last non-finite episode named. The first is where a user starts looking (a reward model's
    batch that overflowed from one episode on)."""
    returning.given = torch.tensor([1.0, math.nan, 0.0, math.inf])
    with pytest.raises(ValueError, match=r"^Returning.compute_rewards returned nan for episode 1 \(sample 'q1'\)"):
        returning.checked_rewards(TRAJS, SAMPLES)


@pytest.mark.parametrize("shape", [(4, 1), (1, 4)], ids=["column", "row"])
def test_an_override_s_column_or_row_of_rewards_is_refused_naming_it(returning, shape):
    """Mutants: the shape check weakened to a count (``numel``) or to the first dimension (``len``). An ``[N, 1]``
    tensor broadcast against the ``[N]`` group means in the advantages (an ``[N, N]`` result, or an index error far
    from the override)."""
    returning.given = torch.zeros(shape)
    with pytest.raises(ValueError, match=rf"^Returning.compute_rewards returned a tensor of shape \({shape[0]}, "
                                         rf"{shape[1]}\); it returns a \[N\] tensor, one reward per trajectory "
                                         r"\(N = 4\)$"):  # fmt: skip
        returning.checked_rewards(TRAJS, SAMPLES)


@pytest.mark.parametrize(("error", "told"), [
    (TypeError("unsupported operand"), ("other", "TypeError: unsupported operand")),
    (RuntimeError("CUDA out of memory"), ("other", "RuntimeError: CUDA out of memory")),
    (JudgeRefused("the judge refused the key"), ("judge", "the judge refused the key")),
    (FatalToolError("replay miss"), ("tool", "FatalToolError: replay miss")),
], ids=["TypeError", "RuntimeError", "JudgeRefused", "FatalToolError"])  # fmt: skip
def test_an_override_s_error_of_any_type_is_agreed_over_the_ranks(returning, monkeypatch, error, told):
    """Mutants: only ValueErrors agreed (``except ValueError``), or the error raised without telling the other
    ranks. One process, so the agreement (``mmsr.parallel.first_error``, an all_reduce on several ranks) is
    recorded: an error it never hears of stopped its rank alone, the others waiting in the step's next collective
    until NCCL's timeout, and a refused judge reached them as no ``JudgeRefused``."""
    told_ranks: list[object] = []
    first_error = mmsr.parallel.first_error
    monkeypatch.setattr(mmsr.parallel, "first_error", lambda message, device: told_ranks.append(message)
                        or first_error(message, device))  # fmt: skip
    returning.given = error
    with pytest.raises(type(error)) as info:
        returning.agreed_scores(TRAJS, SAMPLES)
    assert info.value is error  # this rank raises its own error, the others one naming it
    assert told_ranks == [told]
    told_ranks.clear()
    returning.given = torch.tensor([1.0, 0.0, 0.5, 0.25])  # and agreed where no rank has one
    rewards, _ = returning.agreed_scores(TRAJS, SAMPLES)
    assert rewards.tolist() == [1.0, 0.0, 0.5, 0.25] and told_ranks == [None]


# -- validation (module_validation.py) ------------------------------------------------------------------------
def validate(module: GRPOModule, batch: list[Sample]) -> None:
    """One validation epoch of one batch, Lightning's hooks called as its loop calls them."""
    module.start_engine()  # Lightning's setup hook does this in a run
    module.log_dict = lambda *args, **kw: None  # outside a run: no trainer to log to
    module.on_validation_epoch_start()
    module.validation_step(batch, 0)
    module.on_validation_epoch_end()


@pytest.mark.parametrize(("given", "refused"), [
    (torch.tensor([math.nan, 1.0]), r"returned nan for episode 0 \(sample "),
    (torch.zeros(2, 1), r"returned a tensor of shape \(2, 1\)"),
], ids=["nan", "column"])  # fmt: skip
def test_an_override_s_bad_rewards_are_refused_in_validation_as_in_training(held_out, given, refused):
    """Mutant: validation calls ``compute_rewards`` unchecked. A NaN reward then logged ``val/reward/mean`` NaN
    (the checkpoint monitor's value) and an ``[N, 1]`` tensor held-out metrics of lists, naming no override."""
    module = make_module()
    module.__class__ = Returning
    module.given = given
    with pytest.raises(ValueError, match=r"^Returning.compute_rewards " + refused):
        validate(module, held_out)


def test_a_sleeping_engine_goes_back_to_sleep_after_validation(held_out):
    """Mutant: the engine not put back to sleep at the validation epoch's end. vLLM's sleep mode frees the GPU
    memory the next update needs: an awake engine held it through the next step's update."""
    engine = SleepingEngine(script)
    module = make_module(engine=engine)
    validate(module, held_out)
    assert engine.calls == ["wake", "sync", "generate", "sleep"]


# -- the reference model and the step's rollouts (module.py) --------------------------------------------------
@pytest.mark.parametrize(("kl_coef", "kept"), [(0.0, False), (0.1, True)])
def test_a_reference_model_is_kept_only_where_the_kl_term_uses_it(kl_coef, kept):
    """Mutant: the reference built with ``kl_coef=0``. A frozen copy of the policy (device memory the size of the
    model's weights) that no loss term reads."""
    module = make_module(kl_coef=kl_coef)
    module.configure_model()  # outside a run: on the CPU
    assert (module._ref is not None) == kept


def test_rollouts_of_another_batch_are_not_trained_on():
    """Mutant: ``training_step`` trains on whatever rollouts are pending. Episodes of another batch than
    Lightning's would train against the wrong prompts' rewards (a rollout hook that ran for another batch)."""
    module = make_module()
    updates = []
    module.update_policy = lambda trajs, advantages: updates.append(trajs) or {}
    module._pending = (TRAJS, SAMPLES)
    with pytest.raises(RuntimeError, match="no rollouts for this batch: RolloutCallback did not run"):
        module.training_step(list(SAMPLES), 0)  # the same prompts, but not the batch they were rolled out for
    assert updates == []


def test_a_step_s_rollouts_are_trained_on_once():
    """Mutant: the pending rollouts kept after the step. A rollout hook that failed to run before a later step
    then trained that step on the earlier step's episodes again, without a word."""
    module = make_module()
    updates = []
    module.update_policy = lambda trajs, advantages: updates.append(trajs) or {}
    module.log_dict = module.log = lambda *args, **kw: None  # outside a run: no trainer to log to
    module._pending = (TRAJS, SAMPLES)
    module.training_step(SAMPLES, 0)
    assert updates == [TRAJS]
    with pytest.raises(RuntimeError, match="no rollouts for this batch: RolloutCallback did not run"):
        module.training_step(SAMPLES, 1)
    assert updates == [TRAJS]
