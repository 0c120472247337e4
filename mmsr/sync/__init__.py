"""Weight sync from the trainer to the rollout engine: one call, one meaning, and proof that it landed.

Without it GRPO silently trains on rollouts of stale weights (peers' users hit exactly that: TRL
#5312, verl #2424), so the module calls it before every rollout and times it. ``mmsr.sync.stream``
moves the weights (a bucket of FSDP2 shards per collective); ``WeightSync`` adds, every
``verify_every`` syncs, the checks of ``mmsr.sync.probe``: the engine scores a fixed probe and
continues it greedily from its prefix cache, and both must equal the trainer's within ``tolerance``,
or ``StaleWeightsError`` stops the run: on every rank, when the probe failed on any.
"""

from __future__ import annotations

import torch

from mmsr.models.policy import Policy
from mmsr.rollout.engine import Engine
from mmsr.sync.probe import (
    PROBE_TEXT,
    StaleWeightsError,
    SyncCheck,
    agree,
    engine_dtype,
    probe_image,
    probe_inputs,
    sampling_probe,
    trainer_logprobs,
    verify_sampling,
    verify_sync,
    warm_probe,
)
from mmsr.sync.stream import (
    DEFAULT_BUCKET_MB,
    DType,
    SyncStats,
    engine_name,
    full_nbytes,
    gather,
    gather_bucket,
    stream_weights,
    sync_weights,
    weight_buckets,
)

__all__ = ["DEFAULT_BUCKET_MB", "PROBE_TEXT", "StaleWeightsError", "SyncCheck", "SyncStats", "WeightSync", "agree",
           "engine_dtype", "engine_name", "full_nbytes", "gather", "gather_bucket", "probe_image", "probe_inputs", "sampling_probe", "stream_weights",
           "sync_weights", "trainer_logprobs", "verify_sampling", "verify_sync", "warm_probe", "weight_buckets"]  # fmt: skip


class WeightSync:
    """Sync, and every ``verify_every`` syncs prove it (for engines that can ``score``): the probe is
    scored, and continued greedily from the prefix the engine cached right before the sync.

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
        if verify_every < 0 or not 0 < tolerance < float("inf") or not bucket_mb > 0:  # a NaN turned both checks off
            raise ValueError(f"verify_every must be >= 0, tolerance finite and > 0, bucket_mb > 0 (got {verify_every}, "
                             f"{tolerance}, {bucket_mb})")
        self.bucket_mb, self.verify_every, self.tolerance = bucket_mb, verify_every, tolerance
        self.dtype = getattr(torch, dtype) if dtype else None
        self.probe_text = probe_text
        self.syncs = 0
        self.last_check: SyncCheck | None = None
        self.last_sampling_check: SyncCheck | None = None

    def __call__(self, policy: Policy, engine: Engine) -> SyncStats:
        due = self.verify_every > 0 and self.syncs % self.verify_every == 0 and hasattr(engine, "score")
        cached = self.sampling_probe(policy, engine) if due else None
        if cached is not None:
            warm_probe(engine, *cached)  # its prefix cached with the weights the sync replaces
        stats = sync_weights(policy.model, engine, self.bucket_mb, self.dtype)
        self.syncs += 1
        self.last_check = self.last_sampling_check = None
        if cached is not None:
            self._verify(policy, engine, cached)
        return stats

    def sampling_probe(self, policy: Policy, engine: Engine) -> tuple[list[int], tuple]:
        """``sampling_probe`` within the engine's ``max_model_len`` and over its KV ``block_size``, where it has them."""
        limits = {name: getattr(engine, name) for name in ("max_model_len", "block_size") if getattr(engine, name, None)}
        return sampling_probe(policy, self.probe_text, **limits)

    def state_dict(self) -> dict[str, int]:
        """What a resumed run needs to probe at the syncs an uninterrupted one does: the count of syncs (a run resumed
        with it at 0 probed at its first step and then in another phase, and the probe's engine calls with it).
        ``last_check`` is not kept: the next sync, a resumed run's first act, resets it."""
        return {"syncs": self.syncs}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.syncs = int(state["syncs"])

    def _verify(self, policy: Policy, engine: Engine, cached: tuple[list[int], tuple]) -> None:
        """Both checks, then one verdict over ranks (``agree``). Every rank runs both whatever the first
        found: under FSDP2 the trainer's forward of each is a sequence of collectives."""
        error = None
        ids, vision = probe_inputs(policy, self.probe_text)
        try:
            self.last_check = verify_sync(policy, engine, ids, self.tolerance, vision)
        except StaleWeightsError as e:
            error = e
        try:
            self.last_sampling_check = verify_sampling(policy, engine, cached[0], self.tolerance, cached[1])
        except StaleWeightsError as e:
            error = error or e
        agree(error, policy.model.device)

    def metrics(self, stats: SyncStats) -> dict[str, float]:
        """``sync/`` metrics of the last call (``sync/probe_diff`` and ``sync/sampling_diff`` only
        when it checked)."""
        out = {"sync/seconds": stats.seconds, "sync/bytes": float(stats.bytes), "sync/buckets": float(stats.buckets)}
        if self.last_check is not None:
            out["sync/probe_diff"] = self.last_check.mean_abs_diff
        if self.last_sampling_check is not None:
            out["sync/sampling_diff"] = self.last_sampling_check.mean_abs_diff
        return out
