"""Shared-prefix training (``mmsr.train.prefix``): a prefix run once with its KV cache fanned out gives the
log-probs, entropies and gradients of the whole rows, for each model family, GRPO groups and lone rows."""

from dataclasses import replace

import pytest
import torch
from PIL import Image

import mmsr.train.batch
import mmsr.train.update

from mmsr.demo.tokenizer import Scaffold
from mmsr.models.build import TinyQwen2_5_VL
from mmsr.models.tiny_text import TinyQwen2
from mmsr.models.vision import VisionInput
from mmsr.rollout.engine import SamplingParams
from mmsr.train.batch import TrainBatch, collate, sampled_logprobs
from mmsr.train.prefix import _outside_images, can_share, plan_prefixes, shared_logprobs
from mmsr.train.update import Backprop, PolicyUpdate, UpdateSettings
from tests.conftest import FVQA
from tests.models.conftest import tiny_qwen3_vl, vl_policy  # noqa: F401 - fixtures: each vision-language family
from tests.rollout.test_loop import ANS, IMG, TXT, make_loop

TEXTS = [str(FVQA / "fvqa_dev.jsonl"), str(FVQA / "search" / "corpus.jsonl")]
# two GRPO groups of three (image search with its thumbnails in the suffix, text search, direct answers)
GROUPS = [[IMG, TXT, ANS], [ANS], [TXT, ANS]], [[TXT, ANS], [IMG, ANS], [ANS]]


@pytest.fixture(scope="module")
def text_policy():
    return TinyQwen2(tokenizer_texts=TEXTS, scaffold=Scaffold(), hidden_size=64, num_heads=2).build()


def rollouts(policy, samples, scripts, n):
    script = {f"{s.id}#{k}": turns for s, group in zip(samples, scripts) for k, turns in enumerate(group)}
    loop, _ = make_loop(policy, script)
    return loop.run(samples, n, SamplingParams())


def group_batch(policy, fvqa_samples):
    """Two groups of three episodes, then two lone episodes (other questions)."""
    trajs = rollouts(policy, fvqa_samples[:2], GROUPS, 3) + rollouts(policy, fvqa_samples[2:4], [[[ANS]], [[IMG, ANS]]], 1)
    return collate(trajs, range(len(trajs)), policy, "cpu")


def scores(policy, batch, shared: bool, route=None):
    """Masked log-probs and entropies ``[n, T-1]`` and the gradient of a loss of both (``route``: how shared
    prefixes run, ``shared_logprobs`` by default)."""
    policy.model.zero_grad()
    if shared:
        split = plan_prefixes(batch, getattr(policy.model.config, "image_token_id", None), min_saved=0)
        logp, ent = (route or shared_logprobs)(policy, batch, split, with_entropy=True)
    else:
        logp, ent = sampled_logprobs(policy, batch, with_entropy=True)
    mask = batch.loss_mask
    weights = torch.linspace(-1.0, 2.0, mask.shape[0])[:, None]  # rows weigh differently, like advantages
    ((logp * mask * weights).sum() + 0.3 * (ent * mask).sum()).backward()
    grad = torch.cat([p.grad.flatten() for p in policy.model.parameters() if p.grad is not None])
    return (logp * mask).detach(), (ent * mask).detach(), grad


def assert_same_scores(policy, batch, route=None):
    whole, shared = scores(policy, batch, shared=False), scores(policy, batch, shared=True, route=route)
    for a, b in zip(whole, shared):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    assert whole[2].abs().max() > 1.0  # the gradient is not trivially zero


def test_groups_share_their_prompt_and_lone_rows_their_common_start(tiny_policy, fvqa_samples):
    batch = group_batch(tiny_policy, fvqa_samples)
    split = plan_prefixes(batch, tiny_policy.model.config.image_token_id)
    assert split.group == [0, 0, 0, 1, 1, 1, 2, 2] and split.first == [0, 3, 6]
    first_sampled = [int(batch.loss_mask[i].nonzero()[0]) for i in split.first]
    assert split.lengths[:2] == first_sampled[:2]  # the whole prompt but its last token
    # lone rows (other questions, other images) share the instructions before their images
    image_id = tiny_policy.model.config.image_token_id
    assert split.lengths[2] == int((batch.input_ids[6] == image_id).nonzero()[0])
    assert split.saved == 2 * (split.lengths[0] + split.lengths[1]) + split.lengths[2]


def test_images_of_one_size_but_other_pixels_are_not_a_common_prefix(tiny_policy, fvqa_samples):
    """Same question, same-size images: the ids agree through the image pads, the prefix stops before them."""
    base = fvqa_samples[0]
    samples = [replace(base, id=f"q{i}", image=Image.new("RGB", (112, 112), colour)) for i, colour in enumerate(("red", "blue"))]
    trajs = rollouts(tiny_policy, samples, [[[ANS]], [[ANS]]], 1)
    batch = collate(trajs, range(2), tiny_policy, "cpu")
    pads = (batch.input_ids[0] == tiny_policy.model.config.image_token_id).nonzero()[:, 0]
    assert torch.equal(batch.input_ids[0], batch.input_ids[1]) and len(pads) > 1
    split = plan_prefixes(batch, tiny_policy.model.config.image_token_id, min_saved=0)
    assert split.group == [0, 0] and split.lengths == [int(pads[0])]
    assert_same_scores(tiny_policy, batch)


def test_shared_prefix_scores_equal_the_whole_rows(vl_policy, fvqa_samples):
    batch = group_batch(vl_policy, fvqa_samples)
    assert len(batch.vision) > 6  # question images in the prefixes, thumbnails in the suffixes
    assert_same_scores(vl_policy, batch)


def test_text_only_policy(text_policy, fvqa_samples):
    assert_same_scores(text_policy, group_batch(text_policy, fvqa_samples))


def test_the_gradients_are_the_same_bits_every_time(tiny_policy, fvqa_samples):
    """Eight lone rows fan out of one prefix: its gradient sums theirs in a fixed order (indexing's backward
    summed them with atomic adds, and the last bits changed from run to run)."""
    trajs = rollouts(tiny_policy, fvqa_samples[:8], [[[ANS]]] * 8, 1)
    batch = collate(trajs, range(8), tiny_policy, "cpu")
    split = plan_prefixes(batch, tiny_policy.model.config.image_token_id)
    assert split.group == [0] * 8
    grads = set()
    for _ in range(6):
        tiny_policy.model.zero_grad()
        (shared_logprobs(tiny_policy, batch, split)[0] * batch.loss_mask).sum().backward()
        grads.add(torch.cat([p.grad.flatten() for p in tiny_policy.model.parameters() if p.grad is not None]).numpy().tobytes())
    assert len(grads) == 1


def test_a_prefix_never_cuts_an_image():
    pad = 7
    row = [1, 2, 3, pad, pad, pad, 4, 5]
    assert [_outside_images(row, p, pad) for p in range(1, 8)] == [1, 2, 3, 3, 3, 6, 7]
    assert _outside_images(row, 5, None) == 5


def test_the_planner_stops_a_shared_prefix_before_an_image():
    """Row B copies row A but ends inside A's image (a zero-weight row: collate would refuse it, this builds
    the batch by hand): the ids and images agree through B's end, the planned prefix still stops at the image."""
    pad, zero = 7, 0
    a, b = [1, 2, 3, pad, pad, pad, pad, 4, 5, 6], [1, 2, 3, pad, pad, pad, zero, zero, zero, zero]
    ids = torch.tensor([a, b])
    attn = (torch.arange(10) < torch.tensor([[10], [6]])).long()
    loss = torch.zeros(2, 9)
    loss[0, 7:] = 1  # A sampled its last two tokens; B sampled none
    images = [VisionInput(Image.new("RGB", (56, 56)), torch.zeros(16, 8), (1, 4, 4), 4) for _ in range(2)]  # equal pixels
    batch = TrainBatch(ids, attn, torch.arange(10).expand(2, 10), loss, torch.zeros(2, 9), images, torch.arange(2))
    split = plan_prefixes(batch, pad, min_saved=0)
    assert split.group == [0, 0] and split.lengths == [3]  # the image's first pad, not B's last token (5)


def test_nothing_is_shared_when_it_saves_little(tiny_policy, fvqa_samples):
    trajs = rollouts(tiny_policy, fvqa_samples[:1], [[[ANS], [ANS]]], 2)
    batch = collate(trajs, range(2), tiny_policy, "cpu")
    image_id = tiny_policy.model.config.image_token_id
    prompt = plan_prefixes(batch, image_id, min_saved=0).lengths[0]  # the second row saves one prompt
    assert plan_prefixes(batch, image_id, min_saved=prompt) is not None
    assert plan_prefixes(batch, image_id, min_saved=prompt + 1) is None


def test_not_with_gradient_checkpointing(text_policy, fvqa_samples, monkeypatch):
    """Hugging Face drops the KV cache of a checkpointed layer: the suffixes would not see their prefix (packed
    rows share it there instead, ``tests/train/test_packed.py``)."""
    batch = group_batch(text_policy, fvqa_samples)
    monkeypatch.setattr(mmsr.train.batch, "shared_logprobs", None)  # must not be called
    text_policy.model.gradient_checkpointing_enable()
    try:
        assert not can_share(text_policy.model)
        checkpointed = sampled_logprobs(text_policy, batch, share_prefix=True)[0]
    finally:
        text_policy.model.gradient_checkpointing_disable()
    assert can_share(text_policy.model)
    torch.testing.assert_close(checkpointed, sampled_logprobs(text_policy, batch)[0] * batch.loss_mask, rtol=1e-4, atol=1e-5)


def test_a_grpo_update_is_the_same_with_shared_prefixes(tiny_policy, fvqa_samples, monkeypatch):
    """Two optimizer steps (two mini-batches, after a scoring pass for the old log-probs) of a GRPO update."""
    trajs = rollouts(tiny_policy, fvqa_samples[:2], GROUPS, 3)
    advantages = torch.tensor([1.0, -0.5, -0.5, 0.8, 0.2, -1.0])
    passes, shared_passes = [], []
    run_shared, run_any = mmsr.train.batch.shared_logprobs, mmsr.train.update.sampled_logprobs
    monkeypatch.setattr(mmsr.train.batch, "shared_logprobs", lambda *a, **k: shared_passes.append(1) or run_shared(*a, **k))
    monkeypatch.setattr(mmsr.train.update, "sampled_logprobs", lambda *a, **k: passes.append(1) or run_any(*a, **k))
    results = []
    for share in (False, True):
        model = TinyQwen2_5_VL(tokenizer_texts=TEXTS, scaffold=Scaffold(), seed=0).build().model.train()
        settings = UpdateSettings(mini_batches=2, kl_coef=0.0, share_prefix=share, micro_batch_tokens=16384)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)  # (Adam would magnify float noise on ~0 gradients)
        step = Backprop(model, opt, lambda loss: loss.backward(), torch.device("cpu"))
        metrics = PolicyUpdate(replace(tiny_policy, model=model), settings).update(trajs, advantages, None, step)
        results.append((metrics, torch.cat([p.detach().flatten() for p in model.parameters()])))
        # (a pass of one episode has nothing to share)
        assert len(passes) >= 3 and (0 < len(shared_passes) < len(passes) if share else not shared_passes)
        passes.clear()
    (whole, w_whole), (shared, w_shared) = results
    assert not torch.equal(w_whole, torch.cat([p.detach().flatten() for p in tiny_policy.model.parameters()]))
    torch.testing.assert_close(w_shared, w_whole, rtol=1e-4, atol=1e-6)
    for key in ("train/policy_loss", "train/entropy", "train/grad_norm"):
        assert shared[key] == pytest.approx(whole[key], rel=1e-4, abs=1e-6)
