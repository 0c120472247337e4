"""The frozen reference model the KL term is measured against: the policy as it was at the start.

It is built once per run from the freshly built policy, before any checkpoint is restored (a resumed
run rebuilds the same reference), and kept out of the module's state dict. It is stored in the
compute dtype: for fp32 master weights with bf16 compute that halves its memory. Under FSDP2 it then
scores exactly as the step-0 policy (``MixedPrecisionPolicy`` gathers every parameter in bf16). On one
device or DDP (``bf16-mixed`` autocast) it does not: autocast casts only the matmuls' operands, the policy
keeps its embeddings, norms and residual stream in fp32 where the reference's are bf16, so the step-0
log-probs differ by bf16 rounding and ``train/kl`` starts slightly above 0 (~3e-7 on the CPU test model).

- One device / DDP: a full copy, on the device, or with ``offload`` in host memory (pinned when
  CUDA is there) and moved to the device only while it scores.
- FSDP2: sharded like the policy, so each rank holds ~1/world of it, and built without ever holding
  a full copy: the architecture is instantiated on the meta device, sharded, and filled with the
  policy's own shards; with ``offload`` its shards wait in host memory (FSDP2 CPU offload) and are
  gathered block by block onto the device while it scores.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.distributed.tensor import DTensor

from mmsr.parallel import copy_to, shard


class ReferenceModel:
    """A frozen model and where it waits between scorings.

    Args:
        model: the network (frozen, eval mode).
        device: where it computes.
        offload: unsharded and waiting in host memory (moved to ``device`` while scoring).
    """

    def __init__(self, model: torch.nn.Module, device: torch.device | str, offload: bool = False) -> None:
        self.model, self.device, self.offload = model, torch.device(device), offload

    @classmethod
    def copy_of(cls, policy_model: torch.nn.Module, dtype: torch.dtype, device: torch.device | str,
                offload: bool = False) -> ReferenceModel:  # fmt: skip
        """A full copy in ``dtype``, on ``device`` or (``offload``) in host memory with its buffers
        on ``device`` (they are small, and the rotary tables are computed where they live)."""
        model = copy_to(policy_model, dtype, "cpu" if offload else device)
        if offload:
            for buffer in model.buffers():
                buffer.data = buffer.data.to(device)
            if torch.cuda.is_available():  # pinned host memory: asynchronous, faster copies
                for p in model.parameters():
                    p.data = p.data.pin_memory()
        return cls(model, device, offload)

    @classmethod
    def sharded_like(cls, policy_model: torch.nn.Module, architecture: type[torch.nn.Module], mesh, dtype: torch.dtype,
                     device: torch.device | str, offload: bool = False) -> ReferenceModel:  # fmt: skip
        """FSDP2: ``architecture(policy_model.config)`` on the meta device, sharded over ``mesh``
        (CPU offload when ``offload``), then filled with the policy's current shards cast to ``dtype``.

        ``policy_model`` must already be sharded on ``mesh`` with the same blocks (``parallel.shard``),
        so every local shard has the same shape as the reference's; ``architecture`` is its class from
        before sharding (``fully_shard`` swaps the class of the module it wraps).
        """
        from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy

        with torch.device("meta"):
            model = architecture(policy_model.config).to(dtype)
        offload_policy = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if offload else OffloadPolicy()
        shard(model, mesh, offload_policy=offload_policy)
        model.to_empty(device="cpu" if offload else device)
        _copy_state(policy_model, model, device)
        return cls(model.eval().requires_grad_(False), device)

    @contextmanager
    def on_device(self) -> Iterator[torch.nn.Module]:
        """The model, ready to score on ``device`` (an offloaded unsharded copy visits it and goes
        back to its host storage, which is kept: no host allocation per step)."""
        if not self.offload:
            yield self.model
            return
        params = list(self.model.parameters())
        host = [p.data for p in params]
        for p in params:
            p.data = p.data.to(self.device, non_blocking=True)
        try:
            yield self.model
        finally:
            for p, h in zip(params, host):
                p.data = h


@torch.no_grad()
def _copy_state(source: torch.nn.Module, target: torch.nn.Module, device: torch.device | str) -> None:
    """Copy ``source``'s local parameter shards and its buffers into ``target`` (same layout)."""
    params = dict(source.named_parameters())
    for name, p in target.named_parameters():
        src = params[name]
        local = p.to_local() if isinstance(p, DTensor) else p
        local.copy_(src.to_local() if isinstance(src, DTensor) else src)
    buffers = dict(source.named_buffers())
    for name, b in target.named_buffers():
        b.data = buffers[name].detach().to(device).clone()
