"""The reward protocol and a weighted combination of rewards."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from mmsr.data.sample import Sample
from mmsr.rollout.trajectory import Trajectory


@runtime_checkable
class Reward(Protocol):
    """Scores one finished trajectory of one sample."""

    def __call__(self, trajectory: Trajectory, sample: Sample) -> float: ...


class WeightedRewards:
    """``sum_i weights[i] * rewards[i](trajectory, sample)``; weights default to all 1."""

    def __init__(self, rewards: list[Reward], weights: list[float] | None = None) -> None:
        weights = [1.0] * len(rewards) if weights is None else list(weights)
        if len(weights) != len(rewards):
            raise ValueError(
                f"WeightedRewards got {len(rewards)} rewards but {len(weights)} weights; "
                "give one weight per reward (or none for all 1.0)"
            )
        self.rewards = list(rewards)
        self.weights = weights

    def __call__(self, trajectory: Trajectory, sample: Sample) -> float:
        return float(sum(w * r(trajectory, sample) for r, w in zip(self.rewards, self.weights)))

    def batch(self, trajectories: Sequence[Trajectory], samples: Sequence[Sample]) -> list[float]:
        """The sums for ``trajectories[i]`` answering ``samples[i]``: a reward with a ``batch`` of its own (an
        LLM judge, ``mmsr.reward.judged``) scores them all in one call, any other one by one."""
        pairs = list(zip(trajectories, samples))
        columns = [r.batch(trajectories, samples) if hasattr(r, "batch") else [r(t, s) for t, s in pairs]
                   for r in self.rewards]  # fmt: skip
        return [float(sum(w * column[i] for column, w in zip(columns, self.weights))) for i in range(len(pairs))]

    def details(self, trajectory: Trajectory, sample: Sample) -> dict[str, float]:
        """The terms of the rewards that report them (``MMSearchR1Reward.details``, ``JudgedReward``'s
        ``judge_failed``), merged, the first reward's value of a term shared by several kept: without them a
        step logged ``reward/accuracy`` 0 and no ``reward/judge_failed``."""
        merged: dict[str, float] = {}
        for reward in self.rewards:
            if hasattr(reward, "details"):
                merged = reward.details(trajectory, sample) | merged
        return merged

    def submit(self, trajectory: Trajectory, sample: Sample) -> None:
        """An ended episode, handed on to the rewards that start on it early (``JudgedReward.submit``)."""
        for reward in self.rewards:
            if hasattr(reward, "submit"):
                reward.submit(trajectory, sample)
