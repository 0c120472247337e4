"""The policy update of a GRPO step: PPO epochs x mini-batches, each one optimizer step accumulated
over micro-batches packed by a token budget.

``GRPOModule.update_policy`` calls ``PolicyUpdate.update`` once per training step, with the step's
trajectories and advantages. The maths (clipped surrogate, KL estimators, entropy, importance-sampling
correction, aggregation) is pure torch in ``mmsr.algo``; this module batches the trajectories
(``mmsr.train.batch``), scores them under the old policy and the reference model, and runs the
backward passes and optimizer steps through the trainer's hooks (``Backprop``).

Under DDP / FSDP2 the token-mean denominator is the global one and every rank runs the same number of
backward passes, so N ranks compute exactly the update one process would with one mini-batch a pass. With
``mini_batches`` > 1 each rank splits its own episodes (as veRL does): global mini-batch k is the union of every
rank's k-th share, not one process's k-th contiguous part, so the optimizer steps see other episodes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal, get_args, get_origin, get_type_hints

import torch

from mmsr.algo import aggregate, kl_penalty, policy_loss
from mmsr.algo.correction import corrected_advantages, is_weights, logprob_mismatch
from mmsr.algo.loss import AggMode
from mmsr.metrics import extreme
from mmsr.models.policy import Policy
from mmsr.optim import NonfiniteGuard
from mmsr.parallel import all_reduce, drop_idle_gradients
from mmsr.checks import Limit, refuse_out_of_range
from mmsr.reference import ReferenceModel
from mmsr.rollout.trajectory import Trajectory
from mmsr.train.batch import TrainBatch, collate, group_prompts, packs_rows, rank_micro_batches, sampled_logprobs
from mmsr.train.packed import pair_cost


@dataclass(frozen=True)
class UpdateSettings:
    """The update's choices: the ``GRPOModule`` arguments of the same names (documented there), plus
    ``max_context_tokens``, the length ``seq-mean-token-sum-norm`` normalizes by."""

    ppo_epochs: int = 1
    mini_batches: int = 1
    micro_batch_tokens: int = 8192
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    kl_coef: float = 0.001
    kl_kind: Literal["k1", "k2", "k3", "low_var_kl"] = "low_var_kl"
    clip_low: float = 0.2
    clip_high: float = 0.2
    clip_ratio_c: float | None = None
    loss_agg: AggMode = "token-mean"
    entropy_coef: float = 0.0
    grad_clip: float = 1.0
    is_correction: Literal["none", "truncate", "mask"] = "none"
    is_cap: float = 2.0
    old_logprobs: Literal["recompute", "engine"] = "recompute"
    max_context_tokens: int = 8192
    share_prefix: bool = True
    skip_zero_advantage: bool = False

    def __post_init__(self) -> None:
        # Out of range, these fail late or never: ppo_epochs=0 makes no update (global_step never reaches max_steps
        # while rollouts go on), clip_grad_norm_ with max_norm < 0 flips every gradient (0 zeroes it), a negative KL
        # weight pushes away from the reference. Refused here, before the policy is built; a NaN fails every test.
        s = self
        refuse_out_of_range("UpdateSettings", [
            ("ppo_epochs", s.ppo_epochs, s.ppo_epochs >= 1, ">= 1"),
            ("mini_batches", s.mini_batches, s.mini_batches >= 1, ">= 1"),
            ("micro_batch_tokens", s.micro_batch_tokens, s.micro_batch_tokens >= 1, ">= 1"),
            ("max_context_tokens", s.max_context_tokens, s.max_context_tokens >= 1, ">= 1"),
            ("grad_clip", s.grad_clip, s.grad_clip > 0, "> 0, the cap on the gradient norm; .inf: no clipping"),
            ("kl_coef", s.kl_coef, s.kl_coef >= 0, ">= 0 (0 drops the KL term)"),
            ("clip_low", s.clip_low, s.clip_low >= 0, ">= 0"),
            ("clip_high", s.clip_high, s.clip_high >= 0, ">= 0"),
            ("clip_ratio_c", s.clip_ratio_c, s.clip_ratio_c is None or s.clip_ratio_c > 1, "> 1 (None: off)"),
            ("entropy_coef", s.entropy_coef, s.entropy_coef == s.entropy_coef, "a number (< 0 minimizes entropy)"),
            ("is_cap", s.is_cap, s.is_cap > 0, "> 0"),
            # the log-probs are scored at this temperature: 0 (greedy) was scored at 1, another distribution
            ("temperature", s.temperature, s.temperature > 0, "> 0, the rollouts' sampling temperature"),
            # a misspelt choice failed at the first update, a rollout in; an unknown old_logprobs (e.g.
            # 'recomputed') never did: no old policy was scored, so every PPO epoch took its ratio against the
            # current log-probs (always 1: no clipping)
            *choice_limits(UpdateSettings, {f.name: getattr(s, f.name) for f in fields(s)})])  # fmt: skip
        if self.old_logprobs == "engine" and self.is_correction != "none":
            raise ValueError("old_logprobs='engine' already takes the PPO ratio against the engine's log-probs: "
                             "is_correction must be 'none' with it")
        if s.truncated and (s.is_correction != "none" or s.old_logprobs == "engine"):
            using = "old_logprobs='engine'" if s.old_logprobs == "engine" else f"is_correction={s.is_correction!r}"
            raise ValueError(f"{using} needs top_p=1 and top_k=0 (got top_p={s.top_p}, top_k={s.top_k}): the "
                             "engine's log-probs are then of the truncated, renormalized distribution, the trainer's "
                             "of the whole one, so every ratio would carry the kept probability mass, not the "
                             "engine/trainer mismatch")  # fmt: skip
        if self.skip_zero_advantage and (self.kl_coef > 0 or self.entropy_coef != 0):
            raise ValueError(f"skip_zero_advantage leaves out the episodes whose advantage is 0, which changes the update "
                             f"only if they carry a loss: it needs kl_coef=0 and entropy_coef=0 (got {self.kl_coef} and "
                             f"{self.entropy_coef})")  # fmt: skip

    @property
    def truncated(self) -> bool:
        """Whether rollouts sample a top-p / top-k truncated distribution. vLLM then reports the log-probs of the
        kept tokens renormalized (``processed_logprobs``; no mode of vLLM 0.32 gives them after temperature and the
        ban but before the truncation), while the trainer scores ``softmax(logits / T)`` whole: the two differ by
        the log of the kept mass at every token, a gap of sampling settings, not of engine and trainer."""
        return self.top_p < 1 or self.top_k > 0

    @property
    def updates_per_step(self) -> int:
        """Optimizer updates per training step (what ``trainer.max_steps`` and ``global_step`` count)."""
        return self.ppo_epochs * self.mini_batches

    @classmethod
    def of(cls, args: Mapping[str, Any], **more: Any) -> UpdateSettings:
        """The settings named in ``args`` (e.g. a module's ``hparams``), with ``more`` on top."""
        return cls(**{f.name: args[f.name] for f in fields(cls) if f.name in args} | more)


def choice_limits(owner: type | Callable, values: Mapping[str, Any]) -> list[Limit]:
    """A ``refuse_out_of_range`` limit for each of ``values`` whose parameter or field of ``owner`` (a dataclass, a
    function) is annotated ``Literal[...]``: it must be one of the Literal's values, read with ``typing.get_args``
    so the check cannot drift from the annotation. Other names are skipped."""
    hints = get_type_hints(owner)
    out: list[Limit] = []
    for name, value in values.items():
        if get_origin(hints.get(name)) is Literal:
            allowed = get_args(hints[name])
            out.append((name, value, value in allowed, f"one of {', '.join(map(repr, allowed))}"))
    return out


@dataclass
class Backprop:
    """What an optimizer step needs from the trainer (Lightning's, for ``GRPOModule``).

    Attributes:
        model: the trained module (FSDP2-sharded or not).
        optimizer: has ``zero_grad(set_to_none=...)`` and ``step()`` (Lightning's wrapper runs the
            ``on_before_optimizer_step`` hooks).
        backward: ``manual_backward`` (precision plugins, DDP gradient sync).
        device: where micro-batches go.
        world_size: number of ranks; gradients are averaged over them.
        global_step: ``trainer.global_step`` before the step's first update (the k-th is ``global_step + k``),
            named by the warning of a skipped update (``NonfiniteGuard``).
    """

    model: torch.nn.Module
    optimizer: Any
    backward: Callable[[torch.Tensor], None]
    device: torch.device
    world_size: int = 1
    global_step: int = 0


class PolicyUpdate:
    """Scores and updates ``policy`` on a step's trajectories.

    Args:
        policy: the policy bundle (tokenizer, image processing, ``forward``).
        settings: the update's choices.
    """

    def __init__(self, policy: Policy, settings: UpdateSettings) -> None:
        self.policy, self.settings = policy, settings
        self.nonfinite = NonfiniteGuard("GRPOModule", "the rewards and advantages (an outlier)")

    def update(self, trajs: list[Trajectory], advantages: torch.Tensor, ref: ReferenceModel | None,
               step: Backprop) -> dict[str, float]:  # fmt: skip
        """``ppo_epochs`` x ``mini_batches`` optimizer updates on one step's trajectories.

        Args:
            advantages: ``[N]`` one per trajectory, broadcast over its sampled tokens.
            ref: the frozen reference model (``None``: no KL term).
        Returns: ``train/`` metrics averaged over updates; a maximum (``train/ratio_max``,
            ``train/mismatch_max_abs_diff``) is the largest over them, and ``train/nonfinite_grad_steps``
            the number of updates skipped for a non-finite gradient norm (``NonfiniteGuard``).
        """
        s = self.settings
        if s.kl_coef > 0 and ref is None:
            raise RuntimeError("kl_coef > 0 but there is no reference model: configure_model() did not run")
        if len(trajs) < s.mini_batches:
            raise ValueError(f"mini_batches={s.mini_batches} needs at least as many episodes a step on each rank; this "
                             f"step has {len(trajs)} (lower mini_batches, or raise prompts_per_step x num_generations)")
        # exactly mini_batches parts (``chunk`` makes fewer when they do not divide: 6 episodes in 4 gave 3
        # updates, while trainer.max_steps and the progress count mini_batches a step)
        parts = [part.tolist() for part in torch.tensor_split(torch.arange(len(trajs)), s.mini_batches)]
        runs = [self.episodes_to_run(part, advantages) for part in parts]  # each part's, less skipped ones
        # one update: the old policy is the current one (ratio 1); more: score it before the first update
        # changes it, unless the engine's log-probs stand in for it (no scoring pass)
        multi = s.updates_per_step > 1
        scored = sorted(i for run in runs for i in run)
        old = self.score(trajs, step.model, step.device, scored) if multi and s.old_logprobs == "recompute" else None
        ref_scores = self.reference_scores(trajs, ref, step.device) if ref is not None else None
        reported: dict[str, list[float]] = {}
        for epoch in range(s.ppo_epochs):
            for k, (part, run) in enumerate(zip(parts, runs)):
                at = step.global_step + epoch * s.mini_batches + k
                for key, v in self._optimizer_step(trajs, part, run, advantages, old, ref_scores, step, at).items():
                    reported.setdefault(key, []).append(v)
        # each over the updates that have it: one whose episodes sampled nothing has no token means (not 0s)
        out = {k: (extreme(k) or _mean)(values) for k, values in reported.items()}
        if NONFINITE in reported:  # a count, not a mean: 0 on every healthy step
            out[NONFINITE] = sum(reported[NONFINITE])
        return out

    def _optimizer_step(self, trajs, idx: list[int], run: list[int], advantages, old, ref, step: Backprop,
                        at: int) -> dict[str, float]:  # fmt: skip
        """One optimizer step over trajectories ``idx``, accumulated over packed micro-batches of those of
        them that run (``episodes_to_run``); skipped if the gradient norm is not finite (``at``: its global step)."""
        s, opt = self.settings, step.optimizer
        count, tokens = self._counter(trajs), self._counter(trajs, "token-mean")
        denom = all_reduce(count(idx), "sum", step.device)  # the loss's normalizer: every episode, run or not
        skipping = s.skip_zero_advantage
        ran = all_reduce(count(run), "sum", step.device) if skipping else denom
        sampled = ran if s.loss_agg == "token-mean" else all_reduce(tokens(run), "sum", step.device)
        opt.zero_grad()
        metrics: dict[str, float] = {"train/episodes_run": len(run) / len(idx)} if skipping else {}
        for micro in self.micro_batches(trajs, run, step.model, step.device):
            micro_idx = [run[j] for j in (micro or [0])]
            n, t = (count(micro_idx), tokens(micro_idx)) if micro else (0, 0)
            # gradients are averaged over ranks, so each rank's share is scaled by the world size; nothing
            # sampled (denom 0): zero gradients, and the optimizer still steps as updates_per_step counts
            share = n / denom * step.world_size if denom else 0.0
            batch = collate([trajs[i] for i in micro_idx], micro_idx, self.policy, step.device)
            loss, m = self.loss(batch, advantages[micro_idx].to(step.device), step.model, old, ref)
            step.backward(loss * share)
            # x world size: the rank mean taken by sync_dist is the global mean
            per_episode = n / ran * step.world_size if ran else None
            _add_weighted(metrics, m, per_episode, t / sampled * step.world_size if sampled else None)
        drop_idle_gradients(self.policy.vision_tower(), any(trajs[i].vision for i in run), step.device)
        params = [p for p in step.model.parameters() if p.requires_grad]
        metrics["train/grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, s.grad_clip))
        metrics[NONFINITE] = float(self.nonfinite.step(opt, metrics["train/grad_norm"], at))
        opt.zero_grad(set_to_none=True)  # gradients need no memory while the engine rolls out
        return metrics

    def _counter(self, trajs: list[Trajectory], agg: AggMode | None = None):
        """What the loss averages over (under ``agg``, default ``loss_agg``), counted in episodes ``ids``: their
        sampled tokens (``token-mean``), the episodes that sampled any (``seq-mean-token-*``: ``aggregate`` leaves a
        row without one out, so it must not count here either, or its weight goes to whichever episodes share its
        micro-batch), or every episode (``seq-mean-token-sum-norm``, whose normalizer counts every row)."""
        agg = agg or self.settings.loss_agg
        if agg == "token-mean":
            return lambda ids: sum(trajs[i].num_sampled_tokens for i in ids)
        if agg in ("seq-mean-token-mean", "seq-mean-token-sum"):
            return lambda ids: sum(trajs[i].num_sampled_tokens > 0 for i in ids)
        return len

    def episodes_to_run(self, idx: list[int], advantages: torch.Tensor) -> list[int]:
        """``idx``, less the episodes whose advantage is 0 under ``skip_zero_advantage`` (with no KL or
        entropy term their loss and gradient are exactly 0, so running them changes nothing); one is
        kept if none is left, so the optimizer still steps on (zero) gradients as it would have."""
        if not self.settings.skip_zero_advantage:
            return idx
        return [i for i in idx if advantages[i] != 0] or idx[:1]

    def micro_batches(self, trajs: list[Trajectory], rows: list[int], model: torch.nn.Module, device: torch.device
                      ) -> list[list[int] | None]:  # fmt: skip
        """``rank_micro_batches`` of ``trajs[rows]`` within ``micro_batch_tokens`` (positions in ``rows``; ``None``:
        a zero-weight rerun of the first). Where ``model`` shares prefixes in packed rows on ``device``, a GRPO
        group's episodes go together (their prompt runs once per micro-batch it is in)."""
        together = self.settings.share_prefix and packs_rows(model, device)
        prompts = group_prompts([trajs[i] for i in rows]) if together else None
        return rank_micro_batches([len(trajs[i]) for i in rows], self.settings.micro_batch_tokens, device, prompts,
                                  pair_cost(self.policy.model.config))  # fmt: skip

    def loss(self, batch: TrainBatch, adv: torch.Tensor, model: torch.nn.Module, old, ref
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
        """Clipped surrogate + KL + entropy terms of one micro-batch (``adv``: ``[n]``)."""
        s, mask = self.settings, batch.loss_mask
        max_len = s.max_context_tokens
        logp, entropy = self.token_logprobs(batch, model, with_entropy=True)
        trainer_lp = pad_rows(old, batch) if old is not None else logp.detach()
        old_lp = batch.engine_logprobs if s.old_logprobs == "engine" else trainer_lp
        if s.is_correction != "none":  # the rollout came from the engine's distribution, not old_lp's
            adv = corrected_advantages(adv, is_weights(old_lp, batch.engine_logprobs, mask, s.is_cap, s.is_correction))
        loss, m = policy_loss(logp, old_lp, adv, mask, s.clip_low, s.clip_high, s.loss_agg, max_len, s.clip_ratio_c)
        out = {f"train/{k}": v for k, v in m.items()}
        if not s.truncated:  # else the engine's log-probs are of another distribution (``UpdateSettings.truncated``)
            out |= logprob_mismatch(trainer_lp, batch.engine_logprobs, mask, s.is_cap).metrics("train/mismatch_")
        out["train/policy_loss"] = loss.detach()
        out["train/entropy"] = aggregate(entropy.detach(), mask, "token-mean")
        if ref is not None:
            kl = aggregate(kl_penalty(logp, pad_rows(ref, batch), s.kl_kind), mask, s.loss_agg, max_len)
            loss = loss + s.kl_coef * kl
            out["train/kl"] = kl.detach()
        if s.entropy_coef:
            loss = loss - s.entropy_coef * aggregate(entropy, mask, s.loss_agg, max_len)
        out["train/loss"] = loss.detach()
        return loss, out

    def token_logprobs(self, batch: TrainBatch, model: torch.nn.Module, with_entropy: bool = False):
        """``sampled_logprobs`` of ``batch`` under ``model`` at the sampling temperature."""
        s = self.settings
        return sampled_logprobs(self.policy, batch, model, s.temperature, with_entropy, s.share_prefix)

    def reference_scores(self, trajs: list[Trajectory], ref: ReferenceModel, device: torch.device) -> list[torch.Tensor]:
        with ref.on_device() as model:
            return self.score(trajs, model, device)

    @torch.no_grad()
    def score(self, trajs: list[Trajectory], model: torch.nn.Module, device: torch.device,
              only: list[int] | None = None) -> list[torch.Tensor]:  # fmt: skip
        """Per-trajectory log-probs ``[len_i - 1]`` under ``model`` (old policy or reference); with ``only``,
        of those trajectories alone (the others get empty tensors)."""
        scores: list[torch.Tensor] = [torch.empty(0)] * len(trajs)
        rows = list(range(len(trajs))) if only is None else only
        for micro in self.micro_batches(trajs, rows, model, device):
            picked = [rows[j] for j in micro or [0]]
            batch = collate([trajs[i] for i in picked], picked, self.policy, device)
            logp, _ = self.token_logprobs(batch, model)
            for row, i in enumerate(picked if micro else []):
                scores[i] = logp[row, : len(trajs[i]) - 1]
        return scores


# averaged as loss_agg weighs the micro-batches; every other metric of ``PolicyUpdate.loss`` is a mean over the
# micro-batch's sampled tokens whatever loss_agg is, so it is weighted by those (by episodes, the logged
# ratio_mean of an on-policy update read 0.75 under seq-mean-token-sum-norm and changed with the micro-batch cut)
LOSS_TERMS = ("train/policy_loss", "train/kl", "train/loss")
# the updates skipped for a non-finite gradient norm (``NonfiniteGuard``): summed over a step's updates
NONFINITE = "train/nonfinite_grad_steps"


def _add_weighted(metrics: dict[str, float], micro: Mapping[str, Any], per_episode: float | None,
                  per_token: float | None) -> None:  # fmt: skip
    """Adds a micro-batch's metrics to the update's: the ``LOSS_TERMS`` times ``per_episode`` (its share of what
    loss_agg averages over), the others times ``per_token`` (its share of the sampled tokens). ``None``: the update
    has nothing to average them over and logs none (not 0, which would pull the step's mean down). A maximum
    (``extreme``) is the largest of the micro-batches that sampled a token, unweighted."""
    for k, v in micro.items():
        weight = per_episode if k in LOSS_TERMS else per_token
        pick = extreme(k)
        if pick is not None and weight:  # a micro-batch without sampled tokens has no maximum (its 0 is a fill)
            metrics[k] = pick(metrics[k], float(v)) if k in metrics else float(v)
        elif pick is None and weight is not None:
            metrics[k] = metrics.get(k, 0.0) + float(v) * weight


def _mean(values: list[float]) -> float:
    """The mean of ``values`` as the logs always took it (a sum of ``v / n`` in order, the same bits)."""
    total = 0.0
    for v in values:
        total += v / len(values)
    return total


def pad_rows(per_traj: list[torch.Tensor], batch: TrainBatch) -> torch.Tensor:
    """Stack the trajectories' 1-D scores into the micro-batch's ``[n, T-1]`` layout."""
    out = torch.zeros_like(batch.engine_logprobs)
    for row, i in enumerate(batch.index.tolist()):
        out[row, : per_traj[i].numel()] = per_traj[i]
    return out
