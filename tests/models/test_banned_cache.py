"""Policy.mask_banned's cached banned ids follow the logits to their device."""

from dataclasses import replace
from types import SimpleNamespace

import torch

from mmsr.models.policy import BANNED_LOGIT


def test_banned_ids_follow_the_logits_to_another_device(tiny_policy):
    """A policy first run on one device, then moved (CPU, then GPU): the cached ids must move too. The
    meta device stands in for the GPU; index_fill refuses an index on another device."""
    policy = replace(tiny_policy, _banned=None, _banned_vocab=0)
    vocab = len(tiny_policy.tokenizer) + 4  # ids past the tokenizer are banned
    cpu = policy.mask_banned(SimpleNamespace(logits=torch.zeros(1, 2, vocab))).logits
    assert policy._banned.numel() and (cpu[..., policy._banned] == BANNED_LOGIT).all()
    moved = policy.mask_banned(SimpleNamespace(logits=torch.zeros(1, 2, vocab, device="meta"))).logits
    assert moved.device.type == "meta" and policy._banned.device.type == "meta"
    back = policy.mask_banned(SimpleNamespace(logits=torch.zeros(1, 2, vocab))).logits
    assert torch.equal(back, cpu)
