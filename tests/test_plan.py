"""``mmsr plan``: per-GPU memory against numbers worked by hand for a tiny Qwen2.5-VL, the 7B recipes
on 80 GB GPUs, and the command line."""

import json
import subprocess
import sys

import pytest
import torch

from mmsr.plan import main
from mmsr.plan.config import ModelShape, RunSpec, world
from mmsr.plan.memory import GiB, plan
from mmsr.sync import DEFAULT_BUCKET_MB
from tests.conftest import FVQA, ROOT, subprocess_env

RECIPES = [ROOT / "configs" / "mmsearch_r1" / f"qwen2_5_vl_7b_{n}.yaml" for n in ("4x8", "1x8")]
TEXTS = [str(FVQA / "fvqa_dev.jsonl"), str(FVQA / "search" / "corpus.jsonl")]
# TinyQwen2_5_VL defaults: hidden 64, 2 layers, 4 heads of 16, 2 KV heads (kv dim 32), MLP 128, tied
# embeddings; vision: 1 block of 32, MLP 64, patch 14, merge 2.
TINY = f"""
trainer:
  devices: 2
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
    out = run(capsys, "-c", str(tmp_path / "tiny.yaml"), "--gpu-gb", "2", "--overhead-gb", "0.5",
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
    assert m["unsharded_grads"] == 2 * (root + layer)  # bf16: root + the block being reduce-scattered
    # per token and layer: 2 bytes x (7*64 + 2*32 + 4*128) + 2 norms x 4 bytes x 64 = 2560;
    # checkpointed: 2 layer inputs 2*64*2 bytes + one layer recomputed + final norm (4 + 2*2) * 64, x 4096 tokens
    assert m["activations"] == 4096 * (2 * 64 * 2 + 2560 + 8 * 64)
    # 4 episodes of 1024 per micro-batch, one image each at 112*112 px = 16 tokens = 64 patches: 256 patches;
    # per patch: block input 32*2 + block 2*(7*32 + 2*32 + 4*64) + 2*4*32 = 64 + 1344
    assert m["vision_activations"] == 256 * (64 + 1344)
    # bf16 logits and their grad, [4096, V] each, + three fp32 [512, V] chunks
    assert m["logits"] == 2 * 2 * 4096 * V + 3 * 4 * 512 * V
    # shared prefixes in packed rows (FSDP2, sdpa): the bool mask of at most 4096^2 pairs and the recomputed
    # layer's bf16 additive bias
    assert m["packed_mask"] == 4096**2 * (1 + 2)
    assert m["engine"] == 0  # vLLM asleep
    assert m["overhead"] == GiB // 2
    r = out["memory"]["rollout"]
    assert r["engine"] == GiB  # 0.5 x 2 GiB
    assert r["sync_buffer"] == DEFAULT_BUCKET_MB * 2**20  # the largest tensor (V x 64 x 4 bytes) is smaller
    e = out["engine"]
    assert e["weights"] == 2 * P  # bf16, tp 1
    assert e["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 2  # K and V x 2 layers x 2 KV heads x 16 dims x bf16
    assert e["kv_cache"] == GiB - 2 * P - GiB // 4
    assert e["kv_tokens"] == e["kv_cache"] // 256 and e["contexts"] == e["kv_tokens"] // 1024
    # fp32 (no sync dtype set), half of it all-gathered from the other rank
    assert out["weight_sync"] == {"bytes_per_step": 4 * P, "all_gather_received_per_rank": 4 * P // 2}
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
    # 2 layers x 32 tokens x (2 x (7*8 + 2*4 + 4*16) + 2*4*8) + final norm (4 + 4) * 8 * 32
    assert m["activations"] == 2 * 32 * (256 + 64) + 2048
    assert m["logits"] == 2 * 2 * 32 * 50 + 3 * 4 * 32 * 50
    assert m["packed_mask"] == 0  # packed_rows unset (run_spec sets it on a GPU, checkpointed or under FSDP2)
    # HF engine: the trainer's module (no copy), autocast cache 2000 + KV 2 contexts x 32 tokens x (2*2*1*4*2 bytes)
    assert out["memory"]["rollout"]["engine"] == 2000 + 2 * 32 * 32 and out["memory"]["rollout"]["sync_buffer"] == 0
    assert out["weight_sync"]["all_gather_received_per_rank"] == 0


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_7b_recipes_fit_80gb(recipe, capsys):
    out = run(capsys, "-c", str(recipe), "--gpu-gb", "80")
    assert abs(out["params"]["total"] - 8.29e9) < 0.01 * 8.29e9  # 7B language model + 0.67B vision tower
    assert out["fits"] and out["peak"] <= 80 * GiB and out["engine"]["contexts"] >= 1
    assert out["strategy"] == "fsdp2" and (out["dtypes"]["param"], out["dtypes"]["compute"]) == ("float32", "bfloat16")


@pytest.mark.parametrize("nodes", ["1x8", "4x8"])
def test_qwen3_vl_8b_recipes_fit_80gb(nodes, capsys):
    """Sized from the known Qwen3-VL-8B-Instruct config: the published 8.77B parameters."""
    out = run(capsys, "-c", str(ROOT / "configs" / "mmsearch_r1" / f"qwen3_vl_8b_{nodes}.yaml"), "--gpu-gb", "80")
    assert out["params"]["total"] == 8_767_123_696 and out["params"]["vision"] == 576_388_336
    assert out["fits"] and out["peak"] <= 80 * GiB and out["engine"]["contexts"] >= 1 and out["strategy"] == "fsdp2"
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


@pytest.mark.parametrize("recipe", ["qwen2_5_vl_7b_4x8", "qwen3_vl_8b_4x8"])
def test_mmsr_plan_command_prints_the_readme_table(recipe):
    """The command line, run as users run it; the README shows exactly what it prints for the 4x8 recipes."""
    shown = f"$ mmsr plan -c configs/mmsearch_r1/{recipe}.yaml --gpu-gb 80\n"
    cmd = [sys.executable, "-m", "mmsr", "plan", "-c", f"configs/mmsearch_r1/{recipe}.yaml", "--gpu-gb", "80"]
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
