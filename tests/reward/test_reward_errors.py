"""What a user's faulty reward ends with: the last line of ``mmsr`` names the reward, the episode and its sample (a
raising reward ended with its bare ``KeyError: 'oops'``), a faulty ``details`` is named too, before the optimizer
step, and a ``compute_rewards`` override returning something other than an ``[N]`` tensor names its class."""

from __future__ import annotations

import pytest
import torch

import mmsr.cli as cli
from mmsr.data.sample import Sample
from mmsr.module import GRPOModule
from mmsr.reward import WeightedRewards
from mmsr.reward.base import RewardError, scored, scored_details
from mmsr.rollout.trajectory import Trajectory

TRAJS = [Trajectory("s", g, [1, 2], [0, 1], [0.0, -1.0], [], 1) for g in range(4)]
SAMPLES = [Sample(f"q{g}", "q", None, "x") for g in range(4)]


class Raising:
    def __call__(self, trajectory, sample):
        raise KeyError("oops")


class RaisingDetails:
    def __call__(self, trajectory, sample):
        return 1.0

    def details(self, trajectory, sample):
        if sample.id == "q2":
            raise KeyError("detail bug")
        return {"turns": 1.0}


class BadDetails:
    def __init__(self, terms: object) -> None:
        self.terms = terms

    def __call__(self, trajectory, sample):
        return 1.0

    def details(self, trajectory, sample):
        return self.terms if sample.id == "q1" else {"foo": 1.0}


def _last_line(monkeypatch, capsys, fail) -> str:
    monkeypatch.setattr(cli, "main", lambda args=None: fail())
    monkeypatch.setattr(cli.sys, "argv", ["mmsr", "fit", "-c", "x.yaml"])
    with pytest.raises(SystemExit):
        cli.console()
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_the_last_line_of_a_raising_reward_names_it_the_episode_and_the_original_error(monkeypatch, capsys):
    last = _last_line(monkeypatch, capsys, lambda: scored(Raising(), TRAJS, SAMPLES))
    assert last == "mmsr fit: error: RewardError: reward Raising failed on episode 0 (sample 'q0'): KeyError: 'oops'"
    with pytest.raises(RewardError) as info:  # a ValueError, the original its cause (the traceback shows both)
        scored(Raising(), TRAJS, SAMPLES)
    assert isinstance(info.value, ValueError) and isinstance(info.value.__cause__, KeyError)


def test_the_marker_stops_cause_only_at_itself():
    try:
        try:
            scored(Raising(), TRAJS, SAMPLES)
        except RewardError as exc:
            raise RuntimeError("step failed") from exc
    except RuntimeError as outer:
        assert cli.cause(outer) == "RewardError: reward Raising failed on episode 0 (sample 'q0'): KeyError: 'oops'"


def test_a_raising_details_names_the_reward_and_the_episode(monkeypatch, capsys):
    last = _last_line(monkeypatch, capsys, lambda: scored_details(RaisingDetails(), TRAJS, SAMPLES))
    assert last == ("mmsr fit: error: RewardError: reward RaisingDetails.details failed on episode 2 (sample 'q2'): "
                    "KeyError: 'detail bug'")  # fmt: skip
    with pytest.raises(RewardError, match=r"reward RaisingDetails.details failed on sample 'q2': KeyError"):
        WeightedRewards([RaisingDetails()]).details(TRAJS[2], SAMPLES[2])  # the weighted one's own reward named


@pytest.mark.parametrize("terms", [{"foo": None}, {"foo": float("nan")}, {"foo": "1"}, [1.0]], ids=repr)
def test_details_that_are_no_finite_numbers_name_the_reward_episode_and_term(terms):
    # {"foo": None} ended in a TypeError in the step's metrics, after the optimizer step
    with pytest.raises(ValueError, match=r"reward BadDetails.details gave episode 1 \(sample 'q1'\) "):
        scored_details(BadDetails(terms), TRAJS, SAMPLES)
    good = {"foo": 1, "b": True, "t": torch.tensor(0.5)}  # numbers, kept as the reward gave them
    assert scored_details(BadDetails(good), TRAJS, SAMPLES)[1] is good


def test_the_modules_details_are_checked_before_the_optimizer_step():
    from tests.test_module import make_module

    module = make_module(reward=BadDetails({"foo": None}))
    updates = []
    module.update_policy = lambda trajs, advantages: updates.append(trajs) or {}
    module._pending = (TRAJS, SAMPLES)  # group g's prompt is SAMPLES[g]
    with pytest.raises(ValueError, match=r"reward BadDetails.details gave episode 1 \(sample 'q1'\) term 'foo' = None"):
        module.training_step(SAMPLES, 0)
    assert updates == []


class ListRewards(GRPOModule):
    def compute_rewards(self, trajectories, samples):
        return [0.5] * len(trajectories)


class ShortRewards(GRPOModule):
    def compute_rewards(self, trajectories, samples):
        return torch.zeros(len(trajectories) - 1)


class NaNRewards(GRPOModule):
    def compute_rewards(self, trajectories, samples):
        return torch.tensor([1.0, float("nan"), 0.0, 0.5])


def test_a_compute_rewards_override_that_gives_a_nan_is_named():
    """``scored`` refuses a reward class's NaN, but an override's went into the advantages: every weight NaN."""
    from tests.test_module import make_module

    module = make_module()
    module.__class__ = NaNRewards
    with pytest.raises(ValueError, match=r"NaNRewards.compute_rewards returned nan for episode 1 \(sample "):
        module.checked_rewards(TRAJS, SAMPLES)


def test_a_compute_rewards_override_that_gives_no_n_tensor_is_named():
    from tests.test_module import make_module

    module = make_module()
    module.__class__ = ListRewards  # 'list' object has no attribute 'dim', in the advantages
    with pytest.raises(TypeError, match=r"ListRewards.compute_rewards returned a list, not a tensor; it returns a \[N\] "
                                        r"tensor, one reward per trajectory \(N = 4\)"):  # fmt: skip
        module.checked_rewards(TRAJS, SAMPLES)
    module.__class__ = ShortRewards
    with pytest.raises(ValueError, match=r"ShortRewards.compute_rewards returned a tensor of shape \(3,\)"):
        module.checked_rewards(TRAJS, SAMPLES)
    module._pending = (TRAJS, SAMPLES)
    with pytest.raises(ValueError, match=r"ShortRewards.compute_rewards"):  # training_step checks it
        module.training_step(SAMPLES, 0)
    module.__class__ = GRPOModule
    assert module.checked_rewards(TRAJS, SAMPLES).shape == (4,)
