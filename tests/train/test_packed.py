"""Shared prefixes in packed rows (``mmsr.train.packed``): the route taken under gradient checkpointing and
FSDP2, where the KV cache cannot carry gradients. A prefix laid out once, followed by the suffixes that continue
it under a 4-D mask, gives the log-probs, entropies and gradients of the whole rows, for each model family."""

from dataclasses import replace

import pytest
import torch

import mmsr.train.batch
from mmsr.demo.tokenizer import Scaffold
from mmsr.models.build import TinyQwen2_5_VL
from mmsr.train.batch import collate, packs_rows, prefix_route, sampled_logprobs
from mmsr.train.packed import can_pack, pack_rows, packed_logprobs, packed_sizes, packing_pays, pair_cost
from mmsr.train.prefix import PrefixSplit, plan_prefixes
from mmsr.train.update import Backprop, PolicyUpdate, UpdateSettings
from tests.models.conftest import tiny_qwen3_vl  # noqa: F401 - fixture
from tests.rollout.test_loop import ANS, IMG
from tests.train.test_prefix import GROUPS, TEXTS, assert_same_scores, group_batch, rollouts, text_policy  # noqa: F401 - fixture


@pytest.fixture(params=["tiny_policy", "tiny_qwen3_vl", "text_policy"], ids=["qwen2_5_vl", "qwen3_vl", "text"])
def checkpointed(request):
    """Each family's policy with its layers checkpointed (the 7B recipes' setting) for the test's duration."""
    policy = request.getfixturevalue(request.param)
    training = policy.model.training
    policy.model.train().gradient_checkpointing_enable()
    yield policy
    policy.model.gradient_checkpointing_disable()
    policy.model.train(training)


def test_packed_rows_score_as_the_whole_rows_under_gradient_checkpointing(checkpointed, fvqa_samples, monkeypatch):
    batch = group_batch(checkpointed, fvqa_samples)
    calls = []
    monkeypatch.setattr(mmsr.train.batch, "packed_logprobs", lambda *a, **k: calls.append(1) or packed_logprobs(*a, **k))
    monkeypatch.setattr(mmsr.train.batch, "shared_logprobs", None)  # the KV cache route must not be taken
    routed = sampled_logprobs(checkpointed, batch, with_entropy=True, share_prefix=True)
    assert calls == [1]
    assert_same_scores(checkpointed, batch, packed_logprobs)
    whole = sampled_logprobs(checkpointed, batch)[0]  # (whole rows also fill in positions other rows sampled)
    torch.testing.assert_close(routed[0], whole * batch.loss_mask, rtol=1e-4, atol=1e-5)


def test_the_layout_runs_each_prefix_once_and_each_suffix_after_it(tiny_policy, fvqa_samples):
    batch = group_batch(tiny_policy, fvqa_samples)
    split = plan_prefixes(batch, tiny_policy.model.config.image_token_id, min_saved=0)
    packed = pack_rows(batch, split, pad_id=0)
    lengths = batch.attention_mask.sum(1).tolist()
    assert packed.input_ids.shape[0] == len(split.lengths)
    assert int((packed.segment >= 0).sum()) == sum(lengths) - split.saved  # every token once, a prefix once
    for i, g in enumerate(split.group):  # each whole-row token sits where column says, at its own position
        cols = packed.column[i, : lengths[i]]
        assert torch.equal(packed.input_ids[g, cols], batch.input_ids[i, : lengths[i]])
        assert torch.equal(packed.position_ids[..., g, cols], batch.position_ids[..., i, : lengths[i]])
    mask = packed.attention_mask()[:, 0]
    a, b = ((packed.segment[0] == k).nonzero()[:, 0] for k in (1, 2))  # group 0's first two suffixes
    assert mask[0][b[:, None], a[None, :]].sum() == 0 and mask[0][b[-1], : split.lengths[0]].all()  # not a, all the prefix
    assert image_tokens(packed, tiny_policy) == sum(v.num_tokens for v in packed.vision) < image_tokens(batch, tiny_policy)


def test_lone_rows_are_packed_rows_of_their_own(tiny_policy, fvqa_samples, monkeypatch):
    """Two rows that share no prompt with another (other questions) are two packed rows, each its whole row, as
    the update's micro-batch cost counts them: the KV cache route shares their common instructions, but as one
    packed row they would attend over every pair of both episodes' tokens (a dense mask)."""
    batch = group_batch(tiny_policy, fvqa_samples)
    image_id, lengths = tiny_policy.model.config.image_token_id, batch.attention_mask.sum(1).tolist()
    split = plan_prefixes(batch, image_id, merge_alone=False)
    assert split.group == [0, 0, 0, 1, 1, 1, 2, 3] and split.first == [0, 3, 6, 7]
    assert split.saved == 2 * (split.lengths[0] + split.lengths[1])  # only the groups' prompts run once
    packed = pack_rows(batch, split, pad_id=0)
    for g, i in ((2, 6), (3, 7)):  # the row, whole, and causal: a prefix and the one suffix after it
        assert torch.equal(packed.input_ids[g, : lengths[i]], batch.input_ids[i, : lengths[i]])
        assert int((packed.segment[g] >= 0).sum()) == lengths[i]
        mask = packed.attention_mask()[g, 0, : lengths[i], : lengths[i]]
        assert torch.equal(mask, torch.ones_like(mask).tril())
    splits = []
    monkeypatch.setattr(mmsr.train.batch, "packed_logprobs", lambda p, b, s, *a, **k: splits.append(s) or packed_logprobs(p, b, s, *a, **k))
    routed, whole = routed_and_whole(tiny_policy, batch)
    assert [s.group for s in splits] == [split.group]  # the update's route keeps them apart
    torch.testing.assert_close(routed, whole * batch.loss_mask, rtol=1e-4, atol=1e-5)


def test_two_groups_of_one_question_are_two_packed_rows(tiny_policy, fvqa_samples):
    """A question drawn twice in a step: two GRPO groups with one prompt. The KV cache route runs the prompt
    once for both; packed, each group is a row of its own, as long as the update's micro-batch cost counts."""
    trajs = rollouts(tiny_policy, [fvqa_samples[0]] * 2, [GROUPS[0]] * 2, 3)
    batch = collate(trajs, range(len(trajs)), tiny_policy, "cpu")
    assert batch.group.tolist() == [0, 0, 0, 1, 1, 1]
    image_id, lengths = tiny_policy.model.config.image_token_id, batch.attention_mask.sum(1).tolist()
    assert plan_prefixes(batch, image_id).group == [0] * 6
    split = plan_prefixes(batch, image_id, merge_alone=False)
    assert split.group == [0, 0, 0, 1, 1, 1]
    assert packed_sizes(lengths, split) == [pack_rows_size(trajs, 0), pack_rows_size(trajs, 1)]


def test_pair_cost_of_qwen2_5_vl_7b_is_the_hand_worked_ratio():
    from mmsr.plan.config import pretrained_config

    # a layer's weights: q and o 3584 x 3584, k and v 3584 x 512, gate, up and down 3584 x 18944
    weights = 2 * 3584 * 3584 + 2 * 3584 * 512 + 3 * 3584 * 18944
    assert pair_cost(pretrained_config("Qwen2.5-VL-7B-Instruct")) == pytest.approx(4 * 3584 / (2 * weights))  # 3.08e-5


@pytest.mark.parametrize("suffix, rows, pays", [(1500, 8, True), (3000, 4, False)])
def test_packing_pays_where_the_prompt_saved_outweighs_the_dense_pairs(suffix, rows, pays):
    """At 7B sizes (3.08e-5 tokens a pair), a 1,000-token prompt: 8 turns of 1,500 tokens packed cost
    13,000 x (1 + 0.40) = 18,199 against whole rows 20,000 x (1 + 0.077) = 21,538; 4 turns of 3,000 packed
    cost the same 18,199 against 16,000 x (1 + 0.123) = 17,968, so they train whole."""
    split = PrefixSplit(group=[0] * rows, lengths=[1000], first=[0], images=[[] for _ in range(rows)])
    assert packing_pays([1000 + suffix] * rows, split, 3.0758e-5) is pays


def test_rows_train_whole_where_packing_does_not_pay(tiny_policy, fvqa_samples, monkeypatch):
    batch = group_batch(tiny_policy, fvqa_samples)
    monkeypatch.setattr(mmsr.train.batch, "packed_logprobs", None)  # would fail if called
    monkeypatch.setattr(mmsr.train.batch, "pair_cost", lambda config: 1.0)  # attention dearer than any prompt
    routed, whole = routed_and_whole(tiny_policy, batch)
    assert torch.equal(routed, whole)


def routed_and_whole(policy, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """``sampled_logprobs`` ``[n, T-1]`` with shared prefixes and of the whole rows, the layers checkpointed."""
    policy.model.gradient_checkpointing_enable()
    try:
        return sampled_logprobs(policy, batch, share_prefix=True)[0], sampled_logprobs(policy, batch)[0]
    finally:
        policy.model.gradient_checkpointing_disable()


def image_tokens(rows, policy) -> int:
    return int((rows.input_ids == policy.model.config.image_token_id).sum())


def test_eager_attention_takes_the_additive_mask(text_policy, fvqa_samples):
    batch = group_batch(text_policy, fvqa_samples)
    text_policy.model.set_attn_implementation("eager")
    try:
        assert can_pack(text_policy.model)
        assert_same_scores(text_policy, batch, packed_logprobs)
    finally:
        text_policy.model.set_attn_implementation("sdpa")


def test_flash_attention_under_checkpointing_trains_whole_rows(text_policy):
    """Flash-attention 2 takes no arbitrary mask: neither route is open, the rows stay whole."""
    model, attn = text_policy.model, text_policy.model.config._attn_implementation
    model.gradient_checkpointing_enable()
    try:
        assert prefix_route(model, torch.device("cpu")) is mmsr.train.batch.packed_logprobs
        model.config._attn_implementation = "flash_attention_2"
        assert not can_pack(model) and prefix_route(model, torch.device("cpu")) is None
    finally:
        model.config._attn_implementation = attn
        model.gradient_checkpointing_disable()


def test_on_a_gpu_packed_rows_take_the_kv_caches_place(text_policy):
    """A model that could carry gradients through a KV cache does so on the CPU only: on a GPU (an H200, bf16)
    that route ran slower than whole rows and packed rows twice as fast, so there it packs, and the update
    keeps each group in one micro-batch. (The route is chosen, not run: no GPU here.)"""
    model, cpu, gpu = text_policy.model, torch.device("cpu"), torch.device("cuda")
    assert not model.is_gradient_checkpointing
    assert prefix_route(model, cpu) is mmsr.train.batch.shared_logprobs and not packs_rows(model, cpu)
    assert prefix_route(model, gpu) is mmsr.train.batch.packed_logprobs and packs_rows(model, gpu)
    attn = model.config._attn_implementation
    model.config._attn_implementation = "flash_attention_2"
    try:
        assert prefix_route(model, gpu) is None and not packs_rows(model, gpu)
    finally:
        model.config._attn_implementation = attn


def test_a_checkpointed_grpo_update_packs_each_group_together_and_equals_whole_rows(tiny_policy, fvqa_samples):
    """Two PPO epochs (a scoring pass, two optimizer steps) over two groups of three episodes, the layers
    checkpointed: with shared prefixes each micro-batch holds one whole group (by length, the budget would
    split both), and the weights and metrics are those of whole rows."""
    trajs = rollouts(tiny_policy, fvqa_samples[:2], GROUPS, 3)
    advantages = torch.tensor([1.0, -0.5, -0.5, 0.8, 0.2, -1.0])
    budget = max(pack_rows_size(trajs, g) for g in (0, 1))
    results = []
    for share in (False, True):
        model = TinyQwen2_5_VL(tokenizer_texts=TEXTS, scaffold=Scaffold(), seed=0).build().model.train()
        model.gradient_checkpointing_enable()
        settings = UpdateSettings(ppo_epochs=2, kl_coef=0.0, share_prefix=share, micro_batch_tokens=budget)
        update = PolicyUpdate(replace(tiny_policy, model=model), settings)
        micros = update.micro_batches(trajs, list(range(6)), model, torch.device("cpu"))
        groups = sorted(sorted(trajs[i].group_id for i in m) for m in micros)
        assert (groups == [[0, 0, 0], [1, 1, 1]]) == share
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        metrics = update.update(trajs, advantages, None, Backprop(model, opt, lambda loss: loss.backward(), torch.device("cpu")))
        results.append((metrics, torch.cat([p.detach().flatten() for p in model.parameters()])))
    (whole, w_whole), (shared, w_shared) = results
    torch.testing.assert_close(w_shared, w_whole, rtol=1e-4, atol=1e-6)
    for key in ("train/policy_loss", "train/entropy", "train/grad_norm"):
        assert shared[key] == pytest.approx(whole[key], rel=1e-4, abs=1e-6)


def test_packed_micro_batches_stay_within_the_token_budget(tiny_policy, fvqa_samples):
    """What ``mmsr plan`` bounds the dense mask by: at budgets over a range, each forward of the update's
    micro-batches (packed rows where packing pays, whole rows where not) holds at most
    ``micro_batch_tokens``, unless one episode is longer and goes alone."""
    lone = rollouts(tiny_policy, fvqa_samples[2:4], [[[ANS]], [[IMG, ANS]]], 1)
    trajs = rollouts(tiny_policy, fvqa_samples[:2], GROUPS, 3) + [replace(t, group_id=t.group_id + 2) for t in lone]
    update, fitted, sizes = PolicyUpdate(tiny_policy, UpdateSettings(share_prefix=True)), set(), []
    hook = tiny_policy.model.register_forward_pre_hook(lambda m, a, kw: sizes.append(kw["input_ids"].shape), with_kwargs=True)
    tiny_policy.model.gradient_checkpointing_enable()
    try:
        longest, top = max(len(t) for t in trajs), 4 * max(pack_rows_size(trajs, g) for g in range(4))  # 4 groups
        for budget in [*range(longest - 10, top, (top - longest) // 15), top]:
            update.settings = replace(update.settings, micro_batch_tokens=budget)
            for micro in update.micro_batches(trajs, list(range(len(trajs))), tiny_policy.model, torch.device("cpu")):
                batch = collate([trajs[i] for i in micro], range(len(micro)), tiny_policy, "cpu")
                with torch.no_grad():
                    sampled_logprobs(tiny_policy, batch, share_prefix=True)
                rows, width = sizes.pop()
                assert rows * width <= budget or len(micro) == 1, (budget, micro, rows, width)
                fitted.add((len(micro), rows < len(micro)))
    finally:
        tiny_policy.model.gradient_checkpointing_disable()
        hook.remove()
    assert {n for n, _ in fitted} >= {1, 2, 3}  # from one episode per micro-batch to a whole group
    assert any(packed for _, packed in fitted)


def pack_rows_size(trajs, group: int) -> int:
    """Tokens of a group's packed row: its prompt but the last token once, then the rest of each episode."""
    rows = [t for t in trajs if t.group_id == group]
    return rows[0].prompt_len - 1 + sum(len(t) - rows[0].prompt_len + 1 for t in rows)
