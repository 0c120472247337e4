"""Policy.banned_token_ids: which ids are banned; Policy.mask_banned's cached banned ids follow the logits to
their device."""

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


# Written out, not read from BANNED_TOKENS: a token dropped from that tuple must fail here.
SPECIALS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|im_start|>")


def test_the_vision_specials_and_im_start_are_banned_but_not_the_end_of_turn(tiny_policy):
    """A sampled image pad breaks every later forward's image-token count (upstream issue #20); a sampled
    ``<|im_start|>`` opens a turn the chat format never closes. ``<|im_end|>`` ends a turn: never banned."""
    tok = tiny_policy.tokenizer
    ids = tok.convert_tokens_to_ids(list(SPECIALS))
    assert tok.unk_token_id not in ids and len(set(ids)) == len(SPECIALS)  # each is a token of its own
    banned = set(tiny_policy.banned_token_ids(len(tok)).tolist())
    assert {t: i in banned for t, i in zip(SPECIALS, ids)} == dict.fromkeys(SPECIALS, True)
    assert tok.convert_tokens_to_ids("<|im_end|>") not in banned


def test_padded_vocabulary_rows_past_the_tokenizer_are_banned(tiny_policy):
    """A model whose embedding has 3 rows more than the tokenizer's N tokens (vocab padded for the kernels):
    ids N, N+1, N+2 decode to nothing, so they are banned with the specials, and nothing else is."""
    n = len(tiny_policy.tokenizer)
    specials = set(tiny_policy.tokenizer.convert_tokens_to_ids(list(SPECIALS)))
    assert tiny_policy.banned_token_ids(n + 3).tolist() == sorted(specials | {n, n + 1, n + 2})
    assert tiny_policy.banned_token_ids(n).tolist() == sorted(specials)  # unpadded: the specials alone
