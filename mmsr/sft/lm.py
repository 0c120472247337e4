"""Next-token prediction on plain texts: the warm start's reading steps (``SFTModule.reading``) and ``lm_loss``.

Texts are encoded once per step (``encode_texts``): the step packs them into passes by their lengths
(``reading_passes``), then runs each pass on the same ids (``ids_nll``).
"""

from __future__ import annotations

import torch

from mmsr.algo import logprobs_and_entropy
from mmsr.models.policy import Policy
from mmsr.train.batch import pack_by_tokens


def reading_passes(lengths: list[int], budget: int) -> list[list[int]]:
    """The micro-batches (indices) of texts of token ``lengths``: all of them in order, in one pass, when their
    padded size (texts x longest) fits ``budget``; else ``pack_by_tokens``'s (a text over it alone)."""
    if len(lengths) * max(lengths, default=0) <= budget:
        return [list(range(len(lengths)))]
    return pack_by_tokens(lengths, budget)


def encode_texts(policy: Policy, texts: list[str]) -> list[list[int]]:
    """Each of ``texts``' token ids, as next-token prediction reads them."""
    # pages are text from outside: one that quotes ``<|im_end|>`` or ``<|image_pad|>`` must not train a special token
    plain = list(map(policy.encoder().plain, texts))
    return policy.tokenizer(plain, add_special_tokens=False)["input_ids"]


def lm_loss(policy: Policy, texts: list[str], device: torch.device | str) -> torch.Tensor:
    """Token-mean next-token negative log-likelihood of ``texts`` (text only, right-padded).

    Returns: a scalar tensor; padding (``attention_mask`` 0) is excluded.
    """
    nll, count = lm_nll(policy, texts, device)
    return nll / count.clamp(min=1)


def lm_nll(policy: Policy, texts: list[str], device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token negative log-likelihood of ``texts`` (text only, right-padded) and its token count.

    Returns: two scalar tensors; padding (``attention_mask`` 0) is excluded.
    """
    return ids_nll(policy, encode_texts(policy, texts), device)


def ids_nll(policy: Policy, ids: list[list[int]], device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """``lm_nll`` of texts already encoded (``encode_texts``): two scalar tensors, the summed NLL and its count."""
    # right-padded whatever the tokenizer's default: the targets and positions below count from the left
    enc = policy.tokenizer.pad({"input_ids": ids}, padding=True, padding_side="right", return_tensors="pt")
    tokens, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)  # [N, T] each
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [N, T]
    if policy.is_vision:
        positions = positions[None].expand(3, -1, -1)  # M-RoPE: text tokens share t = h = w
    out = policy.forward(tokens, mask, positions, [])
    logp, _ = logprobs_and_entropy(out.logits[:, :-1], tokens[:, 1:], with_entropy=False)  # [N, T-1]
    target = mask[:, 1:].to(logp.dtype)
    return -(logp * target).sum(), target.sum()
