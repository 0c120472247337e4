"""Weight sync from the trainer to the rollout engine: one call, one meaning, and proof that it landed.

Without it GRPO silently trains on rollouts of stale weights (peers' users hit exactly that: TRL
#5312, verl #2424), so the module calls it before every rollout and times it. The parameters are
streamed to ``engine.update_weights`` as one iterator, produced in buckets of ``bucket_mb``: when
the trainer's parameters are FSDP2-sharded (``DTensor``), each bucket's shards are flattened into
one buffer and all-gathered with one collective (every rank runs it in the same order) right before
the bucket is handed over, so at most one bucket of full tensors exists at a time. ``dtype`` casts
the shards before they travel (bf16 for a bf16 engine halves the bytes of fp32 master weights).

``WeightSync`` adds a check every ``verify_every`` syncs: the engine scores a fixed probe sequence
and its log-probs must equal the trainer's within ``tolerance``, or ``StaleWeightsError`` stops the
run. For a vision-language policy the probe holds a generated image, so a vision tower that did not
sync fails the check too.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch.distributed.tensor import DTensor, Shard

from mmsr.models.policy import Policy
from mmsr.rollout.engine import Engine
from mmsr.rollout.trajectory import VisionInput
from mmsr.tools.base import IMAGE_MARKER

DEFAULT_BUCKET_MB = 256.0
DType = Literal["float32", "bfloat16", "float16"]
# Wrapper modules (activation checkpointing, torch.compile, FSDP1) insert these into parameter
# names; the engine knows the checkpoint names.
WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")
# One image (``probe_image``) for vision-language policies; text-only policies get the text alone.
PROBE_TEXT = (
    f"<|im_start|>user\n{IMAGE_MARKER}What is the name of the river that flows past the building in this "
    "picture?<|im_end|>\n<|im_start|>assistant\n<reason>I do not recognize the building, so I search the image."
    "</reason><search><img></search><|im_end|>\n"
)


@dataclass(frozen=True)
class SyncStats:
    """One sync: wall seconds, bytes of full tensors sent, buckets and tensors."""

    seconds: float
    bytes: int
    buckets: int = 0
    tensors: int = 0


def engine_name(name: str) -> str:
    """The checkpoint name of a trainer parameter (wrapper segments removed)."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def full_nbytes(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> int:
    """Bytes of the whole tensor (a ``DTensor``'s global shape, not its local shard), in ``dtype``
    if given (the dtype it is sent in)."""
    itemsize = dtype.itemsize if dtype is not None else tensor.element_size()
    return tensor.numel() * itemsize


def weight_buckets(named: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int,
                   dtype: torch.dtype | None = None) -> Iterator[list[tuple[str, torch.Tensor]]]:  # fmt: skip
    """Consecutive groups of tensors of at most ``bucket_bytes`` (a bigger tensor goes alone); a
    change of dtype starts a new group, so a bucket can travel as one flat buffer."""
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in named:
        nbytes = full_nbytes(tensor, dtype)
        if bucket and (size + nbytes > bucket_bytes or bucket[-1][1].dtype != tensor.dtype):
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def gather(tensor: torch.Tensor) -> torch.Tensor:
    """The full tensor: all-gathered if sharded (every rank must call), detached."""
    tensor = tensor.detach()
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _row_sharded(tensors: Sequence[torch.Tensor]) -> bool:
    """All FSDP2 shards on dim 0 of the same 1-D mesh: one all-gather can serve them all."""
    if not tensors or not all(isinstance(t, DTensor) for t in tensors):
        return False
    mesh = tensors[0].device_mesh
    return mesh.ndim == 1 and all(t.device_mesh == mesh and t.placements == (Shard(0),) for t in tensors)


def gather_bucket(tensors: Sequence[torch.Tensor], dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """Full tensors of one bucket, cast to ``dtype`` (if given) before they travel.

    FSDP2 row shards (``torch.chunk`` layout: ``c = ceil(rows / W)`` rows per rank, fewer or none on
    the last ranks) are padded to ``c`` rows, flattened into one ``[L]`` buffer per rank and
    all-gathered once (``[W, L]``), then split and unpadded: one collective per bucket instead of one
    per parameter (~700 for a 7B model). Anything else is gathered tensor by tensor.
    """
    tensors = [t.detach() for t in tensors]
    if not _row_sharded(tensors):
        return [gather(t) if dtype is None else gather(t).to(dtype) for t in tensors]
    world, group = tensors[0].device_mesh.size(), tensors[0].device_mesh.get_group()
    rows = [-(-t.shape[0] // world) for t in tensors]  # c per tensor
    flat = torch.cat([_padded(t.to_local(), c, dtype).reshape(-1) for t, c in zip(tensors, rows)])
    out = flat.new_empty(world * flat.numel())
    _all_gather_single(out, flat, group=group)
    return _unflatten(out.view(world, -1), tensors, rows)


def _all_gather_single(out: torch.Tensor, tensor: torch.Tensor, group) -> None:
    """``out`` ``[W * L]`` = every rank's ``tensor`` ``[L]`` (torch 2.13 renamed the collective)."""
    dist = torch.distributed
    collective = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    collective(out, tensor, group=group)


def _padded(local: torch.Tensor, rows: int, dtype: torch.dtype | None) -> torch.Tensor:
    """``local`` ``[r, ...]`` zero-padded to ``[rows, ...]`` (and cast)."""
    local = local.to(dtype) if dtype is not None else local
    if local.shape[0] == rows:
        return local
    return torch.cat([local, local.new_zeros(rows - local.shape[0], *local.shape[1:])])


def _unflatten(gathered: torch.Tensor, tensors: Sequence[torch.Tensor], rows: Sequence[int]) -> list[torch.Tensor]:
    """Rebuild each full tensor from the ``[W, L]`` gathered buffers (rank r holds rows ``r*c ...``)."""
    out, offset = [], 0
    for t, c in zip(tensors, rows):
        tail = t.shape[1:]
        size = c * tail.numel()
        parts = gathered[:, offset : offset + size].reshape(gathered.shape[0], c, *tail)
        out.append(parts.reshape(-1, *tail)[: t.shape[0]])
        offset += size
    return out


class _Counter:
    def __init__(self) -> None:
        self.bytes = self.buckets = self.tensors = 0


def stream_weights(model: torch.nn.Module, bucket_bytes: int, counter: _Counter | None = None,
                   dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:  # fmt: skip
    """``(checkpoint name, full tensor)`` for every parameter (tied ones once), a bucket at a time,
    cast to ``dtype`` if given (e.g. bf16 for a bf16 engine: half the bytes of fp32 master weights)."""
    counter = counter if counter is not None else _Counter()
    for bucket in weight_buckets(model.named_parameters(), bucket_bytes, dtype):
        full = gather_bucket([p for _, p in bucket], dtype)
        counter.buckets += 1
        counter.tensors += len(full)
        counter.bytes += sum(full_nbytes(t) for t in full)
        yield from ((engine_name(name), t) for (name, _), t in zip(bucket, full))
        del full  # release the gathered bucket before the next one is gathered


def sync_weights(model: torch.nn.Module, engine: Engine, bucket_mb: float = DEFAULT_BUCKET_MB,
                 dtype: torch.dtype | None = None) -> SyncStats:  # fmt: skip
    """Stream ``model``'s parameters into ``engine.update_weights`` in ``bucket_mb`` buckets."""
    start, counter = time.perf_counter(), _Counter()
    engine.update_weights(stream_weights(model, int(bucket_mb * 2**20), counter, dtype))
    return SyncStats(time.perf_counter() - start, counter.bytes, counter.buckets, counter.tensors)


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


@torch.no_grad()
def trainer_logprobs(policy: Policy, input_ids: Sequence[int], vision: Sequence[VisionInput] = ()) -> torch.Tensor:
    """``[L-1]`` log-probs of tokens 1.. of one sequence (images expanded) under the raw model.

    The inputs are the training forward's (``Policy.position_ids``, the images' patches through the
    vision tower, ``Policy.autocast``), but the logits are the raw model's: temperature 1 and no
    banned-token mask, which is what vLLM reports for prompt tokens.
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
    logp = torch.log_softmax(logits[0, :-1].float(), -1)
    return logp.gather(-1, ids[1:, None].to(logp.device))[:, 0].cpu()


def verify_sync(policy: Policy, engine, input_ids: Sequence[int], tolerance: float,
                vision: Sequence[VisionInput] = ()) -> SyncCheck:  # fmt: skip
    """Compare ``engine.score(input_ids, vision)`` with the trainer's at the tokens that are not image
    pads; raise ``StaleWeightsError`` if the mean absolute difference exceeds ``tolerance``.

    Pads are left out because training never scores one (off the loss mask, and banned); the vision
    tower still reaches every compared token after an image (first ``<|vision_end|>``, predicted from
    the last image token).
    """
    mine = trainer_logprobs(policy, input_ids, vision)
    scored = engine.score(input_ids, tuple(vision)) if vision else engine.score(input_ids)
    theirs = torch.tensor(scored, dtype=torch.float32)
    if theirs.shape != mine.shape:
        raise ValueError(f"engine scored {theirs.numel()} tokens of the probe, trainer {mine.numel()}")
    pad = getattr(policy.model.config, "image_token_id", None) if vision else None
    compared = torch.tensor(list(input_ids)[1:]) != pad if pad is not None else slice(None)
    diff = (mine - theirs).abs()[compared]
    check = SyncCheck(float(diff.mean()), float(diff.max()), diff.numel())
    if check.mean_abs_diff > tolerance:
        raise StaleWeightsError(
            f"engine and trainer disagree on the probe after a weight sync: mean |dlogp| "
            f"{check.mean_abs_diff:.3g} (max {check.max_abs_diff:.3g}) over {check.tokens} tokens > "
            f"tolerance {tolerance:g}; the engine is generating with stale or wrongly loaded weights"
        )
    return check


class WeightSync:
    """Sync, and every ``verify_every`` syncs prove it (for engines that can ``score``).

    Args:
        bucket_mb: size of the buckets the parameters are gathered and streamed in.
        dtype: cast to this before gathering and sending (``None``: the parameters' dtype). Use the
            engine's dtype (e.g. ``bfloat16`` for vLLM in bf16); an fp32 ``HFEngine`` copy needs fp32.
        verify_every: check after the 1st, (k+1)th, (2k+1)th ... sync; 0 never checks.
        tolerance: largest allowed mean |engine - trainer| log-prob on the probe (fp32 engines agree
            to ~1e-5; for a bf16 engine use ~0.05).
        probe_text: the fixed probe, encoded by ``probe_inputs`` (each ``IMAGE_MARKER`` is a generated
            image for a vision-language policy).
    """

    def __init__(self, bucket_mb: float = DEFAULT_BUCKET_MB, verify_every: int = 10, tolerance: float = 1e-3,
                 probe_text: str = PROBE_TEXT, dtype: DType | None = None) -> None:  # fmt: skip
        if verify_every < 0 or tolerance <= 0 or bucket_mb <= 0:
            raise ValueError("verify_every must be >= 0, tolerance and bucket_mb > 0")
        self.bucket_mb, self.verify_every, self.tolerance = bucket_mb, verify_every, tolerance
        self.dtype = getattr(torch, dtype) if dtype else None
        self.probe_text = probe_text
        self.syncs = 0
        self.last_check: SyncCheck | None = None

    def __call__(self, policy: Policy, engine: Engine) -> SyncStats:
        stats = sync_weights(policy.model, engine, self.bucket_mb, self.dtype)
        due = self.verify_every > 0 and self.syncs % self.verify_every == 0
        self.syncs += 1
        self.last_check = None
        if due and hasattr(engine, "score"):
            ids, vision = probe_inputs(policy, self.probe_text)
            self.last_check = verify_sync(policy, engine, ids, self.tolerance, vision)
        return stats

    def metrics(self, stats: SyncStats) -> dict[str, float]:
        """``sync/`` metrics of the last call (``sync/probe_diff`` only when it checked)."""
        out = {"sync/seconds": stats.seconds, "sync/bytes": float(stats.bytes), "sync/buckets": float(stats.buckets)}
        if self.last_check is not None:
            out["sync/probe_diff"] = self.last_check.mean_abs_diff
        return out
