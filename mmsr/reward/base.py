"""The reward protocol, the checks of a reward and of its values, and a weighted combination of rewards."""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from mmsr.data.sample import Sample
from mmsr.rollout.trajectory import Trajectory


class RewardError(ValueError):
    """A reward (or its ``batch`` or ``details``) raised: the message names the reward, the episode and its sample,
    then the original error's type and message, which is its ``__cause__``. ``mmsr``'s last line ends the chain
    here (``mmsr.cli.cause``): the innermost error alone, ``KeyError: 'oops'``, named no reward."""

    names_its_cause = True


@runtime_checkable
class Reward(Protocol):
    """Scores one finished trajectory of one sample: ``reward(trajectory: Trajectory, sample: Sample) -> float``.

    Any object callable with those two arguments is one, whatever its parameters' names and annotations: they are
    positional and unannotated here because jsonargparse checks a config's ``class_path`` against this protocol and
    wants an implementation's names and annotations to match the protocol's exactly (it refused a reward written
    ``__call__(self, trajectory, sample) -> float``, as the README shows). ``callable_reward`` checks the arity."""

    def __call__(self, trajectory: Any, sample: Any, /) -> Any: ...


def reward_name(reward: object) -> str:
    """The reward's class (a function's own name): what the errors about it say."""
    return reward.__qualname__ if inspect.isroutine(reward) else type(reward).__qualname__


def callable_reward(reward: object, where: str) -> Reward:
    """``reward`` itself when it can be called as ``reward(trajectory, sample)`` or has a ``batch`` (``scored`` then
    calls only that); else a ValueError naming ``where`` it was given (built in Python, nothing checked it: it
    failed at the first step's reward)."""
    if hasattr(reward, "batch"):
        return reward  # type: ignore[return-value]
    try:
        inspect.signature(reward).bind(None, None)  # type: ignore[arg-type]
    except TypeError as exc:  # not callable, or its __call__ takes other arguments
        raise ValueError(f"{where}: {reward_name(reward)} cannot be called as reward(trajectory, sample) ({exc}); "
                         "a reward is an object with __call__(trajectory, sample) -> float") from exc  # fmt: skip
    except ValueError:  # no signature to read (a builtin): called as it is
        pass
    return reward  # type: ignore[return-value]


def scored(reward: Reward, trajectories: Sequence[Trajectory], samples: Sequence[Sample]) -> list[float]:
    """``[N]`` ``reward``'s value of each ``trajectories[i]`` answering ``samples[i]`` (one ``batch`` call when it
    has one), each a finite float. A reward that raises, gives something other than a number (None, NaN, inf) or a
    batch of another length is a ValueError naming the reward, the episode and its sample (a ``RewardError`` when
    it raised): a NaN made every advantage, the loss and then every weight NaN while the run went on."""
    name = reward_name(reward)
    if not hasattr(reward, "batch"):
        values = [_called(reward, name, i, t, s) for i, (t, s) in enumerate(zip(trajectories, samples))]
        return [_finite(name, i, s, v) for i, (s, v) in enumerate(zip(samples, values))]
    try:
        values = list(reward.batch(trajectories, samples))
    except Exception as exc:  # a judge's error, a user's bug: which reward, on which step's samples
        ids = sorted({s.id for s in samples})
        raise RewardError(f"reward {name}.batch failed on {len(samples)} episodes (samples {ids}): "
                         f"{type(exc).__name__}: {exc}") from exc  # fmt: skip
    if len(values) != len(trajectories):
        raise ValueError(f"reward {name}.batch returned {len(values)} values for {len(trajectories)} episodes; "
                         "it returns one per trajectory, in their order")  # fmt: skip
    return [_finite(name, i, s, v) for i, (s, v) in enumerate(zip(samples, values))]


def _called(reward: Reward, name: str, i: int, trajectory: Trajectory, sample: Sample) -> Any:
    try:
        return reward(trajectory, sample)
    except Exception as exc:
        raise RewardError(f"reward {name} failed on episode {i} (sample {sample.id!r}): "
                         f"{type(exc).__name__}: {exc}") from exc  # fmt: skip


def _finite(name: str, i: int, sample: Sample, value: Any) -> float:
    number = _number(value)
    if not math.isfinite(number):
        raise ValueError(f"reward {name} gave episode {i} (sample {sample.id!r}) {value!r}, not a finite number; "
                         "a reward returns a float for every episode")  # fmt: skip
    return number


def _number(value: Any) -> float:
    """``value`` as a float, NaN when it is none: a bool, int, numpy or one-element tensor value is a number, a
    string is not."""
    try:
        return math.nan if isinstance(value, (str, bytes)) else float(value)
    except (TypeError, ValueError, RuntimeError):
        return math.nan


def scored_details(reward: Reward, trajectories: Sequence[Trajectory],
                   samples: Sequence[Sample]) -> list[dict[str, float]]:  # fmt: skip
    """``[N]`` the terms ``reward.details`` gives each ``trajectories[i]`` answering ``samples[i]`` (empty without a
    ``details``), as it gave them. A ``details`` that raises (a ``RewardError``) or gives something other than a
    dict of finite numbers (a ValueError) is named with the episode and its sample: a bare ``KeyError``, or a
    ``None`` term's ``TypeError`` in the step's metrics, came after the optimizer step and named neither."""
    if not hasattr(reward, "details"):
        return [{} for _ in trajectories]
    episodes = enumerate(zip(trajectories, samples))
    return [_terms(reward, t, s, f"episode {i} (sample {s.id!r})") for i, (t, s) in episodes]


def _terms(reward: Reward, trajectory: Trajectory, sample: Sample, episode: str) -> dict[str, float]:
    """``reward.details(trajectory, sample)``, checked; ``episode`` says which one the errors are about."""
    name = f"{reward_name(reward)}.details"
    try:
        terms = reward.details(trajectory, sample)  # type: ignore[attr-defined]
    except RewardError:  # one of a ``WeightedRewards``' rewards: named already
        raise
    except Exception as exc:
        raise RewardError(f"reward {name} failed on {episode}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(terms, dict):
        raise ValueError(f"reward {name} gave {episode} {terms!r}; details returns a dict of term -> float")
    for term, value in terms.items():
        if not math.isfinite(_number(value)):
            raise ValueError(f"reward {name} gave {episode} term {term!r} = {value!r}, not a finite number; "
                             "details returns a dict of term -> float")  # fmt: skip
    return terms


class WeightedRewards:
    """``sum_i weights[i] * rewards[i](trajectory, sample)``; weights default to all 1."""

    def __init__(self, rewards: list[Reward], weights: list[float] | None = None) -> None:
        weights = [1.0] * len(rewards) if weights is None else list(weights)
        if len(weights) != len(rewards):
            raise ValueError(
                f"WeightedRewards got {len(rewards)} rewards but {len(weights)} weights; "
                "give one weight per reward (or none for all 1.0)"
            )
        self.rewards = [callable_reward(r, f"WeightedRewards.rewards[{i}]") for i, r in enumerate(rewards)]
        self.weights = weights

    def __call__(self, trajectory: Trajectory, sample: Sample) -> float:
        return float(sum(w * r(trajectory, sample) for r, w in zip(self.rewards, self.weights)))

    def batch(self, trajectories: Sequence[Trajectory], samples: Sequence[Sample]) -> list[float]:
        """The sums for ``trajectories[i]`` answering ``samples[i]``: a reward with a ``batch`` of its own (an
        LLM judge, ``mmsr.reward.judged``) scores them all in one call, any other one by one."""
        columns = [scored(r, trajectories, samples) for r in self.rewards]  # each checked: the errors name it
        return [float(sum(w * column[i] for column, w in zip(columns, self.weights))) for i in range(len(trajectories))]

    def details(self, trajectory: Trajectory, sample: Sample) -> dict[str, float]:
        """The terms of the rewards that report them (``MMSearchR1Reward.details``, ``JudgedReward``'s
        ``judge_failed``), merged, the first reward's value of a term shared by several kept: without them a
        step logged ``reward/accuracy`` 0 and no ``reward/judge_failed``."""
        merged: dict[str, float] = {}
        for reward in self.rewards:
            if hasattr(reward, "details"):  # checked here: an error names the reward of these that gave it
                merged = _terms(reward, trajectory, sample, f"sample {sample.id!r}") | merged
        return merged

    def submit(self, trajectory: Trajectory, sample: Sample) -> None:
        """An ended episode, handed on to the rewards that start on it early (``JudgedReward.submit``)."""
        for reward in self.rewards:
            if hasattr(reward, "submit"):
                reward.submit(trajectory, sample)
