"""``mmsr plan``: terms a mutation audit of ``mmsr/plan/memory.py`` left unchecked, against numbers worked by hand
on the hand-made shape and run of ``tests/test_plan.py`` (``SHAPE``, ``spec``)."""

import pytest

from mmsr.plan.memory import plan
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
