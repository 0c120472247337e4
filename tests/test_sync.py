"""Weight sync without vLLM: buckets, FSDP2-sharded parameters, and the stale-weights check."""

import copy
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from mmsr.models.policy import Policy
from mmsr.rollout.hf_engine import HFEngine
from mmsr.sync import (
    PROBE_TEXT,
    StaleWeightsError,
    WeightSync,
    engine_name,
    probe_inputs,
    stream_weights,
    sync_weights,
    trainer_logprobs,
    verify_sync,
    weight_buckets,
)


class CopyEngine:
    """An engine with its own copy of the weights (like vLLM), generating and scoring with that copy."""

    def __init__(self, policy: Policy, drop_updates: bool = False):
        self.copy = Policy(copy.deepcopy(policy.model), policy.tokenizer, policy.image_processor)
        self.drop_updates, self.calls, self.received = drop_updates, 0, []
        self.hf = HFEngine()
        self.hf.bind(self.copy)

    def generate(self, requests, sampling):
        return self.hf.generate(requests, sampling)

    def update_weights(self, named_tensors):
        params = dict(self.copy.model.named_parameters())
        self.calls += 1
        with torch.no_grad():
            for name, tensor in named_tensors:  # always consumed: a dropped sync still "runs"
                self.received.append(name)
                if not self.drop_updates:
                    params[name].copy_(tensor)

    def score(self, input_ids, vision=()):
        return trainer_logprobs(self.copy, input_ids, vision).tolist()


class SkipVision:
    """Forwards a sync without the vision tower's tensors (e.g. a name filter gone wrong)."""

    def __init__(self, engine):
        self.engine = engine

    def update_weights(self, named_tensors):
        self.engine.update_weights((name, t) for name, t in named_tensors if "visual." not in name)

    def score(self, input_ids, vision=()):
        return self.engine.score(input_ids, vision)

    def generate(self, requests, sampling):
        return self.engine.generate(requests, sampling)


@pytest.fixture
def trainer(tiny_policy):
    return Policy(copy.deepcopy(tiny_policy.model), tiny_policy.tokenizer, tiny_policy.image_processor)


def perturb(model, scale=0.05, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))


def test_buckets_respect_the_size_and_keep_order():
    named = [(f"t{i}", torch.zeros(n)) for i, n in enumerate([10, 10, 30, 5, 5, 5])]  # float32: 4 B each
    groups = [[n for n, _ in b] for b in weight_buckets(named, bucket_bytes=80)]
    # 40+40 fit; 120 alone (bigger than a bucket); 20+20+20 = 60 fit
    assert groups == [["t0", "t1"], ["t2"], ["t3", "t4", "t5"]]


def test_sync_streams_every_parameter_once_and_reports_bytes(trainer):
    engine = CopyEngine(trainer)
    perturb(trainer.model)
    params = dict(trainer.model.named_parameters())  # tied embeddings appear once
    stats = sync_weights(trainer.model, engine, bucket_mb=0.05)
    assert engine.calls == 1 and sorted(engine.received) == sorted(params)
    assert stats.bytes == sum(p.numel() * p.element_size() for p in params.values())
    assert stats.tensors == len(params) and stats.buckets > 3 and stats.seconds > 0
    for name, p in engine.copy.model.named_parameters():
        assert torch.equal(p, params[name])


def test_the_sync_metrics_report_the_bytes_streamed_to_an_engine_with_its_own_copy(trainer):
    engine = CopyEngine(trainer)
    sync = WeightSync(verify_every=0, bucket_mb=0.05)
    stats = sync(trainer, engine)
    streamed = sum(p.numel() * p.element_size() for p in trainer.model.parameters())
    metrics = sync.metrics(stats)
    assert metrics["sync/bytes"] == float(stats.bytes) == streamed > 0
    assert metrics["sync/buckets"] == stats.buckets > 3 and metrics["sync/seconds"] == stats.seconds


def test_wrapper_segments_are_stripped():
    name = "model._orig_mod.layers.0._checkpoint_wrapped_module.mlp.up_proj.weight"
    assert engine_name(name) == "model.layers.0.mlp.up_proj.weight"


def test_verification_passes_after_sync_and_catches_a_dropped_one(trainer):
    probe = trainer.tokenizer.encode("<|im_start|>user\nWhere is this?<|im_end|>\n", add_special_tokens=False)
    good = CopyEngine(trainer)
    perturb(trainer.model)
    with pytest.raises(StaleWeightsError, match="stale"):
        verify_sync(trainer, good, probe, tolerance=1e-3)  # never synced
    sync_weights(trainer.model, good)
    check = verify_sync(trainer, good, probe, tolerance=1e-3)
    assert check.max_abs_diff < 1e-5 and check.tokens == len(probe) - 1
    dropping = CopyEngine(trainer, drop_updates=True)  # e.g. weights sent while the engine slept
    perturb(trainer.model, seed=1)
    with pytest.raises(StaleWeightsError):
        WeightSync(verify_every=1)(trainer, dropping)


def test_verification_runs_at_its_interval(trainer):
    sync = WeightSync(verify_every=3, bucket_mb=1)
    engine = CopyEngine(trainer, drop_updates=True)
    checked = []
    for step in range(4):
        stats = sync(trainer, engine)  # weights unchanged so far: a check passes
        checked.append(sync.last_check is not None)
        assert ("sync/probe_diff" in sync.metrics(stats)) == checked[-1]
    assert checked == [True, False, False, True]
    perturb(trainer.model)
    sync(trainer, engine)  # 5th and 6th syncs are not checked: the dropped updates go unnoticed ...
    sync(trainer, engine)
    with pytest.raises(StaleWeightsError):
        sync(trainer, engine)  # ... until the 7th


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sharded_sync(rank: int, world: int, port: int) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        # 3 rows: uneven shards (2 + 1); 1 row: rank 1 holds an empty shard
        model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Linear(6, 3), torch.nn.Linear(3, 1))
        full = {k: v.clone() for k, v in model.named_parameters()}
        mesh = init_device_mesh("cpu", (world,))
        for layer in model:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        assert all(isinstance(p, DTensor) for p in model.parameters())
        gathers, real = [], dist.all_gather_single
        dist.all_gather_single = lambda *a, **k: gathers.append(1) or real(*a, **k)
        DTensor.full_tensor = None  # a per-parameter gather would now fail
        received = {}
        engine = type("E", (), {"update_weights": lambda self, it: received.update(it)})()
        stats = sync_weights(model, engine, bucket_mb=60 / 2**20)  # 60 bytes: several buckets
        assert received.keys() == full.keys() and stats.buckets == 4 and len(gathers) == stats.buckets
        assert all(torch.equal(received[k], full[k]) for k in full), "gathered tensors differ"
        assert stats.bytes == sum(v.numel() * 4 for v in full.values())
        half = sync_weights(model, engine, bucket_mb=1, dtype=torch.bfloat16)  # one bucket, sent in bf16
        assert half.buckets == 1 and len(gathers) == 5 and half.bytes == stats.bytes // 2
        assert all(torch.equal(received[k], full[k].bfloat16()) for k in full)
        dist.barrier()  # no rank tears gloo down while the other is still communicating
    finally:
        dist.destroy_process_group()
    # Passed: leave without interpreter teardown, where gloo's threads occasionally abort the
    # process ("terminate called without an active exception") after all the work is done.
    os._exit(0)


def test_fsdp2_sharded_parameters_are_gathered_once_per_bucket():
    """Two CPU ranks (gloo): every rank streams the full, unsharded tensors, with one all-gather per
    bucket (uneven and empty shards included), optionally cast to bf16 before they travel."""
    mp.spawn(_sharded_sync, args=(2, _free_port()), nprocs=2)


def test_stream_weights_yields_plain_tensors_detached(trainer):
    for name, tensor in stream_weights(trainer.model, 2**20):
        assert not tensor.requires_grad and not name.startswith("_")


def test_the_probe_holds_an_image_for_vision_policies_only(trainer):
    ids, vision = probe_inputs(trainer)
    assert len(vision) == 1 and ids.count(trainer.model.config.image_token_id) == vision[0].num_tokens > 1
    again_ids, again = probe_inputs(trainer)  # a generated image: the same probe every time
    assert again_ids == ids and torch.equal(again[0].pixel_values, vision[0].pixel_values)
    text_only = Policy(trainer.model, trainer.tokenizer, None)
    text_ids, no_images = probe_inputs(text_only)
    assert no_images == ()
    assert text_ids == trainer.tokenizer.encode(PROBE_TEXT.replace("<image>", ""), add_special_tokens=False)


def test_a_sync_that_skips_the_vision_tower_is_caught_by_the_probe_image(trainer):
    engine = CopyEngine(trainer)
    perturb(trainer.model)
    assert any("visual." in name for name, _ in trainer.model.named_parameters())
    with pytest.raises(StaleWeightsError, match="stale"):
        WeightSync(verify_every=1)(trainer, SkipVision(engine))
    # The language model did sync: a probe without the image cannot tell.
    text_ids, _ = probe_inputs(trainer, PROBE_TEXT.replace("<image>", ""))
    assert verify_sync(trainer, engine, text_ids, tolerance=1e-3).max_abs_diff < 1e-5
    sync = WeightSync(verify_every=1)
    sync(trainer, engine)  # a full sync passes
    ids, vision = probe_inputs(trainer)
    assert sync.last_check.max_abs_diff < 1e-5
    assert sync.last_check.tokens == len(ids) - 1 - vision[0].num_tokens  # every prediction but the pads


def test_a_bf16_sync_leaves_the_fp32_weights_of_an_engine_colocated_on_them(tiny_policy):
    """A colocated ``HFEngine`` generates with the trainer's own module: the sync sends nothing, where a bf16
    cast written back rounded the master weights (an lr-2e-6 update vanished); a separate copy still gets them."""
    from mmsr.rollout.hf_engine import HFEngine
    from mmsr.sync import WeightSync

    trainer = Policy(copy.deepcopy(tiny_policy.model), tiny_policy.tokenizer, tiny_policy.image_processor)
    perturb(trainer.model, scale=1e-6)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    colocated, separate = HFEngine(), HFEngine()
    colocated.bind(trainer)
    separate.bind(Policy(copy.deepcopy(tiny_policy.model), tiny_policy.tokenizer, tiny_policy.image_processor))
    sync = WeightSync(dtype="bfloat16", verify_every=0)
    assert sync(trainer, colocated).bytes == 0
    assert all(torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())
    assert sync(trainer, separate).bytes > 0
    for name, p in separate.policy.model.named_parameters():
        assert torch.equal(p, before[name].to(torch.bfloat16).float())


def _one_stale_rank(rank: int, world: int, port: int, trainer: Policy) -> None:
    import datetime

    import torch.distributed as dist

    torch.set_num_threads(1)  # two ranks on a shared 2-core machine
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        engine = CopyEngine(trainer, drop_updates=rank == 1)  # rank 1's engine misses the sync
        perturb(trainer.model)
        with pytest.raises(StaleWeightsError, match="stale" if rank == 1 else r"failed on rank\(s\) \[1\]"):
            WeightSync(verify_every=1)(trainer, engine)
        dist.barrier()  # both ranks got here: neither is left waiting for the other
    finally:
        dist.destroy_process_group()
    os._exit(0)  # as _sharded_sync: no interpreter teardown under gloo's threads


def test_a_probe_that_fails_on_one_rank_stops_every_rank(trainer):
    """Two CPU ranks (gloo), spawned: rank 1's engine is stale, rank 0's is current; both raise, where
    rank 0 used to return and wait in its next collective until the timeout."""
    # a model rebuilt from its config and weights pickles: the shared one can carry hooks other tests added (local
    # functions, e.g. enable_input_require_grads). Spawned, not forked: a forked child hung in torch in the suite.
    model = type(trainer.model)(trainer.model.config)
    model.load_state_dict(trainer.model.state_dict())
    clean = Policy(model, trainer.tokenizer, trainer.image_processor)
    mp.spawn(_one_stale_rank, args=(2, _free_port(), clean), nprocs=2)
