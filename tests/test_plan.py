"""``mmsr plan``: per-GPU memory against numbers worked by hand for a tiny Qwen2.5-VL, the 7B recipes
on 80 GB GPUs, and the command line."""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from mmsr.plan import main
from mmsr.plan.config import ModelShape, RunSpec, world
from mmsr.plan.memory import GiB, plan
from mmsr.sync import DEFAULT_BUCKET_MB
from tests.conftest import FVQA, ROOT, subprocess_env
from tests.test_sync import _free_port

RECIPES = [ROOT / "configs" / "mmsearch_r1" / f"qwen2_5_vl_7b_{n}.yaml" for n in ("4x8", "1x8")]
TEXTS = [str(FVQA / "fvqa_dev.jsonl"), str(FVQA / "search" / "corpus.jsonl")]
# TinyQwen2_5_VL defaults: hidden 64, 2 layers, 4 heads of 16, 2 KV heads (kv dim 32), MLP 128, tied
# embeddings; vision: 1 block of 32, MLP 64, patch 14, merge 2.
TINY = f"""
trainer:
  devices: 2
  use_distributed_sampler: false
  strategy:
    class_path: lightning.pytorch.strategies.ModelParallelStrategy
    init_args: {{data_parallel_size: 2, tensor_parallel_size: 1}}
  precision: bf16-mixed
model:
  class_path: mmsr.module.GRPOModule
  init_args:
    policy:
      class_path: mmsr.models.build.TinyQwen2_5_VL
      init_args: {{tokenizer_texts: {json.dumps(TEXTS)}, scaffold: {{class_path: mmsr.demo.tokenizer.Scaffold}}}}
    engine:
      class_path: mmsr.rollout.vllm_engine.VLLMEngine
      init_args: {{dtype: bfloat16, max_model_len: 1024, gpu_memory_utilization: 0.5, enable_sleep_mode: true}}
    rollout: {{max_rounds: 3, max_tokens_per_turn: 128, max_context_tokens: 1024}}
    num_generations: 4
    kl_coef: 0.001
    ref_offload: false
    mini_batches: 2
    micro_batch_tokens: 4096
    gradient_checkpointing: true
data:
  train_files: [{FVQA / "fvqa_dev.jsonl"}]
  prompts_per_step: 3
"""


def run(capsys, *argv: str) -> dict:
    """``mmsr plan ... --json`` in-process: its JSON, whether or not the run fits."""
    try:
        main([*argv, "--json"])
    except SystemExit as e:
        assert e.code == 1
    return json.loads(capsys.readouterr().out)


def test_tiny_fsdp2_plan_is_the_hand_worked_arithmetic(tmp_path, capsys):
    from mmsr.demo.tokenizer import Scaffold
    from mmsr.models.build import TinyQwen2_5_VL

    (tmp_path / "tiny.yaml").write_text(TINY)
    out = run(capsys, "-c", str(tmp_path / "tiny.yaml"), "--gpu-gb", "2", "--overhead-gb", "0.125",
              "--vllm-overhead-gb", "0.25")  # fmt: skip
    V = len(TinyQwen2_5_VL(TEXTS, Scaffold()).train_tokenizer())  # the vocabulary is the trained tokenizer's
    # decoder layer: q 64*64+64, k and v 64*32+32 each, o 64*64, MLP 3*64*128, 2 norms of 64
    layer = 4160 + 2 * 2080 + 4096 + 24576 + 128  # = 37120
    # vision: patch conv 3*2*14*14*32; block: 2 norms 32, qkv 32*96+96, proj 32*32+32, gate and up 32*64+64
    # each, down 64*32+32; merger: norm 32, 128*128+128, 128*64+64
    patch, vblock, merger = 37632, 64 + 3168 + 1056 + 2 * 2112 + 2080, 32 + 16512 + 8256
    root = V * 64 + 64 + patch + merger  # tied embedding (once), final norm, patch embedding, merger
    P = root + 2 * layer + vblock
    assert out["params"] == {"total": P, "vision": patch + vblock + merger, "root": root, "largest_block": layer}
    m = out["memory"]["training"]
    assert m["params"] == m["grads"] == 4 * P // 2  # fp32, sharded over 2 ranks
    assert m["adamw"] == 2 * 4 * P // 2  # exp_avg + exp_avg_sq
    assert m["reference"] == 2 * P // 2  # bf16, sharded like the policy, on the GPU
    assert m["gathered_params"] == 2 * (root + 2 * layer)  # bf16: root + 2 blocks in flight
    # bf16: root + the block being reduce-scattered; fp32: the block before's reduce-scatter input
    assert m["unsharded_grads"] == 2 * (root + layer) + 4 * layer
    # per token and layer (sdpa: K and V at all 4 heads' width, 64): 2 bytes x (7*64 + 2*64 + 4*128) + 2 norms x
    # 4 bytes x 64 = 2688; checkpointed: 2 layer inputs 2*64*2 bytes + one layer recomputed + final norm
    # (4 + 2*2) * 64, x 4096 tokens
    assert m["activations"] == 4096 * (2 * 64 * 2 + 2688 + 8 * 64)
    # a mini-batch of 6 episodes may share one micro-batch, one image each at 112*112 px = 16 tokens = 64 patches:
    # 384 patches (vision: 1 block of 32, 2 heads of 16, gated MLP 64; merged features 64 wide). Per patch, bf16:
    # the block saves 2*(11*32 + 4*64) + 2 norms' fp32 input and 1/rms 2*(4*32 + 4) + log-sum-exp 4*2 = 1488, its
    # backward adds max(MLP 2*(32 + 2*64), norm 5*4*32 + 2*32 - 2*4*64) = 320 (more than the merger's
    # 4*32 + 4 + max(6*2*32, 2*32 + 704) = 900); block input 32*2; once: cos, sin 2*4*16, four int64 indices, the
    # patch embedding's input 2*3*2*14*14, merged features and their grad 2*2*64/4
    assert m["vision_activations"] == 384 * (1488 + 320 + 64 + 128 + 32 + 2352 + 64)
    # bf16 logits and their grad, [4096, V] each, + three fp32 [512, V] chunks
    assert m["logits"] == 2 * 2 * 4096 * V + 3 * 4 * 512 * V
    # shared prefixes in packed rows (FSDP2, sdpa): the bool mask of at most 4096^2 pairs and the recomputed
    # layer's bf16 additive bias
    assert m["packed_mask"] == 4096**2 * (1 + 2)
    assert m["engine"] == 0  # vLLM asleep
    assert m["overhead"] == GiB // 8
    r = out["memory"]["rollout"]
    assert r["engine"] == GiB  # 0.5 x 2 GiB
    # the sync probe's forward: bf16 root + 2 blocks, and [749, V] logits (511 + 230 bytes of probe text + 8 greedy
    # tokens) in bf16, float32 and float32 again; smaller than a bucket's gather: its flat input (1/2 of the fp32
    # bucket), the gathered buffer and the tensors cut out of it (the largest tensor, V x 64 x 4 bytes, less)
    probe = 2 * (root + 2 * layer) + 749 * V * (2 + 4 + 4)
    bucket = int(DEFAULT_BUCKET_MB * 2**20)
    assert r["weight_sync"] == 2 * bucket + bucket // 2 > probe
    e = out["engine"]
    assert e["weights"] == 2 * P  # bf16, tp 1
    assert e["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 2  # K and V x 2 layers x 2 KV heads x 16 dims x bf16
    assert e["kv_cache"] == GiB - 2 * P - GiB // 4
    assert e["kv_tokens"] == e["kv_cache"] // 256 and e["contexts"] == e["kv_tokens"] // 1024
    # fp32 (no sync dtype set), half of it all-gathered from the other rank
    assert out["weight_sync"] == {"bytes_per_step": 4 * P, "all_gather_received_per_rank": 4 * P // 2,
                                  "buffer": 2 * bucket + bucket // 2, "probe_forward": probe}  # fmt: skip
    t = out["tokens"]
    # 3 prompts x 4 samples; <= 1024 context tokens and 3 rounds x 128 sampled tokens per episode
    assert t["per_rank"] == {"prompts": 3, "episodes": 12, "context_tokens": 12 * 1024, "sampled_tokens": 12 * 384}
    assert t["total"]["episodes"] == 24 and t["updates_per_step"] == 2
    assert (t["episodes_per_update"], t["episodes_per_micro_batch"], t["micro_batches_per_update"]) == (6, 4, 2)
    assert out["peak"] == r["total"] == sum(v for k, v in r.items() if k != "total") and out["fits"]


def test_unsharded_plan_counts_full_copies():
    """One device, fp32 params with bf16 autocast, offloaded reference, HF engine (hand-made shape)."""
    shape = ModelShape(params=1000, vision_params=0, root_params=200, block_params=400, largest_param=100, layers=2,
                       hidden=8, kv_heads=1, head_dim=4, intermediate=16, vocab=50)  # fmt: skip
    spec = RunSpec(world_size=1, fsdp=False, param_dtype="float32", compute_dtype="bfloat16", kl=True,
                   ref_offload=True, gradient_checkpointing=False, micro_batch_tokens=10, engine="hf",
                   engine_dtype="bfloat16", gpu_memory_utilization=0.5, tp=1, sleep_mode=False, max_model_len=64,
                   hf_batch=2, sync_dtype="float32", bucket_mb=1.0, prompts_per_rank=1, num_generations=2,
                   max_rounds=3, max_tokens_per_turn=8, max_context_tokens=32, mini_batches=1, ppo_epochs=1,
                   max_pixels=0)  # fmt: skip
    out = plan(shape, spec, gpu_gib=1.0, overhead_gib=0.0)
    m = out["memory"]["training"]
    assert (m["params"], m["grads"], m["adamw"]) == (4000, 4000, 8000)  # unsharded fp32
    assert (m["reference"], m["reference_scoring"]) == (0, 2000)  # host memory; a full bf16 copy while it scores
    assert (m["gathered_params"], m["unsharded_grads"]) == (2000, 0)  # autocast's bf16 weight cache
    # an episode at the context bound (32 tokens) goes alone in a micro-batch (budget 10): T = 32
    # 2 layers x 32 tokens x (2 x (7*8 + 2*8 + 4*16) + 2*4*8 + autocast's float32 normalized inputs 2*2*8 and 3 more
    # bf16 casts 3*2*8) + final norm (4 + 4 + 2) * 8 * 32; sdpa: K and V at full width (8)
    assert m["activations"] == 2 * 32 * (272 + 64 + 32 + 48) + 2560
    assert m["logits"] == 2 * 2 * 32 * 50 + 3 * 4 * 32 * 50
    assert m["packed_mask"] == 0  # packed_rows unset (run_spec sets it on a GPU, checkpointed or under FSDP2)
    # HF engine: the trainer's module (no copy), autocast cache 2000 + KV 2 contexts x 32 tokens x (2*2*1*4*2 bytes)
    assert out["memory"]["rollout"]["engine"] == 2000 + 2 * 32 * 32 and out["memory"]["rollout"]["weight_sync"] == 0
    # it generates with the trainer's module: the sync sends it nothing (``sync_weights``)
    assert out["weight_sync"]["bytes_per_step"] == out["weight_sync"]["all_gather_received_per_rank"] == 0


# Hand-made shape and run for the terms below: 2 layers of hidden 8 (2 heads of 4, one KV head), MLP 16, V = 50;
# a vision tower of one block of 4 (2 heads of 2, gated MLP 8), 4 patches per LM token, 784 pixels per LM token,
# 12 values a patch.
SHAPE = ModelShape(params=1000, vision_params=0, root_params=200, block_params=400, largest_param=100, layers=2,
                   hidden=8, kv_heads=1, head_dim=4, intermediate=16, vocab=50, vision_layers=1, vision_hidden=4,
                   vision_intermediate=8, vision_heads=2, patches_per_token=4, patch_pixels=784,
                   patch_values=12)  # fmt: skip


def spec(**changes) -> RunSpec:
    """FSDP2 over 2 ranks, fp32 params, bf16 compute, checkpointed, flash-attention 2, vLLM (probe never checked),
    16-token micro-batches, 12-token episodes, 2 prompts x 4 generations in one mini-batch, no image."""
    base = RunSpec(world_size=2, fsdp=True, param_dtype="float32", compute_dtype="bfloat16", kl=False,
                   ref_offload=False, gradient_checkpointing=True, micro_batch_tokens=16, engine="vllm",
                   engine_dtype="bfloat16", gpu_memory_utilization=0.5, tp=1, sleep_mode=True, max_model_len=12,
                   hf_batch=2, sync_dtype="bfloat16", bucket_mb=1e-6, prompts_per_rank=2, num_generations=4,
                   max_rounds=1, max_tokens_per_turn=4, max_context_tokens=12, mini_batches=1, ppo_epochs=1,
                   max_pixels=0, attention="flash_attention_2")  # fmt: skip
    return replace(base, **changes)


@pytest.mark.parametrize("verify_every, engine", [(10, "vllm"), (0, "vllm"), (10, "hf")])
def test_the_sync_probes_trainer_forward_is_a_rollout_term(verify_every, engine):
    """Right after a sync, vLLM awake, the probe's trainer forward holds FSDP2's bf16 root + 2 blocks and its
    [L, V] logits in bf16, float32 and float32 again (index_fill): L = 511 + 10 bytes of text + 8 greedy tokens.
    The bucket (1 byte; the largest tensor, 100 x 2 bytes, gathered from halves of 100) is freed before it: the
    larger of the two counts. Only engines that score are probed (vLLM), and only with verify_every > 0."""
    out = plan(SHAPE, spec(verify_every=verify_every, engine=engine, probe_text="<image>0123456789"), gpu_gib=1.0)
    probe = (200 + 2 * 400) * 2 + (511 + 10 + 8) * 50 * (2 + 4 + 4)
    expected = probe if (verify_every, engine) == (10, "vllm") else 300
    r = out["memory"]["rollout"]
    assert r["weight_sync"] == expected and out["weight_sync"]["buffer"] == 300
    assert r["total"] == r["params"] + r["adamw"] + r["reference"] + r["engine"] + expected + r["overhead"]


def test_the_sync_probe_without_fsdp2_runs_on_autocasts_weight_cache():
    """One process with fp32 weights: the probe's forward caches a bf16 copy of every weight (autocast)."""
    out = plan(SHAPE, spec(fsdp=False, world_size=1, verify_every=1, probe_text="ab"), gpu_gib=1.0)
    assert out["memory"]["rollout"]["weight_sync"] == 1000 * 2 + (511 + 2 + 8) * 50 * (2 + 4 + 4)


class PlainLiveBytes(TorchDispatchMode):
    """``peak``: the most bytes of plain tensors' storage, allocated by ops run under the mode, alive after any one
    op; ``known`` storages (the shards that exist before) count 0, and a DTensor, whose ops the mode sees too,
    holds its shard's storage, no storage of its own."""

    def __init__(self, known: list[torch.Tensor]) -> None:
        super().__init__()
        self.live = {StorageWeakRef(t.untyped_storage()).cdata: (StorageWeakRef(t.untyped_storage()), 0) for t in known}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and not isinstance(t, DTensor):  # views share a storage: counted once
                ref = StorageWeakRef(t.untyped_storage())
                self.live.setdefault(ref.cdata, (ref, t.untyped_storage().nbytes()))
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out


def _gather_peaks(rank: int, world: int, port: int, out: Path) -> None:
    """Rank 0 writes the peak bytes ``gather_bucket`` held for a 2 MiB bucket of 8 tensors of 512 x 256 and for a
    tensor of 4096 x 256 that goes alone past a 1 MiB bucket (fp32 row shards, gathered in bf16)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from mmsr.sync.stream import gather_bucket, weight_buckets

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mesh, peaks = init_device_mesh("cpu", (world,)), {}
        for case, rows, count, mb in (("bucket", 512, 8, 2), ("alone", 4096, 1, 1)):
            params = [distribute_tensor(torch.randn(rows, 256), mesh, [Shard(0)]) for _ in range(count)]
            (bucket,) = weight_buckets([(str(i), p) for i, p in enumerate(params)], mb * 2**20, torch.bfloat16)
            with PlainLiveBytes([p.to_local() for p in params]) as mode:
                full = gather_bucket([p for _, p in bucket], torch.bfloat16)
            assert [f.shape for f in full] == [(rows, 256)] * count
            peaks[case] = mode.peak
        if rank == 0:
            out.write_text(json.dumps(peaks))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    os._exit(0)  # as tests/test_sync.py: no interpreter teardown under gloo's threads


def test_the_sync_buffer_bounds_what_gather_bucket_holds_on_two_ranks(tmp_path):
    """What ``sync_buffer`` counts, measured: a bucket of several tensors holds its flat input (B/2), the gathered
    [2, L] buffer (B) and every tensor copied out of it (B: ``reshape`` of a column slice) at once; a tensor that
    goes alone is a view of its buffer (T + T/2). The plan counted one bucket (B): 2.5x too little."""
    from mmsr.plan.memory import sync_buffer

    mp.spawn(_gather_peaks, args=(2, _free_port(), tmp_path / "peaks.json"), nprocs=2)
    measured = json.loads((tmp_path / "peaks.json").read_text())
    for case, largest, mb in (("bucket", 512 * 256, 2), ("alone", 4096 * 256, 1)):
        planned = sync_buffer(replace(SHAPE, largest_param=largest), spec(bucket_mb=mb))
        assert measured[case] <= planned <= 1.05 * measured[case], (case, measured[case], planned)


@pytest.mark.parametrize("budget, image_tokens", [(16, 16), (1000, 80)])
def test_vision_activations_count_every_image_a_micro_batch_can_hold(budget, image_tokens):
    """The packing can put a whole mini-batch (8 episodes, 2 groups' question images here) in one micro-batch,
    not budget // context = 1 episode's: the images of 8 episodes, 10 tokens each at max_pixels (80 tokens), or
    as many as the micro-batch's 16 tokens can hold. Per patch (4 per token), bf16: block input 4 x 2 bytes, the
    block's saved 2 x (11*4 + 4*8) + 2 norms x (4*4 + 4) + 4 x 2 heads = 200 and its backward's
    max(2 x (4 + 2*8), 5*4*4 + 2*4 - 2*4*8) = 40; once: cos and sin 2 x 4 x 2, four int64 indices, the patch
    embedding's input 2 x 12, the merged features (8 wide) and their grad 2 x 2 x 8 / 4."""
    out = plan(SHAPE, spec(micro_batch_tokens=budget, max_pixels=784 * 10), gpu_gib=1.0)
    assert out["memory"]["training"]["vision_activations"] == image_tokens * 4 * (8 + 200 + 40 + 16 + 32 + 24 + 8)


def test_an_uneven_mini_batch_split_plans_its_larger_part():
    """3 prompts x 3 generations in 2 mini-batches: ``tensor_split`` (``mmsr.train.update``) gives 5 and 4
    episodes, so the images of 5 (10 tokens each at max_pixels, under the 1000-token budget) are planned, not
    9 // 2 = 4's. 4 patches a token, 328 bytes a patch (the test above)."""
    assert [len(part) for part in torch.arange(9).tensor_split(2)] == [5, 4]
    run_spec = spec(micro_batch_tokens=1000, max_pixels=784 * 10, prompts_per_rank=3, num_generations=3, mini_batches=2)
    out = plan(SHAPE, run_spec, gpu_gib=1.0)
    assert out["tokens"]["episodes_per_update"] == 5
    assert out["memory"]["training"]["vision_activations"] == 5 * 10 * 4 * 328


def test_vision_activations_count_every_image_of_an_episode():
    """2 images an episode (the question's and a tool's): 8 episodes x 2 x 10 tokens = 160 of the 1000-token
    budget, 4 patches a token, 328 bytes a patch (the test above), twice one image's 80 tokens."""
    out = plan(SHAPE, spec(micro_batch_tokens=1000, max_pixels=784 * 10, images_per_episode=2), gpu_gib=1.0)
    assert out["memory"]["training"]["vision_activations"] == 160 * 4 * 328


@pytest.mark.parametrize("sleep_mode, training", [(True, 0), (False, GiB // 2)])
def test_vllm_holds_its_memory_through_training_unless_it_sleeps(sleep_mode, training):
    """vLLM takes 0.5 x 1 GiB in the rollout; asleep (level 1) it frees it for training, awake it keeps it."""
    m = plan(SHAPE, spec(sleep_mode=sleep_mode), gpu_gib=1.0)["memory"]
    assert m["rollout"]["engine"] == GiB // 2 and m["training"]["engine"] == training


def test_a_run_with_a_problem_does_not_fit_under_any_peak():
    """vLLM's 0.5 x 1 GiB less its 0.6 GiB allowance and 1000 x 2 bytes of bf16 weights leaves a negative KV
    cache: not one 12-token context, so vLLM cannot start, though the peak (that 0.5 GiB and a few KB) is under
    the GPU."""
    out = plan(SHAPE, spec(), gpu_gib=1.0, overhead_gib=0.0, vllm_allowance_gib=0.6)
    assert out["engine"]["kv_cache"] == GiB // 2 - int(0.6 * GiB) - 2000 and out["engine"]["kv_tokens"] == 0
    assert out["peak"] <= out["gpu_bytes"] and len(out["problems"]) == 1
    assert out["problems"][0].startswith("vLLM's KV cache (-0.1 GiB = 0 tokens) cannot hold one max_model_len")
    assert not out["fits"]


@pytest.mark.parametrize("param_dtype, reduce", [("float32", 400 * 4), ("bfloat16", 0)])
def test_fsdp2_counts_the_float32_reduce_scatter_input(param_dtype, reduce):
    """Gathering in bf16 below fp32 params, FSDP2 reduces in fp32: the block before's grads, copied to a fp32
    reduce-scatter input, are alive through this block's backward (``mmsr.parallel.mixed_precision``; none
    when params and compute share a dtype)."""
    out = plan(SHAPE, spec(param_dtype=param_dtype), gpu_gib=1.0)
    assert out["memory"]["training"]["unsharded_grads"] == (200 + 400) * 2 + reduce


@pytest.mark.parametrize("fsdp, per_token", [(True, 2 * 8 * 2 + 320 + (4 + 2 + 2) * 8),
                                             (False, 2 * 8 * 4 + 320 + 2 * 2 * 8 + 3 * 2 * 8 + (4 + 4 + 2) * 8)])
def test_autocast_keeps_the_residual_stream_in_float32(fsdp, per_token):
    """16 tokens, checkpointed, flash-attention 2 (K and V at the KV head's width, 4). A layer saves
    2 x (7*8 + 2*4 + 4*16) + 2 norms x 4 x 8 = 320 bytes a token in bf16. Under FSDP2 the layers' inputs are bf16
    (gathered bf16 weights); under autocast with fp32 params they are fp32 (4 bytes), as are each norm's
    normalized input (2 x 2 bytes more) and the final norm's, and q, k, v and gate, up each save their own bf16
    cast of the norm's fp32 output (3 more than one shared)."""
    out = plan(SHAPE, spec(fsdp=fsdp, world_size=2 if fsdp else 1), gpu_gib=1.0)
    assert out["memory"]["training"]["activations"] == 16 * per_token


@pytest.mark.parametrize("attention, kv_width", [("flash_attention_2", 4), ("sdpa", 8), ("eager", 8), ("auto", 8)])
def test_k_and_v_are_saved_at_every_heads_width_but_with_flash_attention(attention, kv_width):
    """sdpa given a mask (packed rows, padded rows) and eager expand K and V to all heads (``repeat_kv``) before
    they are saved: 2 x (7*8 + 2*kv_width + 4*16) + 2*4*8 bytes a token for the recomputed layer. ``auto`` is
    planned as sdpa (what it falls back to without flash-attn)."""
    out = plan(SHAPE, spec(attention=attention), gpu_gib=1.0)
    layer = 2 * (7 * 8 + 2 * kv_width + 4 * 16) + 2 * 4 * 8
    assert out["memory"]["training"]["activations"] == 16 * (2 * 8 * 2 + layer + (4 + 2 + 2) * 8)


def text_layer_model(family: str, h: int, heads: int, kv_heads: int, inter: int, dtype: torch.dtype):
    """A one-layer Qwen2.5-VL or Qwen3-VL language model (sdpa; Qwen3-VL's per-head q and k norms)."""
    if family == "qwen3_vl":
        from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLTextConfig as Config
        from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextModel as Model

        rope = {"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True}
        extra = {"head_dim": h // heads}
    else:
        from transformers import Qwen2_5_VLTextConfig as Config
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLTextModel as Model

        rope, extra = {"type": "mrope", "mrope_section": [2, 3, 3]}, {}
    config = Config(hidden_size=h, num_attention_heads=heads, num_key_value_heads=kv_heads, intermediate_size=inter,
                    num_hidden_layers=1, vocab_size=100, rope_scaling=rope, **extra)  # fmt: skip
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return Model(config).to(dtype)


@pytest.mark.parametrize("autocast", [False, True], ids=["bf16_residual", "autocast_fp32_residual"])
@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "4d_mask"])
@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_a_decoder_layer_saves_no_more_than_planned(family, masked, autocast):
    """What ``lm_layer_bytes`` counts, measured: the bytes a Qwen2.5-VL or Qwen3-VL decoder layer (sdpa, GQA 4:1)
    saves for backward per token (the difference of 512 and 256 tokens, so weights and autocast's weight cache drop
    out), with bf16 weights and residual (FSDP2) or fp32 ones under bf16 autocast (one process), with and without
    the 4-D mask of packed or padded rows (which makes sdpa repeat K and V to every head), on the shape
    ``model_shape`` reads off the model. The plan bounds each within 3%, or by K and V at full width more where no
    mask lets sdpa take them at the KV heads' width. It counted 6016 bytes (K and V at the KV heads' width, bf16
    norms): 6248 and 7592 were saved with the mask, 7208 under autocast without it. It planned Qwen3-VL's layers as
    Qwen2's: 1000 bytes (its q and k norms', 1/7 of the layer) more were saved."""
    from mmsr.plan.config import model_shape
    from mmsr.plan.memory import lm_layer_bytes

    h, heads, kv_heads, inter = 128, 8, 2, 384  # none of them 256 or 512 tokens: only the mask is [.., T, T]
    model = text_layer_model(family, h, heads, kv_heads, inter, torch.float32 if autocast else torch.bfloat16)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def saved(T: int) -> int:
        x = torch.randn(1, T, h, dtype=next(model.parameters()).dtype, requires_grad=True)
        pos = torch.arange(T)[None].expand(3, 1, T)
        mask = torch.ones(1, 1, T, T, dtype=torch.bool).tril() if masked else None
        storages = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in weights and t.shape[-2:] != (T, T):  # the mask is packed_mask's
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.layers[0](x, attention_mask=mask, position_embeddings=model.rotary_emb(x, pos), position_ids=pos)
        return sum(storages.values())

    measured = (saved(512) - saved(256)) // 256
    shape = model_shape(model)
    assert (shape.hidden, shape.kv_heads, shape.head_dim, shape.intermediate) == (h, kv_heads, h // heads, inter)
    planned = lm_layer_bytes(shape, spec(fsdp=not autocast, attention="sdpa"))
    unmasked_gqa = 0 if masked else 2 * 2 * (h - kv_heads * h // heads)  # sdpa without a mask takes K, V unexpanded
    assert measured <= planned <= 1.03 * measured + unmasked_gqa


def test_qwen3_vl_layers_are_planned_with_their_q_and_k_norms():
    """``model_shape`` finds Qwen3-VL-8B's per-head q and k norms on its meta model (32 heads, 8 KV heads of 128),
    not in Qwen2.5-VL-7B's, nor in a vision tower: each adds (4 + 2) x (32 + 8) x 128 + 4 x (32 + 8) bytes a token
    to a layer's saved tensors in bf16."""
    from mmsr.plan.config import meta_model, model_shape, pretrained_config
    from mmsr.plan.memory import qk_norm_bytes

    qwen3, qwen2_5 = (model_shape(meta_model(pretrained_config(name)))
                      for name in ("Qwen/Qwen3-VL-8B-Instruct", "Qwen/Qwen2.5-VL-7B-Instruct"))  # fmt: skip
    assert (qwen3.qk_norm, qwen3.heads, qwen3.kv_heads, qwen3.head_dim) == (True, 32, 8, 128)
    assert qk_norm_bytes(qwen3, 2) == 6 * 40 * 128 + 4 * 40 == 30880
    assert (qwen2_5.qk_norm, qwen2_5.heads) == (False, 28) and qk_norm_bytes(qwen2_5, 2) == 0


def vision_tower(family: str, depth: int, hidden: int, heads: int, intermediate: int, dtype: torch.dtype):
    """A real Qwen2.5-VL (windows of 8x8 patches, the last block full) or Qwen3-VL (deepstack after blocks 1 and 2)
    vision tower, sdpa, merged features 48 wide, in train mode."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (Qwen2_5_VisionTransformerPretrainedModel,
                                                                    Qwen2_5_VLVisionConfig)  # fmt: skip
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionConfig, Qwen3VLVisionModel

    dims = dict(depth=depth, hidden_size=hidden, num_heads=heads, intermediate_size=intermediate, out_hidden_size=48)
    if family == "qwen2_5_vl":
        config = Qwen2_5_VLVisionConfig(**dims, window_size=112, fullatt_block_indexes=[depth - 1])
    else:
        config = Qwen3VLVisionConfig(**dims, deepstack_visual_indexes=[1, 2], num_position_embeddings=64)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    tower = (Qwen2_5_VisionTransformerPretrainedModel if family == "qwen2_5_vl" else Qwen3VLVisionModel)(config)
    return tower.to(dtype).train()


def tower_peak(tower, grid: torch.Tensor, autocast: bool) -> int:
    """The most bytes alive at once over ``tower``'s forward and backward (``LiveBytes``), less its weights, their
    grads (FSDP2's terms: each is dropped once accumulated) and, unless float32 (then what the patch embedding
    saves), the float32 pixel values, which the policy's forward lets go of before the backward."""
    from torch.multiprocessing.reductions import StorageWeakRef

    from tests.train.test_update_memory import LiveBytes

    for p in tower.parameters():
        p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
    config, dtype = tower.config, tower.dtype
    values = config.in_channels * config.temporal_patch_size * config.patch_size**2
    pixels, mode = torch.randn(int(grid.prod(-1).sum()), values), LiveBytes()
    for t in [*tower.parameters(), *tower.buffers(), *([pixels] if autocast or dtype != torch.float32 else [])]:
        mode.live[StorageWeakRef(t.untyped_storage()).cdata] = (StorageWeakRef(t.untyped_storage()), 0)
    with mode:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = tower(pixels, grid_thw=grid)
        outputs = [out.pooler_output, *(getattr(out, "deepstack_features", None) or [])]
        del out  # its last_hidden_state: the policy keeps the merged features only
        torch.autograd.backward(outputs, [torch.ones_like(o) for o in outputs])
    return mode.peak


# (family, depth, hidden, heads, MLP, image grids in patches): two Qwen2.5-VL towers, one Qwen3-VL
TOWERS = {"qwen2_5_vl_4x64": ("qwen2_5_vl", 4, 64, 4, 160, [[1, 32, 48]]),
          "qwen2_5_vl_3x128": ("qwen2_5_vl", 3, 128, 8, 256, [[1, 32, 32], [1, 16, 24]]),
          "qwen3_vl_4x64": ("qwen3_vl", 4, 64, 4, 160, [[1, 32, 32]])}  # fmt: skip


@pytest.mark.parametrize("checkpointed", [True, False], ids=["checkpointed", "not_checkpointed"])
@pytest.mark.parametrize("dtypes", ["float32", "fsdp2_bf16", "autocast"])
@pytest.mark.parametrize("tower_name", TOWERS)
def test_vision_activations_bound_the_measured_peak_of_a_real_tower(tower_name, dtypes, checkpointed):
    """What ``vision_activations`` counts, measured: the peak of a real vision tower's forward and backward on CPU,
    float32, in bf16 (FSDP2's gathered weights) and under bf16 autocast over float32 weights (one process), with
    and without checkpointing. The plan is never below it, and within 25% for Qwen2.5-VL (the recipe's tower) in
    float32, bf16 and autocast (whose bf16 weight copies the plan counts apart), within 30% for Qwen3-VL (its
    LayerNorms counted as RMSNorms). It planned 0.45-0.89x of these peaks, 0.49-0.59x checkpointed for Qwen2.5-VL:
    the whole qkv output (v is a view of it) and the rotated q and k, the backward's grads, the merger, the rotary
    tables and the patch embedding's input were not counted."""
    from mmsr.plan.config import vision_dims
    from mmsr.plan.memory import image_tokens_per_micro_batch, vision_activations

    family, *dims, grids = TOWERS[tower_name]
    tower = vision_tower(family, *dims, torch.bfloat16 if dtypes == "fsdp2_bf16" else torch.float32)
    if checkpointed:
        tower.gradient_checkpointing_enable()
    grid = torch.tensor(grids)
    measured = tower_peak(tower, grid, autocast=dtypes == "autocast")
    shape = ModelShape(params=0, vision_params=0, root_params=0, block_params=0, largest_param=0, layers=1, hidden=48,
                       kv_heads=1, head_dim=1, intermediate=1, vocab=1, **vision_dims(tower.config, tower))  # fmt: skip
    tokens = int(grid.prod(-1).sum()) // shape.patches_per_token  # one micro-batch holding these images
    run = spec(gradient_checkpointing=checkpointed, micro_batch_tokens=tokens, max_context_tokens=tokens,
               max_pixels=shape.patch_pixels * tokens, compute_dtype="float32" if dtypes == "float32" else "bfloat16",
               **(dict(fsdp=False, world_size=1) if dtypes == "autocast" else {}))  # fmt: skip
    assert image_tokens_per_micro_batch(shape, run) == tokens
    planned = vision_activations(shape, run)
    if dtypes == "autocast":  # its bf16 copy of every weight: the plan's gathered_params ("autocast weight cache")
        planned += 2 * sum(p.numel() for p in tower.parameters())
    assert measured <= planned <= (1.3 if family == "qwen3_vl" else 1.25) * measured


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_7b_recipes_fit_80gb(recipe, capsys):
    out = run(capsys, "-c", str(recipe))  # the default GPU: an 80 GB card, 79.1 GiB as CUDA reports it
    assert abs(out["params"]["total"] - 8.29e9) < 0.01 * 8.29e9  # 7B language model + 0.67B vision tower
    assert out["fits"] and out["peak"] <= 79.1 * GiB and out["engine"]["contexts"] >= 1
    assert out["strategy"] == "fsdp2" and (out["dtypes"]["param"], out["dtypes"]["compute"]) == ("float32", "bfloat16")


@pytest.mark.parametrize("nodes", ["1x8", "4x8"])
def test_qwen3_vl_8b_recipes_fit_80gb(nodes, capsys):
    """Sized from the known Qwen3-VL-8B-Instruct config: the published 8.77B parameters."""
    out = run(capsys, "-c", str(ROOT / "configs" / "mmsearch_r1" / f"qwen3_vl_8b_{nodes}.yaml"))
    assert out["params"]["total"] == 8_767_123_696 and out["params"]["vision"] == 576_388_336
    assert out["fits"] and out["peak"] <= 79.1 * GiB and out["engine"]["contexts"] >= 1 and out["strategy"] == "fsdp2"
    if nodes == "4x8":  # the paper's batch, as the 7B 4x8 recipe: 512 prompts x 8 samples, 4 updates per step
        t = out["tokens"]
        assert out["world_size"] == 32 and t["total"]["prompts"] == 512 and t["total"]["episodes"] == 4096
        assert t["updates_per_step"] == 4


def test_7b_without_checkpointing_or_on_24gb_does_not_fit(capsys):
    recipe = str(RECIPES[0])
    with pytest.raises(SystemExit) as e:
        main(["-c", recipe, "--model.init_args.gradient_checkpointing", "false", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert e.value.code == 1 and not out["fits"] and out["margin"] < 0
    assert out["memory"]["training"]["activations"] > 80 * GiB  # every layer's activations for 16384 tokens
    out = run(capsys, "-c", recipe, "--gpu-gb", "24")
    assert not out["fits"] and out["engine"]["kv_tokens"] == 0  # 0.6 x 24 GiB cannot even hold the bf16 weights


def test_the_7b_recipe_at_0_9_gpu_memory_utilization_does_not_fit_for_its_sync_probe(capsys):
    """vLLM at 0.9 x 79.1 GiB: the rollout's other terms leave ~2 GiB, less than the probe's trainer forward right
    after a sync (vLLM awake): bf16 root + 2 blocks gathered and [749, V] logits in bf16, float32 and float32."""
    out = run(capsys, "-c", str(RECIPES[0]), "--model.init_args.engine.init_args.gpu_memory_utilization", "0.9")
    p, r = out["params"], out["memory"]["rollout"]
    probe = 2 * (p["root"] + 2 * p["largest_block"]) + 749 * 152064 * (2 + 4 + 4)  # Qwen2.5-VL-7B's vocabulary
    assert not out["fits"] and out["peak"] == r["total"] > out["gpu_bytes"] > r["total"] - probe
    assert r["weight_sync"] == probe


@pytest.mark.parametrize("override, packed", [([], True), (["--model.init_args.share_prefix", "false"], False),
    (["--model.init_args.policy.init_args.attn_implementation", "flash_attention_2"], False)],
    ids=["auto", "whole_rows", "flash_attention_2"])  # fmt: skip
def test_the_7b_recipe_counts_the_packed_rows_mask_where_it_packs(override, packed, capsys):
    """16384-token micro-batches under checkpointing: a 16384^2 bool mask and one layer's bf16 bias (0.75 GiB)
    where shared prefixes run as packed rows; none where the rows train whole (flash-attention 2 or no sharing)."""
    out = run(capsys, "-c", str(RECIPES[0]), *override)
    assert out["memory"]["training"]["packed_mask"] == (16384**2 * 3 if packed else 0)


@pytest.mark.parametrize("accelerator, packed", [("gpu", True), ("cpu", False)])
def test_an_uncheckpointed_single_process_run_packs_on_a_gpu_only(accelerator, packed, capsys):
    """Without checkpointing or FSDP2 shared prefixes go through the KV cache on the CPU alone; on a GPU they
    train as packed rows (``prefix_route``), whose sdpa bias every layer saves: 8192^2 x (1 + 2 layers x 2 bytes)."""
    out = run(capsys, "-c", str(ROOT / "configs" / "smoke.yaml"), "--trainer.accelerator", accelerator,
              "--trainer.precision", "bf16-mixed")  # fmt: skip
    assert out["memory"]["training"]["packed_mask"] == (8192**2 * 5 if packed else 0)


@pytest.mark.parametrize("kl_coef, bytes_per_param", [("0.001", 2), ("0", 0)])
def test_a_run_without_kl_plans_no_reference_model(kl_coef, bytes_per_param, capsys):
    """smoke.yaml in one process under bf16-mixed, not offloaded: with ``kl_coef`` > 0 the frozen reference is
    a full bf16 copy on the GPU (2 bytes a parameter); at 0 ``GRPOModule`` builds none, so none is planned."""
    out = run(capsys, "-c", str(ROOT / "configs" / "smoke.yaml"), "--trainer.accelerator", "gpu",
              "--trainer.precision", "bf16-mixed", "--model.init_args.kl_coef", kl_coef)  # fmt: skip
    m = out["memory"]["training"]
    assert m["reference"] == bytes_per_param * out["params"]["total"] and m["reference_scoring"] == 0


@pytest.mark.parametrize("max_batch_size, contexts", [(64, 8), (4, 4)])
def test_the_hf_engine_holds_a_context_for_each_episode_it_generates_at_once(max_batch_size, contexts, capsys):
    """smoke.yaml rolls out 2 prompts x 4 generations a step: its HF engine never holds more than 8 contexts,
    nor more than ``max_batch_size`` (its generate runs windows of that many requests)."""
    out = run(capsys, "-c", str(ROOT / "configs" / "smoke.yaml"), "--trainer.accelerator", "gpu",
              "--model.init_args.engine.init_args.max_batch_size", str(max_batch_size))  # fmt: skip
    e = out["engine"]
    assert e["contexts"] == contexts and e["kv_cache"] == contexts * 2048 * (2 * 2 * 2 * 16 * 4)  # fp32 K, V


def test_sdpa_saves_each_layers_bias_of_the_packed_mask_unless_checkpointed(tiny_policy, fvqa_samples):
    """What ``packed_mask`` counts, measured: packed rows' forward saves for backward one additive bias of the
    mask per layer in compute dtype (the bool mask converted), and none under checkpointing (a layer's is
    made again when the backward recomputes it)."""
    from mmsr.train.packed import pack_rows
    from mmsr.train.prefix import plan_prefixes
    from tests.train.test_prefix import group_batch

    batch = group_batch(tiny_policy, fvqa_samples)
    packed = pack_rows(batch, plan_prefixes(batch, tiny_policy.model.config.image_token_id, merge_alone=False), 0)
    G, L = packed.input_ids.shape
    model, layers = tiny_policy.model, tiny_policy.model.config.get_text_config().num_hidden_layers
    saved = {}
    for checkpointed in (False, True):
        model.train().gradient_checkpointing_enable() if checkpointed else model.gradient_checkpointing_disable()
        pairs = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: pairs.append(t) or t, lambda t: t):
            tiny_policy.forward(packed.input_ids, packed.attention_mask(), packed.position_ids, packed.vision, model=model)
        masks = {t.data_ptr(): t for t in pairs if t.shape[-2:] == (L, L)}.values()
        saved[checkpointed] = sum(t.numel() * t.element_size() for t in masks)
    model.gradient_checkpointing_disable()
    assert saved == {False: layers * 4 * G * L * L, True: 0}  # float32 on the CPU


def test_world_size_must_match_fsdp2_data_parallel_size():
    strategy = {"class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
                "init_args": {"data_parallel_size": 8, "tensor_parallel_size": 1}}  # fmt: skip
    assert world({"devices": 8, "num_nodes": 4, "strategy": "ddp"}) == (32, False)
    assert world({"devices": 8, "num_nodes": 1, "strategy": strategy}) == (8, True)
    with pytest.raises(ValueError, match="data_parallel_size"):
        world({"devices": 8, "num_nodes": 4, "strategy": strategy})


def test_a_tensor_parallel_vllm_engine_is_refused_as_the_engine_refuses_it():
    """``VLLMEngine.llm_kwargs`` refuses ``tensor_parallel_size`` other than 1: the plan sized such a run (vLLM's
    weights and KV heads split over 2) as if it could start."""
    with pytest.raises(ValueError, match=r"model.engine.init_args.tensor_parallel_size must be 1 \(got 2\)") as e:
        main(["-c", str(RECIPES[0]), "--model.init_args.engine.init_args.tensor_parallel_size", "2", "--json"])
    assert "\n" not in str(e.value)


def test_a_warm_start_config_is_refused_in_one_line():
    """The demo's warm start (``SFTModule``) has no GRPO settings to plan: the plan ended in ``KeyError:
    'num_generations'``."""
    with pytest.raises(ValueError, match=r"not mmsr.sft.SFTModule: warm-start \(SFTModule\) configs are not") as e:
        main(["-c", str(ROOT / "mmsr" / "demo" / "configs" / "sft.yaml"), "--json"])
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("recipe", ["qwen2_5_vl_7b_4x8", "qwen3_vl_8b_4x8"])
def test_mmsr_plan_command_prints_the_readme_table(recipe):
    """The command line, run as users run it; the README shows exactly what it prints for the 4x8 recipes."""
    shown = f"$ mmsr plan -c configs/mmsearch_r1/{recipe}.yaml\n"
    cmd = [sys.executable, "-m", "mmsr", "plan", "-c", f"configs/mmsearch_r1/{recipe}.yaml"]
    env = subprocess_env(OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "GiB per GPU: fits" in proc.stdout and "AdamW state" in proc.stdout and "tokens per step" in proc.stdout
    readme = (ROOT / "README.md").read_text()
    assert readme.split(shown, 1)[1].split("```", 1)[0] == proc.stdout, "README: paste the new output of the command"


def test_an_episode_longer_than_a_micro_batch_is_planned_alone(capsys):
    """``micro_batch_tokens`` below ``max_context_tokens`` (6144): an episode at the context bound still trains
    whole, in a micro-batch of its own (``pack_by_tokens``), so activations and logits are those of 6144 tokens,
    not 4096 (the plan said a run fit that did not)."""
    tokens = {n: run(capsys, "-c", str(RECIPES[0]), "--model.init_args.micro_batch_tokens", str(n))["memory"]["training"]
              for n in (4096, 6144)}  # fmt: skip
    assert tokens[4096]["activations"] == tokens[6144]["activations"] and tokens[4096]["logits"] == tokens[6144]["logits"]
    main(["-c", str(RECIPES[0]), "--model.init_args.micro_batch_tokens", "4096"])
    assert "activations (6144 tokens, checkpointed)" in capsys.readouterr().out


def test_the_default_gpu_is_an_80gb_card_as_cuda_reports_it(capsys):
    """``--gpu-gb`` is GiB, and its default was 80: an H100 sold as 80 GB gives CUDA 79.1 GiB (torch's total; vLLM's
    gpu_memory_utilization is a share of it), so every plan had 0.9 GiB more than the card and vLLM 0.5 GiB more at
    0.6 (87 contexts for the 7B 4x8 recipe where vLLM makes 85). Given a card's sales size, stderr says so."""
    out = run(capsys, "-c", str(RECIPES[0]))
    assert out["gpu_bytes"] == int(79.1 * GiB) and out["memory"]["rollout"]["engine"] == int(0.6 * int(79.1 * GiB))
    main(["-c", str(RECIPES[0]), "--gpu-gb", "80", "--json"])
    note = capsys.readouterr().err.strip().splitlines()[-1]
    assert note.startswith("mmsr plan: --gpu-gb 80 is 80 GiB; a GPU sold as 80 GB gives CUDA 79.1 GiB")
    assert note.endswith("plan for it with --gpu-gb 79.1")
    main(["-c", str(RECIPES[0]), "--gpu-gb", "79.1", "--json"])
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("value", ["-3", "0", "nan", "inf"])
def test_a_gpu_of_no_memory_is_refused_naming_the_flag(value, capsys):
    """``--gpu-gb -3`` planned "peak 2.1 GiB of -3.0 GiB per GPU: does not fit by 5.1 GiB": a parser error now,
    before the config is read."""
    with pytest.raises(SystemExit) as exit_:
        main(["-c", "no-such.yaml", "--gpu-gb", value])
    assert exit_.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == f"mmsr plan: error: argument --gpu-gb: must be a GPU's memory in GiB, more than 0, got {value}"


def test_fp32_compute_over_bf16_parameters_is_refused_as_fit_refuses_it():
    """``mmsr.parallel.compute_dtype`` refuses it (``GRPOModule.setup``): the plan sized it as if it could run."""
    with pytest.raises(ValueError, match="model.compute_dtype 'float32' is wider than model.param_dtype 'bfloat16'"):
        main(["-c", str(RECIPES[0]), "--model.init_args.param_dtype", "bfloat16", "--model.init_args.compute_dtype",
              "float32", "--json"])  # fmt: skip


@pytest.mark.parametrize("override, built", [
    (["--model.num_generations", "1"], dict(num_generations=1)),
    (["--model.init_args.temperature", "0"], dict(temperature=0.0)),
    (["--model.init_args.top_p", "0"], dict(top_p=0.0)),
    (["--model.init_args.lr", "0"], dict(lr=0.0)),
    (["--model.init_args.clip_ratio_c", "1"], dict(clip_ratio_c=1.0)),
    (["--model.init_args.ppo_epochs", "0"], dict(ppo_epochs=0)),
    (["--model.init_args.rollout.max_rounds", "0"], None),  # RolloutSettings refuses it as it is made
    (["--model.init_args.engine.init_args.max_model_len", "4096"], dict(engine="vllm")),
], ids=["num_generations", "temperature", "top_p", "lr", "clip_ratio_c", "ppo_epochs", "max_rounds",
        "short_engine"])  # fmt: skip
def test_a_run_fit_would_refuse_once_built_is_refused_in_its_words(override, built):
    """``GRPOModule.__init__`` (and the settings it makes) refuse these before the build, but ``mmsr fit`` gets
    there only once the config is parsed into objects, which the plan never does: it said "fits" for a run that
    could not start. Refused by the same checks, in the same one line (the module's, built with the same value)."""
    from mmsr.module import GRPOModule
    from mmsr.rollout.loop import RolloutSettings
    from mmsr.rollout.vllm_engine import VLLMEngine

    with pytest.raises(ValueError) as planned:
        main(["-c", str(RECIPES[0]), *override, "--json"])
    rollout = dict(max_tokens_per_turn=2048, max_context_tokens=6144)  # the recipe's
    with pytest.raises(ValueError) as refused:
        if built is None:
            RolloutSettings(**rollout, max_rounds=0)
        engine = VLLMEngine(max_model_len=4096) if built.pop("engine", None) else None
        GRPOModule(None, engine=engine, rollout=RolloutSettings(**rollout), **built)
    assert str(planned.value) == str(refused.value) and "\n" not in str(planned.value)
