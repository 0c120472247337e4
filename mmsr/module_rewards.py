"""``GRPOModule``'s reward stage: a step's episodes scored by its ``reward``, checked, and agreed over the ranks.

``RewardStage`` is a mixin of ``GRPOModule`` (``mmsr.module``), the class a subclass overrides ``compute_rewards``
on; it reads the module's ``reward`` and ``stop_every_rank``."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mmsr.data.sample import Sample
from mmsr.reward.base import scored, scored_details
from mmsr.rollout.trajectory import Trajectory


class RewardStage:
    """Rewards and their terms for a step's (or a held-out batch's) episodes."""

    def compute_rewards(self, trajectories: Sequence[Trajectory], samples: Sequence[Sample]) -> torch.Tensor:
        """Override point for rewards: ``[N]`` float rewards, ``samples[t.group_id]`` is t's prompt. A reward
        with a ``batch(trajectories, samples)`` method scores the step's episodes in one call (an LLM judge's
        requests run concurrently: ``mmsr.reward.judged``). A value that is no finite number, or a reward that raises,
        is a ValueError naming the reward, the episode and its sample (``mmsr.reward.base.scored``)."""
        prompts = [samples[t.group_id] for t in trajectories]
        return torch.tensor(scored(self.reward, trajectories, prompts))

    def checked_rewards(self, trajectories: Sequence[Trajectory], samples: Sequence[Sample]) -> torch.Tensor:
        """``compute_rewards``, its result checked: an override's that is not an ``[N]`` tensor of finite numbers is a
        TypeError or ValueError naming its class (a list ended in ``'list' object has no attribute 'dim'`` inside the
        advantages, after the rollout, naming no override). Returned on the CPU in float32: an override's CUDA or
        bf16 rewards (a reward model under bf16 autocast) failed the advantages' ``index_add`` or ran them in bf16."""
        rewards, n = self.compute_rewards(trajectories, samples), len(trajectories)
        owner, wanted = f"{type(self).__qualname__}.compute_rewards", f"a [N] tensor, one reward per trajectory (N = {n})"
        if not isinstance(rewards, torch.Tensor):
            raise TypeError(f"{owner} returned a {type(rewards).__name__}, not a tensor; it returns {wanted}")
        if tuple(rewards.shape) != (n,):
            raise ValueError(f"{owner} returned a tensor of shape {tuple(rewards.shape)}; it returns {wanted}")
        if not torch.isfinite(rewards).all():  # a NaN made every advantage of its group, then every weight, NaN
            i = int((~torch.isfinite(rewards)).nonzero()[0])
            raise ValueError(f"{owner} returned {float(rewards[i])} for episode {i} (sample "
                             f"{trajectories[i].sample_id!r}); rewards are finite numbers")  # fmt: skip
        return rewards.detach().to("cpu", torch.float32)  # the default's already are: the same tensor

    def agreed_scores(self, trajectories: Sequence[Trajectory],
                      samples: Sequence[Sample]) -> tuple[torch.Tensor, list[dict[str, float]]]:  # fmt: skip
        """``checked_rewards`` (``[N]``) and ``reward_details``, every rank stopping when a rank's reward raised in
        either (``stop_every_rank``): a judge's refusal (``JudgeRefused``) is raised only where episodes answered and
        asked the judge. That rank raises its error, the others one naming it. A collective on several ranks:
        ``training_step`` calls it once a step on every rank (validation's ranks may run different numbers of
        batches: ``validation_step``)."""
        error = None
        try:
            rewards = self.checked_rewards(trajectories, samples)
            details = self.reward_details(trajectories, samples)
        except Exception as exc:  # not BaseException: an interrupt stops this process at once
            error = exc
        self.stop_every_rank(error)
        return rewards, details

    def _episode_ended(self, trajectory: Trajectory, sample: Sample) -> None:
        """Hands an ended episode to a reward that starts on it early (an LLM judge's request then overlaps
        the rest of the rollout); looked up per episode, so a reward swapped in after ``__init__`` is told."""
        submit = getattr(self.reward, "submit", None)
        if submit is not None:
            submit(trajectory, sample)

    def reward_details(self, trajectories: Sequence[Trajectory], samples: Sequence[Sample]) -> list[dict[str, float]]:
        """Each trajectory's reward terms (``correct``, ``format``, ...; empty if the reward gives none), each a
        finite number (``mmsr.reward.base.scored_details``: an error names the reward, the episode and its sample)."""
        return scored_details(self.reward, trajectories, [samples[t.group_id] for t in trajectories])
