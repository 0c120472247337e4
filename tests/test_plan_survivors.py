"""``mmsr plan``: terms a mutation audit of ``mmsr/plan/memory.py`` left unchecked, against numbers worked by hand
on the hand-made shape and run of ``tests/test_plan.py`` (``SHAPE``, ``spec``)."""

import pytest

from mmsr.plan.config import dtypes, world
from mmsr.plan.memory import plan, problems
from tests.test_plan import SHAPE, spec


def test_a_replicated_multi_gpu_run_keeps_whole_training_state_on_every_rank():
    """DDP over 2 ranks (no FSDP2) replicates the model: each rank holds all 1000 fp32 params, their grads and
    both AdamW states (4000, 4000, 8000 bytes), not half of them; only FSDP2 shards. Planning them halved would
    call a run that runs out of memory on every rank a fit."""
    out = plan(SHAPE, spec(world_size=2, fsdp=False), gpu_gib=1.0)
    assert out["strategy"] == "replicated" and out["world_size"] == 2
    m = out["memory"]["training"]
    assert (m["params"], m["grads"], m["adamw"]) == (4000, 4000, 8000)
    r = out["memory"]["rollout"]
    assert (r["params"], r["adamw"]) == (4000, 8000)


def test_a_budget_not_a_multiple_of_the_context_packs_the_floor_of_episodes():
    """The 7B 4x8 recipe: a 16384-token micro-batch holds 16384 // 6144 = 2 episodes at the 6144-token context
    bound, not 3 (3 x 6144 = 18432 tokens would overflow it), so a mini-batch of 16 prompts x 8 generations / 4
    = 32 episodes trains in 32 / 2 = 16 micro-batches, not ceil(32 / 3) = 11."""
    run_spec = spec(micro_batch_tokens=16384, max_context_tokens=6144, prompts_per_rank=16, num_generations=8,
                    mini_batches=4)  # fmt: skip
    t = plan(SHAPE, run_spec, gpu_gib=1.0)["tokens"]
    assert t["episodes_per_update"] == 32
    assert t["episodes_per_micro_batch"] == 2
    assert t["micro_batches_per_update"] == 16


def test_an_image_larger_than_the_context_counts_at_most_the_context():
    """max_pixels of 20 LM tokens (784 pixels a token) with a 12-token context bound: an episode cannot hold more
    than 12 image tokens, so 8 episodes x 12 = 96 tokens (under the 1000-token budget) go through the vision tower,
    not 8 x 20 = 160. 4 patches a token, 328 bytes a patch (``tests/test_plan.py``,
    ``test_vision_activations_count_every_image_a_micro_batch_can_hold``)."""
    out = plan(SHAPE, spec(micro_batch_tokens=1000, max_context_tokens=12, max_pixels=784 * 20), gpu_gib=1.0)
    assert out["memory"]["training"]["vision_activations"] == 96 * 4 * 328


@pytest.mark.parametrize("checkpointed", [True, False])
def test_eager_attention_takes_a_float32_mask_of_the_packed_rows(checkpointed):
    """eager is handed the packed rows' additive mask in float32 as it is: 16 tokens a micro-batch (above the
    12-token context), 16 x 16 = 256 pairs x 4 bytes = 1024 bytes, checkpointed or not (no per-layer bias as
    sdpa's: 256 x (1 + 2) = 768 checkpointed, 256 x (1 + 2 layers x 2) = 1280 not)."""
    run_spec = spec(attention="eager", packed_rows=True, gradient_checkpointing=checkpointed)
    assert plan(SHAPE, run_spec, gpu_gib=1.0)["memory"]["training"]["packed_mask"] == 1024


@pytest.mark.parametrize(("offload", "resident"), [(True, 0), (False, 1000)])
def test_an_offloaded_fsdp2_reference_holds_nothing_on_the_gpu_between_its_scorings(offload, resident):
    """KL on, FSDP2 over 2 ranks: the reference's 1000 bf16 params (2000 bytes) sit sharded on the GPU, 1000 a
    rank, unless offloaded to the CPU; offloaded, it only gathers blocks while it scores (the policy's gathered
    term bounds them), so the rollout phase counts none of it."""
    out = plan(SHAPE, spec(kl=True, ref_offload=offload), gpu_gib=1.0)
    assert out["memory"]["rollout"]["reference"] == out["memory"]["training"]["reference"] == resident
    assert out["memory"]["training"]["reference_scoring"] == 0


def test_the_hf_engine_under_fsdp2_holds_a_full_copy_of_the_policy_in_both_phases():
    """Under FSDP2 the HF engine generates with an unsharded bf16 copy (1000 params x 2 bytes) that stays on the
    GPU while training too; its KV cache is 2 contexts (hf_batch) x 12 tokens x 16 bytes (K and V, 1 head of 4,
    2 layers, bf16)."""
    out = plan(SHAPE, spec(engine="hf"), gpu_gib=1.0)
    assert out["memory"]["training"]["engine"] == 2000
    assert out["memory"]["rollout"]["engine"] == 2000 + 2 * 12 * (2 * 2 * 1 * 4 * 2)


@pytest.mark.parametrize(("kv_tokens", "refused"), [(11, True), (12, False)])
def test_a_vllm_cache_short_of_one_context_is_a_problem(kv_tokens, refused):
    """vLLM refuses to start when its KV cache cannot hold one max_model_len (12-token) context; one token short
    is already too few, not only an empty cache."""
    found = problems(spec(), {"kv_tokens": kv_tokens, "kv_cache": kv_tokens * 16})
    assert bool(found) is refused
    assert not found or "cannot hold one max_model_len context (12 tokens)" in found[0]


def test_an_episode_samples_at_most_its_context():
    """3 rounds of up to 8 tokens could sample 24, but an episode ends at its 12-token context bound."""
    t = plan(SHAPE, spec(max_rounds=3, max_tokens_per_turn=8), gpu_gib=1.0)["tokens"]
    assert t["sampled_tokens_per_episode"] == 12 and t["per_rank"]["sampled_tokens"] == 8 * 12


def test_fsdp2_s_auto_data_parallel_size_is_lightning_s_number_of_nodes():
    """Lightning's ModelParallelStrategy resolves data_parallel_size "auto" to num_nodes (tensor_parallel_size
    "auto" to the devices): with tensor_parallel_size 1 on 8 devices of one node, "auto" is 1 of 8 ranks and
    Lightning refuses the run; sizing it as 8-way FSDP2 would plan a run that cannot start."""
    strategy = {"class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
                "init_args": {"tensor_parallel_size": 1}}  # fmt: skip
    with pytest.raises(ValueError, match=r"data_parallel_size \(1\) must equal the world size"):
        world({"devices": 8, "num_nodes": 1, "strategy": strategy})
    assert world({"devices": 1, "num_nodes": 4, "strategy": strategy}) == (4, True)


def test_master_weights_are_float32_unless_the_config_says_otherwise():
    """GRPOModule's param_dtype default keeps fp32 master weights, grads and AdamW state (a config leaving it out or
    null): sized in bf16, the plan would halve the largest training terms."""
    assert dtypes({}, {})["param_dtype"] == dtypes({"param_dtype": None}, {})["param_dtype"] == "float32"
    assert dtypes({"param_dtype": "bfloat16"}, {})["param_dtype"] == "bfloat16"
