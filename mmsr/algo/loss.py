"""PPO/GRPO clipped policy-gradient loss and the masked token aggregations it uses."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

AggMode = Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
AGG_MODES: tuple[str, ...] = (
    "token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
)

# Padding positions may hold arbitrary old log-probs; bounding the log-ratio keeps exp() finite
# so a masked-out inf can never turn into NaN (inf * 0) inside the aggregation.
_LOG_RATIO_BOUND = 20.0


def aggregate(
    values: Tensor,
    mask: Tensor,
    mode: AggMode = "token-mean",
    max_len: int | None = None,
) -> Tensor:
    """Reduce per-token values to a scalar loss over the valid (mask == 1) tokens.

    Args:
        values: [N, T] per-token values.
        mask: [N, T] 0/1 (or bool) validity mask.
        mode: "token-mean": sum(v*m) / sum(m), every token weighs the same;
            "seq-mean-token-sum": mean over sequences of the per-sequence masked sum;
            "seq-mean-token-mean": mean over sequences of the per-sequence masked mean;
            "seq-mean-token-sum-norm" (Dr. GRPO): sum(v*m) / (N * max_len), a constant
            normaliser so long answers are not down-weighted.
            The two "seq-mean-*" modes average only over sequences with at least one valid
            token: a fully masked row (e.g. padding added to even out micro-batches) carries
            no signal and should not dilute the others.
        max_len: normaliser for "seq-mean-token-sum-norm" (defaults to T); ignored otherwise.

    Returns:
        0-dim tensor. With no valid token at all it is 0 (never NaN) and keeps a grad_fn when
        ``values`` requires grad, so ``backward()`` still works.
    """
    _check_same_shape(values=values, mask=mask)
    m = mask.to(values.dtype)
    masked = values * m
    if mode == "token-mean":
        # clamp(min=1) only matters when sum(m) == 0, where the numerator is 0 as well.
        return masked.sum() / m.sum().clamp(min=1)
    if mode in ("seq-mean-token-sum", "seq-mean-token-mean"):
        tokens = m.sum(-1)
        per_seq = masked.sum(-1)
        if mode == "seq-mean-token-mean":
            per_seq = per_seq / tokens.clamp(min=1)
        has_tokens = (tokens > 0).to(values.dtype)
        return (per_seq * has_tokens).sum() / has_tokens.sum().clamp(min=1)
    if mode == "seq-mean-token-sum-norm":
        norm = values.shape[-1] if max_len is None else max_len
        if norm <= 0:
            raise ValueError(f"max_len must be positive; got {max_len}")
        return masked.sum() / max(values.shape[0] * norm, 1)
    raise ValueError(f"unknown aggregation mode {mode!r}; expected one of {AGG_MODES}")


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    agg: AggMode = "token-mean",
    max_len: int | None = None,
    clip_ratio_c: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate: per token max(-A*r, -A*clip(r, 1 - clip_low, 1 + clip_high)), and with
    ``clip_ratio_c`` where A < 0 at most -A*c (veRL's dual-clip).

    Args:
        logprobs: [N, T] log-probs of the sampled tokens under the current policy (with grad).
        old_logprobs: [N, T] log-probs under the policy that generated the rollouts.
        advantages: [N] (broadcast over T) or [N, T].
        mask: [N, T] 0/1 mask of the tokens the policy generated (not prompt/tool output).
        clip_low, clip_high: r is clipped to [1 - clip_low, 1 + clip_high]; a larger
            clip_high is DAPO's "clip-higher".
        agg: aggregation mode, see :func:`aggregate`.
        max_len: normaliser for ``agg="seq-mean-token-sum-norm"``.
        clip_ratio_c: dual-clip bound c > 1 (veRL's ``clip_ratio_c``; ``None``: off). With A < 0 the
            unclipped branch -A*r grows without bound as r does, so one token whose ratio exploded
            would dominate the loss and gradient; capped at -A*c, such a token gets no gradient.

    ``old_logprobs`` and ``advantages`` are detached: gradients must only flow through the
    current policy, and the on-policy idiom ``old_logprobs = logprobs`` (ratio 1 but the
    right gradient) only works if the denominator is a constant.

    Returns:
        (loss, metrics): loss is a 0-dim tensor; metrics are detached 0-dim tensors, all
        computed over valid tokens regardless of ``agg``:
        "clip_frac": fraction of tokens where the clipped branch is the strictly larger one
        (these tokens get no gradient); "approx_kl": mean k3 estimate
        r - 1 - log r of KL(old || current), >= 0; "ratio_mean", "ratio_max" of r
        (0 when no token is valid); with ``clip_ratio_c``, "dual_clip_frac": fraction of tokens
        capped at -A*c (veRL's ``pg_clipfrac_lower``; no gradient either).
    """
    _check_same_shape(logprobs=logprobs, old_logprobs=old_logprobs, mask=mask)
    if clip_low < 0 or clip_high < 0:
        raise ValueError(f"clip_low and clip_high must be >= 0; got {clip_low}, {clip_high}")
    if clip_ratio_c is not None and not clip_ratio_c > 1:  # `not >`: a NaN is refused too
        raise ValueError(f"clip_ratio_c must be > 1 (or None: no dual-clip); got {clip_ratio_c}")
    adv = _broadcast_advantages(advantages.detach(), logprobs.shape)
    log_ratio = (logprobs - old_logprobs.detach()).clamp(-_LOG_RATIO_BOUND, _LOG_RATIO_BOUND)
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - clip_low, 1 + clip_high)
    per_token = torch.maximum(unclipped, clipped)
    capped = None
    if clip_ratio_c is not None:
        per_token, capped = _dual_clip(per_token, adv, clip_ratio_c)
    loss = aggregate(per_token, mask, agg, max_len)
    return loss, _policy_metrics(ratio, log_ratio, clipped > unclipped, mask, capped)


def _dual_clip(per_token: Tensor, adv: Tensor, c: float) -> tuple[Tensor, Tensor]:
    """veRL's dual-clip of [N, T] clipped token losses, ``adv`` [N, 1] or [N, T]: where A < 0, min(loss, -A*c).

    Only where A < 0: there the loss -A*r grows with r and -A*c caps it; where A > 0, -A*c is negative and
    (for c > 1 + clip_high) below every clipped loss, so a plain min would overwrite them all.

    Returns:
        ([N, T] losses, [N, T] bool: the tokens whose loss was capped).
    """
    bound = -adv * c
    capped = (adv < 0) & (per_token > bound)
    return torch.where(adv < 0, torch.minimum(per_token, bound), per_token), capped


@torch.no_grad()
def _policy_metrics(
    ratio: Tensor, log_ratio: Tensor, is_clipped: Tensor, mask: Tensor, dual_clipped: Tensor | None = None
) -> dict[str, Tensor]:
    """Diagnostics from [N, T] ratio, log-ratio, clip indicator, mask and dual-clip indicator (``None``: off)."""
    m = mask.to(ratio.dtype)
    valid = m.sum().clamp(min=1)
    # r > 0 everywhere, so zeroing invalid tokens cannot change the max of the valid ones.
    ratio_max = (ratio * m).max() if ratio.numel() else ratio.new_zeros(())
    metrics = {
        "clip_frac": (is_clipped.to(m.dtype) * m).sum() / valid,
        "approx_kl": ((ratio - 1 - log_ratio) * m).sum() / valid,
        "ratio_mean": (ratio * m).sum() / valid,
        "ratio_max": ratio_max,
    }
    if dual_clipped is not None:
        metrics["dual_clip_frac"] = (dual_clipped.to(m.dtype) * m).sum() / valid
    return metrics


def _broadcast_advantages(advantages: Tensor, shape: torch.Size) -> Tensor:
    """Advantages [N] or [N, T] as [N, 1] or [N, T] so they broadcast against ``shape``."""
    if advantages.shape == shape:
        return advantages
    if advantages.dim() == 1 and len(shape) == 2 and advantages.shape[0] == shape[0]:
        return advantages.unsqueeze(-1)
    raise ValueError(
        f"advantages must have shape [N] or [N, T] = {tuple(shape)}; got {tuple(advantages.shape)}"
    )


def _check_same_shape(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    first = next(iter(shapes.values()))
    if len(first) != 2 or any(s != first for s in shapes.values()):
        raise ValueError(f"expected tensors of one shape [N, T]; got {shapes}")
