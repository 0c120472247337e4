"""A user's reward: any object called as ``reward(trajectory, sample)`` is accepted through ``class_path`` (whatever its
parameters' names and annotations), and every value it gives is checked to be a finite number, the errors naming the
reward, the episode and its sample."""

from __future__ import annotations

import math
import typing

import pytest
import torch
from jsonargparse import ArgumentParser

from mmsr.data.sample import Sample
from mmsr.module import GRPOModule
from mmsr.reward import MMSearchR1Reward, Reward, WeightedRewards
from mmsr.reward.base import callable_reward, scored
from mmsr.rollout.trajectory import Trajectory

HERE = __name__  # these classes' class_path prefix


# The README's signature and what users write in its place; all must parse, build and score.
class Annotated:
    def __call__(self, trajectory: Trajectory, sample: Sample) -> float:
        return 1.0


class Plain:
    def __call__(self, trajectory, sample):
        return 1.0


class OtherNames:
    def __call__(self, traj: Trajectory, s: Sample) -> float:
        return 1.0


class NoReturnAnnotation:
    def __call__(self, trajectory: Trajectory, sample: Sample):
        return 1.0


class SubShipped(MMSearchR1Reward):  # the shipped reward, its __call__ overridden without annotations
    def __call__(self, trajectory, sample):
        return 2 * super().__call__(trajectory, sample)


class WithOptions:  # config in __init__, an optional extra argument
    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale

    def __call__(self, trajectory, sample, extra: float = 0.0) -> float:
        return self.scale + extra


USER_REWARDS = [Annotated, Plain, OtherNames, NoReturnAnnotation, SubShipped, WithOptions]


def _module_reward_type():
    return typing.get_type_hints(GRPOModule.__init__)["reward"]  # the annotation jsonargparse parses configs with


def _parsed(config: dict):
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--reward", type=_module_reward_type())
    return parser.instantiate(parser.parse_object({"reward": config})).reward


def _trajectory(group: int = 0) -> Trajectory:
    return Trajectory("s", group, [1, 2], [0, 1], [0.0, -1.0], [], 1)


SAMPLE = Sample("q7", "q", None, "x")


@pytest.mark.parametrize("cls", USER_REWARDS, ids=lambda c: c.__name__)
def test_a_user_reward_parses_by_class_path(cls):
    # jsonargparse refused all but Annotated: "does not implement protocol Reward"
    reward = _parsed({"class_path": f"{HERE}.{cls.__name__}"})
    assert type(reward) is cls and isinstance(reward, Reward)
    assert scored(reward, [_trajectory()], [SAMPLE]) == [float(reward(_trajectory(), SAMPLE))]


def test_user_rewards_parse_inside_weighted_rewards():
    rewards = [{"class_path": f"{HERE}.{cls.__name__}"} for cls in USER_REWARDS]
    rewards[-1]["init_args"] = {"scale": 3.0}
    combined = _parsed({"class_path": "mmsr.reward.WeightedRewards", "init_args": {"rewards": rewards}})
    assert [type(r) for r in combined.rewards] == USER_REWARDS and combined.rewards[-1].scale == 3.0


def test_the_shipped_rewards_parse_as_before():
    shipped = _parsed({"class_path": "mmsr.reward.MMSearchR1Reward", "init_args": {"search_penalty": 0.2}})
    assert type(shipped) is MMSearchR1Reward and shipped.search_penalty == 0.2


def test_a_user_reward_parses_through_the_cli():
    from mmsr.cli import lightning_cli
    from tests.test_configs import ROOT

    args = ["-c", str(ROOT / "mmsr/demo/configs/grpo.yaml"), f"--model.init_args.reward.class_path={HERE}.Plain"]
    config = lightning_cli(args, run=False, parse_only=True).config["model"]["init_args"]["reward"]
    assert config["class_path"] == f"{HERE}.Plain"


class NoCall:
    pass


class ThreeArguments:
    def __call__(self, trajectory, sample, step):
        return 1.0


@pytest.mark.parametrize("bad", [NoCall(), ThreeArguments()], ids=lambda r: type(r).__name__)
def test_an_object_not_callable_as_a_reward_is_refused_where_it_is_given(bad):
    with pytest.raises(ValueError, match=rf"WeightedRewards.rewards\[1\]: {type(bad).__name__} cannot be called as "):
        WeightedRewards([Plain(), bad])
    with pytest.raises(ValueError, match=rf"GRPOModule.reward: {type(bad).__name__} cannot be called as "):
        callable_reward(bad, "GRPOModule.reward")


# ---------------------------------------------------------------------------------------------------
# The values: one bad episode of four


class BadOnThird:
    """Right on every episode but the third (index 2), where it gives ``value`` (or raises it)."""

    def __init__(self, value) -> None:
        self.value = value

    def __call__(self, trajectory, sample):
        if trajectory.group_id != 2:
            return 1.0
        if isinstance(self.value, Exception):
            raise self.value
        return self.value


class Batched:
    def __init__(self, values) -> None:
        self.values = values

    def __call__(self, trajectory, sample):
        return 1.0

    def batch(self, trajectories, samples):
        if isinstance(self.values, Exception):
            raise self.values
        return self.values


TRAJS = [_trajectory(g) for g in range(4)]
SAMPLES = [Sample(f"q{g}", "q", None, "x") for g in range(4)]


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, None, "1.0", [1.0]], ids=repr)
def test_a_value_that_is_no_finite_number_names_the_reward_episode_and_sample(value):
    # NaN made every advantage, the loss and every weight NaN while the run went on; None was a bare TypeError
    with pytest.raises(ValueError, match=r"reward BadOnThird gave episode 2 \(sample 'q2'\) .*, not a finite number"):
        scored(BadOnThird(value), TRAJS, SAMPLES)


def test_a_reward_that_raises_names_the_episode_and_keeps_the_cause():
    with pytest.raises(ValueError, match=r"reward BadOnThird failed on episode 2 \(sample 'q2'\): KeyError: 'Score'") as info:
        scored(BadOnThird(KeyError("Score")), TRAJS, SAMPLES)
    assert isinstance(info.value.__cause__, KeyError)


def test_a_batch_reward_gives_one_finite_number_per_episode():
    with pytest.raises(ValueError, match=r"reward Batched.batch returned 3 values for 4 episodes"):
        scored(Batched([1.0, 1.0, 1.0]), TRAJS, SAMPLES)
    with pytest.raises(ValueError, match=r"reward Batched gave episode 1 \(sample 'q1'\) nan"):
        scored(Batched([1.0, math.nan, 1.0, 1.0]), TRAJS, SAMPLES)
    with pytest.raises(ValueError, match=r"reward Batched.batch failed on 4 episodes .*'q3'.*: RuntimeError: judge down"):
        scored(Batched(RuntimeError("judge down")), TRAJS, SAMPLES)
    assert scored(Batched([1, True, 0.5, torch.tensor(2.0)]), TRAJS, SAMPLES) == [1.0, 1.0, 0.5, 2.0]


def test_weighted_rewards_name_the_reward_of_theirs_that_failed():
    with pytest.raises(ValueError, match=r"reward BadOnThird gave episode 2 \(sample 'q2'\) nan"):
        WeightedRewards([Plain(), BadOnThird(math.nan)]).batch(TRAJS, SAMPLES)
    assert WeightedRewards([Plain(), Batched([0, 1, 2, 3])], [1.0, 0.5]).batch(TRAJS, SAMPLES) == [1.0, 1.5, 2.0, 2.5]


def test_the_modules_rewards_are_checked_in_training_and_validation():
    # compute_rewards scores both training's and validation's episodes
    from tests.test_module import make_module

    module = make_module(reward=BadOnThird(math.nan))
    with pytest.raises(ValueError, match=r"reward BadOnThird gave episode 2 \(sample 'q2'\) nan"):
        module.compute_rewards(TRAJS, SAMPLES)  # group g's prompt is SAMPLES[g]
    module.reward = BadOnThird(2.0)
    assert module.compute_rewards(TRAJS, SAMPLES).tolist() == [1.0, 1.0, 2.0, 1.0]
    with pytest.raises(ValueError, match=r"GRPOModule.reward: NoCall cannot be called as reward\(trajectory, sample\)"):
        make_module(reward=NoCall())


def test_a_reward_with_only_a_batch_method_is_accepted():
    """``scored`` calls only ``batch`` where there is one: such a reward worked before the callable check and still does."""

    class OnlyBatch:
        def batch(self, trajectories, samples):
            return [0.5] * len(trajectories)

    reward = OnlyBatch()
    assert callable_reward(reward, "GRPOModule.reward") is reward
    assert scored(reward, TRAJS, SAMPLES) == [0.5] * 4


class ModelRewards(GRPOModule):
    """A reward model's scores, as an override returns them under bf16 autocast: bf16, in its graph."""

    def compute_rewards(self, trajectories, samples):
        return torch.tensor([1.0, 0.5, 0.0, 0.25], dtype=torch.bfloat16, requires_grad=True)


def test_an_overrides_bf16_rewards_are_checked_into_float32_on_the_cpu_out_of_its_graph():
    """bf16 rewards ran the advantages in bf16 (about 3 significant digits) and CUDA ones failed their ``index_add``:
    ``checked_rewards`` hands the advantages float32 CPU values, detached from the override's graph."""
    from tests.test_module import make_module

    module = make_module()
    module.__class__ = ModelRewards
    rewards = module.checked_rewards(TRAJS, SAMPLES)
    assert (rewards.dtype, rewards.device.type, rewards.requires_grad) == (torch.float32, "cpu", False)
    assert rewards.tolist() == [1.0, 0.5, 0.0, 0.25]
