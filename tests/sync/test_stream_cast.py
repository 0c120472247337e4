"""``gather_bucket`` off its one-collective path (DTensors that are not FSDP2 row shards): each tensor is cast to
the sync's dtype before it is all-gathered, so bf16 travels rather than the fp32 master weights (one gloo rank)."""

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from mmsr.sync import gather_bucket


def test_tensors_that_are_not_row_shards_travel_in_the_sync_dtype(mesh, monkeypatch):
    full = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))  # fp32 values that bf16 rounds
    tensors = [distribute_tensor(full, mesh, [Replicate()]), distribute_tensor(full, mesh, [Shard(1)])]
    sent, real = [], DTensor.full_tensor
    spy = lambda self, **k: sent.append((self.dtype, self.placements)) or real(self, **k)  # noqa: E731
    monkeypatch.setattr(DTensor, "full_tensor", spy)
    out = gather_bucket(tensors, torch.bfloat16)
    assert sent == [(torch.bfloat16, (Replicate(),)), (torch.bfloat16, (Shard(1),))]  # cast, layout kept
    assert [o.dtype for o in out] == [torch.bfloat16] * 2 and not any(isinstance(o, DTensor) for o in out)
    assert all(torch.equal(o, full.to(torch.bfloat16)) for o in out)  # = gathered in fp32, then cast
    assert all(torch.equal(o, full) for o in gather_bucket(tensors))  # no dtype: as they are
