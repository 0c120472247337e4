"""Weight-sync behaviour no other fast test pinned (a mutation audit of ``mmsr/sync/``; the probe's cases joined
their twins in test_probe_counts and test_probe_fits_engine): the trainer's train mode after a verified sync, the
bucket budget over a whole bucket and a dtype change between buckets, the checkpoint names under wrapper modules,
which of two failed checks is reported, and the refused arguments."""


import pytest
import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from mmsr.sync import (StaleWeightsError, WeightSync, gather_bucket, stream_weights, sync_weights, verify_sampling,
                       weight_buckets)
from tests.test_sync import CopyEngine, perturb


class Received:
    """An engine with its own copy of the weights that keeps what a sync streamed into it, by name."""

    def __init__(self):
        self.tensors = {}

    def update_weights(self, named_tensors):
        self.tensors.update(named_tensors)


@pytest.mark.parametrize("train", [True, False])
def test_a_verified_sync_leaves_the_trainer_in_its_mode(trainer, train):
    """The probe's forwards run in eval mode; a trainer left there after the sync trains without dropout (and
    whatever else ``training`` switches) from then on, silently."""
    trainer.model.train(train)
    sync = WeightSync(verify_every=1)
    sync(trainer, CopyEngine(trainer))
    assert sync.last_check is not None and sync.last_sampling_check is not None  # both checks ran their forwards
    assert all(m.training == train for m in trainer.model.modules())


def test_the_bucket_budget_holds_over_the_whole_bucket():
    """Four 40-byte tensors, an 80-byte budget: two buckets of two. A budget checked against the last tensor only
    would put all four in one bucket, gathering twice the memory the user allowed."""
    named = [(f"t{i}", torch.zeros(10)) for i in range(4)]  # float32: 40 B each
    groups = [[n for n, _ in b] for b in weight_buckets(named, bucket_bytes=80)]
    assert groups == [["t0", "t1"], ["t2", "t3"]]


def test_wrapper_segments_leave_the_streamed_names():
    """Activation checkpointing, torch.compile and FSDP1 insert their wrappers' attributes into parameter names;
    the engine loads checkpoint names and knows none of them."""
    fsdp1, compiled = torch.nn.Module(), torch.nn.Module()
    fsdp1._fsdp_wrapped_module = torch.nn.Linear(3, 2)  # the attribute FSDP1 puts its wrapped module under
    compiled._orig_mod = torch.nn.Linear(2, 1)
    model = torch.nn.Sequential(checkpoint_wrapper(torch.nn.Linear(4, 3)), fsdp1, compiled)
    assert "0._checkpoint_wrapped_module.weight" in dict(model.named_parameters())  # the wrapper is in the name
    streamed = dict(stream_weights(model, bucket_bytes=2**20))
    assert list(streamed) == ["0.weight", "0.bias", "1.weight", "1.bias", "2.weight", "2.bias"]
    assert torch.equal(streamed["1.weight"], fsdp1._fsdp_wrapped_module.weight)


def test_a_dtype_change_starts_a_bucket_and_each_tensor_keeps_its_dtype(mesh):
    """A bucket of FSDP2 shards travels as one flat buffer: fp32 and bf16 shards concatenated into one would come
    back promoted to fp32, and the engine's bf16 weights loaded from fp32 tensors of another dtype."""
    named = [("a", torch.zeros(4)), ("b", torch.zeros(4, dtype=torch.bfloat16))]
    assert [[n for n, _ in b] for b in weight_buckets(named, bucket_bytes=2**20)] == [["a"], ["b"]]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2).to(torch.bfloat16))
    full = {k: v.detach().clone() for k, v in model.named_parameters()}
    for layer in model:
        fully_shard(layer, mesh=mesh)
    assert all(isinstance(p, DTensor) and p.placements == (Shard(0),) for p in model.parameters())
    engine = Received()
    stats = sync_weights(model, engine, bucket_mb=1)  # one bucket would hold them all but for the dtypes
    assert stats.buckets == 2 and stats.tensors == 4
    assert {k: v.dtype for k, v in engine.tensors.items()} == {k: v.dtype for k, v in full.items()}
    assert all(torch.equal(engine.tensors[k], full[k]) for k in full)


def test_a_bucket_of_shards_and_plain_tensors_is_gathered_tensor_by_tensor(mesh):
    """Only a bucket of row shards alone takes the one-collective path: a plain tensor has no mesh to gather on."""
    full = torch.arange(6.0).reshape(3, 2)
    out = gather_bucket([distribute_tensor(full, mesh, [Shard(0)]), torch.ones(2)])
    assert not any(isinstance(o, DTensor) for o in out)
    assert torch.equal(out[0], full) and torch.equal(out[1], torch.ones(2))


def test_when_both_checks_fail_the_scoring_error_is_raised(trainer, monkeypatch):
    """Both checks run whatever the first found (the forwards are collectives); the first failure is the report."""
    import mmsr.sync

    engine, sampled = CopyEngine(trainer, drop_updates=True), []
    perturb(trainer.model)

    def recorded(*args, **kwargs):
        try:
            return verify_sampling(*args, **kwargs)
        except StaleWeightsError as e:
            sampled.append(e)
            raise

    monkeypatch.setattr(mmsr.sync, "verify_sampling", recorded)
    with pytest.raises(StaleWeightsError, match=r"\(scoring\)"):
        WeightSync(verify_every=1)(trainer, engine)
    assert len(sampled) == 1  # the sampling check ran after the scoring one failed, and failed too


@pytest.mark.parametrize("verify_every, bucket_mb", [(-1, 1.0), (10, 0.0), (10, -1.0)])
def test_a_negative_interval_or_an_empty_bucket_is_refused(verify_every, bucket_mb):
    """A negative interval (a typo for a positive one) would turn the checks off silently, as only 0 is meant to;
    a bucket of 0 bytes or less gathers every tensor alone, a collective per parameter."""
    with pytest.raises(ValueError, match=r"verify_every must be >= 0, tolerance finite and > 0, bucket_mb > 0"):
        WeightSync(verify_every=verify_every, bucket_mb=bucket_mb)
