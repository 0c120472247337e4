"""Proof that a sync landed: the engine and the trainer must agree on a fixed probe.

Two checks, run together every ``WeightSync.verify_every`` syncs:
- scoring: the engine's log-probs of the probe's tokens (its prompt log-probs) against the trainer's;
  for a vision-language policy the probe holds a generated image, so a vision tower that did not
  sync fails it too;
- sampling: the engine's greedy continuation of the probe against the trainer's log-probs and argmax
  of the same tokens. The probe is generated once right before the sync, so after it the engine
  serves the probe's prefix from its prefix cache: KV computed with the old weights if a sync forgot
  to drop the cache. vLLM computes prompt log-probs without the prefix cache, so the scoring check
  alone cannot see that.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from mmsr.models.policy import BANNED_LOGIT, Policy
from mmsr.models.vision import VisionInput
from mmsr.rollout.engine import Engine, GenerationRequest, SamplingParams
from mmsr.tools.base import IMAGE_MARKER

# One image (``probe_image``) for vision-language policies; text-only policies get the text alone.
PROBE_TEXT = (
    f"<|im_start|>user\n{IMAGE_MARKER}What is the name of the river that flows past the building in this "
    "picture?<|im_end|>\n<|im_start|>assistant\n<reason>I do not recognize the building, so I search the image."
    "</reason><search><img></search><|im_end|>\n"
)
PROBE_KEY = "mmsr-sync-probe"
PROBE_TOKENS = 8  # greedy tokens the sampling check draws
# The sampling check's prefix spans several KV blocks: vLLM caches whole blocks only (16 tokens on
# GPU, 128 on CPU), and never the last token of a prompt. An engine of a shorter max_model_len gets
# less (``sampling_probe``).
SAMPLING_PROBE_MIN_TOKENS = 512
# A correct sync to an engine in bfloat16 measures a mean |dlogp| of 1e-3..3e-2 on the probe.
LOW_PRECISION_TOLERANCE = 0.05


class StaleWeightsError(RuntimeError):
    """The engine's log-probs of the probe differ from the trainer's: its weights are not current."""


@dataclass(frozen=True)
class SyncCheck:
    """Engine vs trainer log-probs of the probe's ``tokens`` predicted tokens."""

    mean_abs_diff: float
    max_abs_diff: float
    tokens: int


def probe_image(index: int = 0) -> Image.Image:
    """A deterministic 112x84 test image: colour gradients over a 14-pixel checkerboard (one patch per
    square), shifted by ``index`` so several probe images differ."""
    y, x = np.mgrid[0:84, 0:112]
    checker = ((x // 14 + y // 14 + index) % 2) * 255
    pixels = np.stack([x * 255 // 111, y * 255 // 83, checker], axis=-1).astype(np.uint8)
    return Image.fromarray(pixels)


def probe_inputs(policy: Policy, text: str = PROBE_TEXT) -> tuple[list[int], tuple[VisionInput, ...]]:
    """The probe's ``[L]`` token ids and its images, encoded as the rollout encodes a context.

    For a vision-language policy the i-th ``IMAGE_MARKER`` is ``probe_image(i)``, processed by the
    policy and expanded to its pads; a text-only policy gets the text with the markers removed.
    """
    if not policy.is_vision:
        return policy.encoder().encode(text.replace(IMAGE_MARKER, "")), ()
    vision = tuple(policy.process_image(probe_image(i)) for i in range(text.count(IMAGE_MARKER)))
    return policy.encoder().encode(text, [v.num_tokens for v in vision]), vision


def sampling_probe(policy: Policy, text: str = PROBE_TEXT, max_model_len: int | None = None,
                   block_size: int | None = None) -> tuple[list[int], tuple[VisionInput, ...]]:  # fmt: skip
    """``probe_inputs`` followed by the probe's text (without images) repeated up to at least
    ``SAMPLING_PROBE_MIN_TOKENS`` tokens: a prefix long enough for the engine to cache.

    An engine's ``max_model_len`` cuts it to leave room for the ``PROBE_TOKENS`` it continues with (vLLM
    refuses a longer prompt). Cut, it must still hold ``probe_inputs`` whole and more than one KV block of
    ``block_size`` tokens (the prefix cache serves whole blocks, never a prompt's last token), or the check
    could not see a stale prefix cache: ``ValueError`` naming ``max_model_len`` then.
    """
    ids, vision = probe_inputs(policy, text)
    filler, _ = probe_inputs(policy, text.replace(IMAGE_MARKER, ""))
    own, need = len(ids), max(len(ids), (block_size or 0) + 1)
    while len(ids) < SAMPLING_PROBE_MIN_TOKENS:
        ids = ids + filler
    room = len(ids) if max_model_len is None else max_model_len - PROBE_TOKENS
    if room < need:
        cache = f" and a KV block of {block_size} to cache with a token past it" if block_size else ""
        raise ValueError(f"max_model_len={max_model_len} leaves {room} tokens for the weight-sync sampling probe (after "
                         f"the {PROBE_TOKENS} it samples), which needs {need}: its own {own}{cache}; raise the engine's "
                         "max_model_len")  # fmt: skip
    return ids[:room], vision


@torch.no_grad()
def trainer_logits(policy: Policy, input_ids: Sequence[int], vision: Sequence[VisionInput] = (),
                   banned: bool = False) -> torch.Tensor:  # fmt: skip
    """``[L, V]`` float32 next-token logits of one sequence (images expanded) under the trainer.

    The inputs are the training forward's (``Policy.position_ids``, the images' patches through the
    vision tower, ``Policy.autocast``); ``banned`` applies the policy's banned-token mask, as the
    engine does when it samples (vLLM reports prompt log-probs without it).
    """
    model, dev = policy.model, policy.model.device
    ids = torch.tensor(list(input_ids), dtype=torch.long)
    pos = policy.position_ids(ids, vision)
    images = {}
    if vision:
        images = dict(pixel_values=torch.cat([v.pixel_values for v in vision]).to(dev, model.dtype),
                      image_grid_thw=torch.tensor([v.grid_thw for v in vision], device=dev))  # fmt: skip
    was_training = model.training
    model.eval()
    try:
        with policy.autocast():
            logits = model(input_ids=ids[None].to(dev), position_ids=pos[..., None, :].to(dev), **images).logits
    finally:
        model.train(was_training)
    logits = logits[0].float()
    if banned:
        logits = logits.index_fill(-1, policy.banned_token_ids(logits.shape[-1]).to(logits.device), BANNED_LOGIT)
    return logits.cpu()


def trainer_logprobs(policy: Policy, input_ids: Sequence[int], vision: Sequence[VisionInput] = ()) -> torch.Tensor:
    """``[L-1]`` log-probs of tokens 1.. of one sequence under the raw model (temperature 1, no
    banned-token mask: what vLLM reports for prompt tokens)."""
    logp = torch.log_softmax(trainer_logits(policy, input_ids, vision)[:-1], -1)
    return logp.gather(-1, torch.tensor(list(input_ids)[1:])[:, None])[:, 0]


def engine_dtype(engine) -> str | None:
    """The dtype the engine's weights run in (``weights_dtype``, e.g. ``"bfloat16"``), where it says."""
    dtype = getattr(engine, "weights_dtype", None)
    return None if dtype is None else str(dtype).removeprefix("torch.")


def _stale(what: str, check: SyncCheck, tolerance: float, dtype: str | None) -> StaleWeightsError:
    """The error of a failed check; an engine in bf16/fp16 below ``LOW_PRECISION_TOLERANCE`` fails it
    even when correct, so the message says which tolerance its precision needs."""
    cause = f"the engine{f' (in {dtype})' if dtype else ''} is generating with stale or wrongly loaded weights"
    if dtype in ("bfloat16", "float16") and tolerance < LOW_PRECISION_TOLERANCE:
        cause = (f"the engine runs {dtype}, where a correct sync differs by up to ~3e-2: use WeightSync(tolerance="
                 f"{LOW_PRECISION_TOLERANCE:g}) for it (above that, its weights are stale or wrongly loaded)")  # fmt: skip
    return StaleWeightsError(
        f"engine and trainer disagree on the probe after a weight sync ({what}): mean |dlogp| "
        f"{check.mean_abs_diff:.3g} (max {check.max_abs_diff:.3g}) over {check.tokens} tokens > "
        f"tolerance {tolerance:g}; {cause}"
    )


def agree(error: StaleWeightsError | None, device: torch.device) -> None:
    """Raise on every rank if the probe failed on any: ``error`` where it failed, a ``StaleWeightsError``
    naming those ranks elsewhere (every rank must call). An engine may be stale on one rank only (each
    rank syncs its own), and a rank that raised alone left the others waiting in their next collective
    until its timeout, with the cause in one rank's log."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        failed = torch.zeros(dist.get_world_size(), device=device)
        failed[dist.get_rank()] = float(error is not None)
        dist.all_reduce(failed)
        ranks = failed.nonzero().flatten().tolist()
        if error is None and ranks:
            raise StaleWeightsError(f"the weight-sync probe failed on rank(s) {ranks} (their logs say how): every "
                                    "rank stops")  # fmt: skip
    if error is not None:
        raise error


def verify_sync(policy: Policy, engine, input_ids: Sequence[int], tolerance: float,
                vision: Sequence[VisionInput] = ()) -> SyncCheck:  # fmt: skip
    """Compare ``engine.score(input_ids, vision)`` with the trainer's at the tokens that are not image
    pads; raise ``StaleWeightsError`` if the mean absolute difference exceeds ``tolerance``, or if the engine
    scored another number of tokens.

    Pads are left out because training never scores one (off the loss mask, and banned); the vision
    tower still reaches every compared token after an image (first ``<|vision_end|>``, predicted from
    the last image token).
    """
    mine = trainer_logprobs(policy, input_ids, vision)
    scored = engine.score(input_ids, tuple(vision)) if vision else engine.score(input_ids)
    theirs = torch.tensor(scored, dtype=torch.float32)
    if theirs.shape != mine.shape:  # an error every rank hears of (``agree``), not a shape error raised alone
        raise StaleWeightsError(f"engine scored {theirs.numel()} tokens of the probe where the trainer scored "
                                f"{mine.numel()}: it does not serve the trainer's policy")  # fmt: skip
    pad = getattr(policy.model.config, "image_token_id", None) if vision else None
    compared = torch.tensor(list(input_ids)[1:]) != pad if pad is not None else slice(None)
    diff = (mine - theirs).abs()[compared]
    check = SyncCheck(float(diff.mean()), float(diff.max()), diff.numel())
    if not check.mean_abs_diff <= tolerance:  # a NaN (weights left as garbage) is stale, not a pass
        raise _stale("scoring", check, tolerance, engine_dtype(engine))
    return check


def _probe_request(input_ids: Sequence[int], vision: Sequence[VisionInput], tokens: int):
    request = GenerationRequest(tuple(input_ids), tuple(vision), key=PROBE_KEY)
    return request, SamplingParams(temperature=0.0, max_tokens=tokens, stop=())


def warm_probe(engine: Engine, input_ids: Sequence[int], vision: Sequence[VisionInput] = ()) -> None:
    """Generate one token of the probe, so the engine caches its prefix (with the weights it has now)."""
    request, sampling = _probe_request(input_ids, vision, 1)
    engine.generate([request], sampling)


def verify_sampling(policy: Policy, engine: Engine, input_ids: Sequence[int], tolerance: float,
                    vision: Sequence[VisionInput] = (), tokens: int = PROBE_TOKENS) -> SyncCheck:  # fmt: skip
    """The engine's greedy continuation of the probe against the trainer: the log-probs it reports for
    its ``tokens`` tokens (banned tokens masked, as it samples) must match the trainer's within
    ``tolerance``, and each token must be the trainer's argmax up to ``tolerance`` (a near-tie may
    flip in lower precision). Raises ``StaleWeightsError`` otherwise, or if the engine returned no token, more
    than ``tokens``, not one log-prob per token, or a token outside the trainer's vocabulary."""
    request, sampling = _probe_request(input_ids, vision, tokens)
    (out,) = engine.generate([request], sampling)
    vocab = policy.model.get_input_embeddings().num_embeddings
    # an id the embedding cannot look up is scored as id 0 and reported after the forward: raised inside it, on
    # this rank alone, the other ranks would wait in the forward's all-gathers (FSDP2) until the timeout
    known = [t if 0 <= t < vocab else 0 for t in out.token_ids]
    logp = torch.log_softmax(trainer_logits(policy, list(input_ids) + known, vision, banned=True), -1)
    rows = logp[len(input_ids) - 1 : len(input_ids) - 1 + len(known)]  # [K, V] predicting the K tokens
    if not 0 < len(known) <= tokens or len(out.logprobs) != len(known) or known != list(out.token_ids):
        raise StaleWeightsError(f"engine continued the probe with {len(known)} tokens and {len(out.logprobs)} "
                                f"log-probs (asked for {tokens} at most, one log-prob per token, at least one; ids "
                                f"{sorted(set(out.token_ids) - set(known))} outside the trainer's vocabulary of "
                                f"{vocab}): it does not serve the trainer's policy")  # fmt: skip
    mine = rows.gather(-1, torch.tensor(known)[:, None])[:, 0]
    diff = (mine - torch.tensor(out.logprobs, dtype=torch.float32)).abs()
    check = SyncCheck(float(diff.mean()), float(diff.max()), diff.numel())
    worse_than_argmax = float((rows.max(-1).values - mine).max())
    if not (check.mean_abs_diff <= tolerance and worse_than_argmax <= tolerance):  # NaN fails too
        raise _stale(f"greedy sampling from the cached probe prefix, tokens {worse_than_argmax:.3g} below "
                     "the trainer's argmax", check, tolerance, engine_dtype(engine))  # fmt: skip
    return check
