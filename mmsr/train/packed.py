"""Shared prefixes as packed rows, for the models whose KV cache cannot carry gradients.

``mmsr.train.prefix`` runs a shared prefix once and fans its KV cache out to the rows; that needs a second
forward on top of a cache, which gradient checkpointing (Hugging Face turns the cache off in checkpointed
layers) and FSDP2 (one root forward per micro-batch on every rank) rule out -- the 7B recipes use both.
Here each prefix and the suffixes of the rows that continue it are laid out one after another in one
packed row, and a 4-D attention mask lets each suffix see the prefix and itself, not the other suffixes:

    packed row g:   [ prefix | suffix of row a | suffix of row b | ... | pad ]
    a's suffix attends to the prefix and to a's earlier tokens, b's to the prefix and to b's.

Positions are each token's own in its whole row (M-RoPE included), so every token sees the keys and
positions it sees in its whole row, and the log-probs are the whole rows' up to float rounding
(``tests/train/test_packed.py``). One root forward per micro-batch, as whole rows: it runs under FSDP2
and gradient checkpointing alike. Arbitrary masks need ``sdpa`` or ``eager`` attention: with
flash-attention 2 the rows are trained whole.

The mask is dense (``[G, 1, L, L]`` booleans, ``L`` the longest packed row): attention computes every
pair of a packed row, so a group's attention costs ``(P + n S)^2`` instead of ``n (P + S)^2`` while its
projections and MLPs run on ``P + n S`` tokens instead of ``n (P + S)``; ``plan_prefixes`` shares only
where that saves at least ``PASS_COST_TOKENS`` tokens, and a row that shares its prompt with no other row
is a packed row of its own (``merge_alone=False``: rows alike only in their instructions would attend over
every pair of each other's tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from mmsr.algo import logprobs_and_entropy
from mmsr.models.vision import VisionInput

if TYPE_CHECKING:
    from mmsr.models.policy import Policy
    from mmsr.train.batch import TrainBatch
    from mmsr.train.prefix import PrefixSplit

# attention implementations that take an arbitrary 4-D mask (transformers passes a 4-D mask through)
MASKED_ATTENTION = ("sdpa", "eager")


def can_pack(model: torch.nn.Module) -> bool:
    """Whether ``model``'s attention takes the packed rows' 4-D mask (not flash-attention 2)."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None) in MASKED_ATTENTION


@dataclass(frozen=True)
class PackedRows:
    """A micro-batch's ``n`` rows as ``G`` packed rows of ``L`` tokens.

    Attributes:
        input_ids: ``[G, L]``.
        position_ids: ``[3, G, L]`` (vision) or ``[G, L]``: each token's position in its whole row.
        segment: ``[G, L]`` 0 on a prefix, ``k + 1`` on the packed row's ``k``-th suffix, -1 on padding.
        column: ``[n, T]`` where each token of a whole row sits in its packed row (-1 past its end).
        vision: every image of the packed rows in order of appearance (a prefix's images once).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    segment: torch.Tensor
    column: torch.Tensor
    vision: list[VisionInput]

    def attention_mask(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``[G, 1, L, L]``: a token attends to earlier tokens of the prefix and of its own suffix; padding to
        itself (a query with no key would give NaN). Booleans (True: attend) for ``sdpa``; for ``eager``,
        ``dtype``'s additive form (0 or its lowest value)."""
        seg, width = self.segment, self.segment.shape[1]
        pos = torch.arange(width, device=seg.device)
        causal = pos[:, None] >= pos[None, :]  # [L, L]
        same = (seg[:, :, None] == seg[:, None, :]) | (seg[:, None, :] == 0)  # [G, L, L] query's own or a prefix key
        mask = (causal & same & (seg[:, None, :] >= 0)) | torch.eye(width, dtype=torch.bool, device=seg.device)
        mask = mask[:, None]
        if dtype is None:
            return mask
        return torch.zeros(mask.shape, dtype=dtype, device=seg.device).masked_fill(~mask, torch.finfo(dtype).min)


def pair_cost(config) -> float:
    """Forward FLOPs of attending one query to one key, in tokens through a layer's projections and MLP:
    ``4 q / (2 W)``, ``q`` the query width (heads x head dim), ``W`` a decoder layer's weights (q, k, v, o and
    the gated MLP). Qwen2.5-VL-7B: 3.1e-5 (a token costs as much as ~33,000 pairs); the CPU demo's policy 1.7e-3."""
    t = config.get_text_config()
    head = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    q, kv = t.num_attention_heads * head, t.num_key_value_heads * head
    weights = 2 * t.hidden_size * q + 2 * t.hidden_size * kv + 3 * t.hidden_size * t.intermediate_size
    return 2 * q / weights


def packed_sizes(lengths: list[int], split: PrefixSplit) -> list[int]:
    """Tokens of each packed row: its prefix once, then the rest of each row that continues it."""
    sizes = list(split.lengths)
    for i, g in enumerate(split.group):
        sizes[g] += lengths[i] - split.lengths[g]
    return sizes


def packed_pays(rows: int, width: int, packed_rows: int, packed_width: int, pairs_per_token: float) -> bool:
    """Whether ``packed_rows`` of ``packed_width`` tokens cost less than ``rows`` whole rows of ``width``: each
    way its padded tokens plus every pair of each padded row (SDPA attends over all of them under a mask, the
    packed rows' dense one or whole rows' padding) times ``pairs_per_token`` (``pair_cost``). At 7B sizes a
    group whose turns are long against its prompt trains cheaper whole: ``(P + n S)^2`` pairs outgrow the
    ``(n - 1) P`` tokens saved."""
    packed = packed_rows * packed_width * (1 + pairs_per_token * packed_width)
    return packed < rows * width * (1 + pairs_per_token * width)


def packing_pays(lengths: list[int], split: PrefixSplit, pairs_per_token: float) -> bool:
    """``packed_pays`` for ``split``'s packed rows against the whole rows of ``lengths``."""
    sizes = packed_sizes(lengths, split)
    return packed_pays(len(lengths), max(lengths), len(sizes), max(sizes), pairs_per_token)


def pack_rows(batch: TrainBatch, split: PrefixSplit, pad_id: int) -> PackedRows:
    """Lay out ``batch``'s rows as ``split``'s prefixes, each followed by the suffixes that continue it."""
    n, width = batch.input_ids.shape
    lengths = batch.attention_mask.sum(1).tolist()
    members = [[i for i in range(n) if split.group[i] == g] for g in range(len(split.lengths))]
    ids = batch.input_ids.new_full((len(members), max(packed_sizes(lengths, split))), pad_id)
    pos = batch.position_ids.new_zeros(*batch.position_ids.shape[:-2], *ids.shape)
    segment = torch.full_like(ids, -1)
    column = torch.full_like(batch.input_ids, -1)
    vision: list[VisionInput] = []
    for g, rows in enumerate(members):
        p, first = split.lengths[g], split.first[g]
        ids[g, :p], pos[..., g, :p], segment[g, :p] = batch.input_ids[first, :p], batch.position_ids[..., first, :p], 0
        vision += [v for start, v in split.images[first] if start < p]
        at = p
        for k, i in enumerate(rows):
            end = at + lengths[i] - p
            ids[g, at:end], pos[..., g, at:end] = batch.input_ids[i, p : lengths[i]], batch.position_ids[..., i, p : lengths[i]]
            segment[g, at:end] = k + 1
            column[i, :p] = torch.arange(p, device=column.device)  # made where it goes: no host copy per row
            column[i, p : lengths[i]] = torch.arange(at, end, device=column.device)
            vision += [v for start, v in split.images[i] if start >= p]
            at = end
    return PackedRows(ids, pos, segment, column, vision)


def packed_logprobs(policy: Policy, batch: TrainBatch, split: PrefixSplit, model: torch.nn.Module | None = None,
                    temperature: float = 1.0, with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """``sampled_logprobs`` of ``batch`` through packed rows: log-probs ``[n, T-1]`` (and entropies ``[n, T-1]``)
    where the row's own next token was sampled (loss mask 1), 0 elsewhere."""
    model = model if model is not None else policy.model
    packed = pack_rows(batch, split, policy.tokenizer.pad_token_id or 0)
    eager = model.config._attn_implementation == "eager"
    mask = packed.attention_mask(torch.float32 if eager else None)
    needed = batch.loss_mask.bool()  # [n, T-1]
    group = torch.tensor(split.group, device=needed.device)[:, None].expand_as(needed)  # [n, T-1]
    cols = packed.column[:, :-1].clamp(min=0, max=packed.input_ids.shape[1] - 2)  # [n, T-1] logits of t predict t+1
    used = torch.zeros(packed.input_ids.shape[0], packed.input_ids.shape[1] - 1, dtype=torch.bool, device=needed.device)
    used[group[needed], cols[needed]] = True
    keep = used.any(0).nonzero()[:, 0]  # [K] packed columns some row needs
    out = policy.forward(packed.input_ids, mask, packed.position_ids, packed.vision, model=model, logits_to_keep=keep)
    logp, entropy = logprobs_and_entropy(out.logits, packed.input_ids[:, 1:][:, keep], temperature=temperature,
                                         with_entropy=with_entropy)  # fmt: skip

    def back(values: torch.Tensor) -> torch.Tensor:  # [G, K] -> [n, T-1], 0 where the row sampled nothing
        full = values.new_zeros(used.shape).index_copy(1, keep, values)  # [G, L-1]
        return torch.where(needed, full.index_select(0, group[:, 0]).gather(1, cols), 0.0)

    return back(logp), back(entropy) if entropy is not None else None
