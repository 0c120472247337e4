"""Shared-prefix training: a prefix that rows of a micro-batch share is run once, its KV cache fanned
out to those rows, and each row runs only its own suffix on top of it.

In a GRPO step the ``n`` samples of a group start from one prompt (system text, instructions, the
question's image), and in a warm-start batch every episode starts with the same instructions; trained
whole, each row runs its prompt (and its image through the vision tower) again. Here the rows that
start from the same prompt share it, and the rows left on their own share their longest common prefix:
the prefix runs once (images included) with a KV cache, the cache is copied out to the rows
(``index_select``: gradients from every row sum into the prefix, in order), and the suffixes attend to it
with their own positions. The log-probs are those of the whole rows up to float rounding (``tests/train/test_prefix.py``).

Not used where the cache cannot carry gradients: with gradient checkpointing (the recomputation would
append to the cache again) or under FSDP2 (a second forward of the sharded root on one rank only, and
tool images reaching the vision tower on some ranks and not others, would hang the collectives). There
rows of one GRPO group that start alike run as packed rows in one forward (``mmsr.train.packed``; a row that
shares its prompt with no group-mate runs whole: ``plan_prefixes``' ``merge_alone``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from mmsr.algo import logprobs_and_entropy
from mmsr.models.vision import VisionInput, distinct_images

if TYPE_CHECKING:
    from mmsr.models.policy import Policy
    from mmsr.train.batch import TrainBatch

# What one more forward/backward costs beyond its tokens, in padded tokens: what a micro-batch costs
# (``mmsr.train.batch.pack_by_tokens``) and the fewest tokens a prefix split must save to pay for its
# prefix pass. On the CPU demo's warm start (10 episodes of 234 tokens, 6 of 326-329) two micro-batches by
# length trained in 0.29-0.39 s where one padded to 329 took 0.41-0.49 s.
PASS_COST_TOKENS = 256


@dataclass(frozen=True)
class PrefixSplit:
    """How a micro-batch's ``n`` rows continue ``G`` shared prefixes.

    Attributes:
        group: ``n`` entries, the prefix each row continues.
        lengths: ``G`` prefix lengths in tokens, each >= 1 and short of the first position whose
            next token the row sampled (that position's logits are the suffix's).
        first: ``G`` entries, a row that holds each prefix.
        images: ``n`` entries, each row's images with the position of their first token.
    """

    group: list[int]
    lengths: list[int]
    first: list[int]
    images: list[list[tuple[int, VisionInput]]]

    @property
    def saved(self) -> int:
        """Tokens the rows do not run again."""
        return sum(self.lengths[g] for g in self.group) - sum(self.lengths)


def can_share(model: torch.nn.Module) -> bool:
    """Whether ``model`` can train on shared prefixes (no gradient checkpointing, not FSDP2-sharded)."""
    from torch.distributed.fsdp import FSDPModule

    return not getattr(model, "is_gradient_checkpointing", False) and not isinstance(model, FSDPModule)


def plan_prefixes(batch: TrainBatch, image_token_id: int | None, min_saved: int = PASS_COST_TOKENS,
                  merge_alone: bool = True) -> PrefixSplit | None:  # fmt: skip
    """The rows that start from one prompt (up to their first sampled token; images compared by their
    pixels) share it; the other rows share their longest common prefix (``merge_alone``), or each stands
    alone, its prompt a prefix of its own, and rows of two GRPO groups never share (packed rows,
    ``mmsr.train.packed``: rows alike in their instructions only, or two groups of a question drawn twice,
    would make one packed row whose dense mask spans every pair of their tokens, longer than the update's
    micro-batch cost counts one group's). ``None``: it would save fewer than ``min_saved`` tokens, or a set of
    rows has no common first token."""
    ids, lengths = batch.input_ids.tolist(), batch.attention_mask.sum(1).tolist()
    images = _images_by_row(batch, image_token_id)
    keys = _token_keys(ids, images)
    needed = [_first_needed(row, n) for row, n in zip(batch.loss_mask.tolist(), lengths)]
    groups = batch.group.tolist() if batch.group is not None and not merge_alone else [None] * len(ids)
    by_prompt: dict[tuple, list[int]] = {}
    for i, (row, k) in enumerate(zip(keys, needed)):
        by_prompt.setdefault((groups[i], *row[:k]), []).append(i)
    sets = [rows for rows in by_prompt.values() if len(rows) > 1]
    alone = [rows[0] for rows in by_prompt.values() if len(rows) == 1]
    sets += ([alone] if alone else []) if merge_alone else [[i] for i in alone]
    group, plen, first = [0] * len(ids), [], []
    for g, rows in enumerate(sets):
        p = _common_length([keys[i] for i in rows], min(needed[i] for i in rows))
        p = min(_outside_images(ids[i], p, image_token_id) for i in rows)
        if p < 1:
            return None
        plen.append(p)
        first.append(rows[0])
        for i in rows:
            group[i] = g
    split = PrefixSplit(group, plen, first, images)
    return split if split.saved >= min_saved else None


def _token_keys(ids: list[list[int]], images: list[list[tuple[int, VisionInput]]]) -> list[list]:
    """The rows' tokens, an image's pad tokens paired with the image: two rows with different images of
    one size have the same ids but not the same prefix. Images are one when their grids and pixels are
    equal (``distinct_images``: by content, never by object, as the split must not depend on which
    episodes happened to hold one decoded picture, or runs would differ in the last bits)."""
    keys: list[list] = [list(row) for row in ids]
    _, which = distinct_images([v for row_images in images for _, v in row_images])
    image = iter(which)
    for row, row_images in zip(keys, images):
        for start, v in row_images:
            k = next(image)
            row[start : start + v.num_tokens] = [(tok, k) for tok in row[start : start + v.num_tokens]]
    return keys


def _first_needed(mask_row: Sequence[float], length: int) -> int:
    """The first position whose logits the loss reads (its next token was sampled); the last token's
    position when none is (a zero-weight row)."""
    return next((t for t, m in enumerate(mask_row) if m), length - 1)


def _common_length(rows: list[list], cap: int) -> int:
    """Length of the rows' longest common prefix, at most ``cap``."""
    p = 0
    while p < cap and all(r[p] == rows[0][p] for r in rows):
        p += 1
    return p


def _outside_images(row: list[int], p: int, image_token_id: int | None) -> int:
    """``p``, moved back to the start of the image it would cut (an image's tokens go to one forward)."""
    if image_token_id is None:
        return p
    while 0 < p < len(row) and row[p] == image_token_id and row[p - 1] == image_token_id:
        p -= 1
    return p


def shared_logprobs(policy: Policy, batch: TrainBatch, split: PrefixSplit, model: torch.nn.Module | None = None,
                    temperature: float = 1.0, with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """``sampled_logprobs`` of ``batch`` through ``split``: log-probs ``[n, T-1]`` (and entropies ``[n, T-1]``)
    where the row's own next token was sampled (loss mask 1), 0 elsewhere."""
    n, width = batch.input_ids.shape
    dev, pad_id = batch.input_ids.device, policy.tokenizer.pad_token_id or 0
    starts = torch.tensor([split.lengths[g] for g in split.group], device=dev)  # [n] each row's prefix length
    images = split.images
    cache, prefix_mask = _run_prefixes(policy, batch, split, images, model, pad_id)
    _fan_out(cache, torch.tensor(split.group, device=dev))
    lengths = batch.attention_mask.sum(1)
    cols = torch.arange(int((lengths - starts).max()), device=dev)  # [W] suffix columns
    where = (starts[:, None] + cols).clamp(max=width - 1)  # [n, W] their positions in the whole row
    real = cols < (lengths - starts)[:, None]  # [n, W]
    ids = torch.where(real, batch.input_ids.gather(1, where), pad_id)
    pos = batch.position_ids.gather(-1, where.expand_as(batch.position_ids[..., : where.shape[1]]))
    mask = batch.loss_mask.gather(1, where[:, :-1].clamp(max=width - 2)) * real[:, 1:]  # [n, W-1]
    keep = mask.any(0).nonzero()[:, 0]  # [K]
    vision = [v for i in range(n) for v in images[i] if v[0] >= split.lengths[split.group[i]]]
    attn = torch.cat([prefix_mask[split.group], real.long()], 1)  # [n, P + W]: the prefix, then the row's own
    out = policy.forward(ids, attn, pos, [v for _, v in vision], model=model, past_key_values=cache, use_cache=True,
                         logits_to_keep=keep)  # fmt: skip
    logp, entropy = logprobs_and_entropy(out.logits, ids[:, 1:][:, keep], temperature=temperature,
                                         with_entropy=with_entropy)  # fmt: skip
    back = lambda x: _to_rows(x, starts[:, None] + keep, batch.loss_mask)  # noqa: E731 - [n, K] -> [n, T-1]
    return back(logp), back(entropy) if entropy is not None else None


def _run_prefixes(policy, batch, split, images, model, pad_id: int):
    """The ``G`` prefixes in one forward, right-padded; returns their KV cache and mask ``[G, P]``."""
    first, dev = torch.tensor(split.first, device=batch.input_ids.device), batch.input_ids.device
    width = max(split.lengths)
    mask = torch.arange(width, device=dev) < torch.tensor(split.lengths, device=dev)[:, None]  # [G, P]
    ids = torch.where(mask, batch.input_ids[first, :width], pad_id)  # no stray image pads past a prefix
    pos = batch.position_ids[..., first, :width]
    vision = [v for g, row in enumerate(split.first) for start, v in images[row] if start < split.lengths[g]]
    out = policy.forward(ids, mask.long(), pos, vision, model=model, use_cache=True, logits_to_keep=1)
    return out.past_key_values, mask.long()


def _fan_out(cache, rows: torch.Tensor) -> None:
    """Each layer's prefix keys and values ``[G, heads, P, head_dim]`` -> the rows' ``[n, heads, P, head_dim]``.

    ``index_select``, whose backward (``index_add_``) sums a prefix's row gradients in order; indexing
    (``Cache.batch_select_indices``) sums them with atomic adds on the CPU, in an order that varied from
    run to run, and so did the gradients' last bits.
    """
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys.index_select(0, rows), layer.values.index_select(0, rows)


def _images_by_row(batch: TrainBatch, image_token_id: int | None) -> list[list[tuple[int, VisionInput]]]:
    """Each row's images with the position of their first token (``batch.vision`` is row-major)."""
    rows: list[list[tuple[int, VisionInput]]] = [[] for _ in range(batch.input_ids.shape[0])]
    if not batch.vision:
        return rows
    queue = iter(batch.vision)
    for i, row in enumerate(batch.input_ids.tolist()):
        pads = [t for t, tok in enumerate(row) if tok == image_token_id]
        used = 0
        while used < len(pads):
            v = next(queue)
            rows[i].append((pads[used], v))
            used += v.num_tokens
    return rows


def _to_rows(values: torch.Tensor, cols: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Suffix values ``[n, K]`` at whole-row columns ``cols`` ``[n, K]`` -> ``[n, T-1]``, kept where the row's
    own loss mask is 1 (a column another row needed is not this row's)."""
    n, width = loss_mask.shape
    rows = values.new_zeros(n, width + int(cols.max()) + 1 if cols.numel() else width)
    rows = rows.scatter(1, cols, values)[:, :width]
    return torch.where(loss_mask.bool(), rows, torch.zeros_like(rows))
