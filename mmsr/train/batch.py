"""Training-side batching: trajectories -> padded training tensors (``collate``), token-budget packing
of micro-batches (``pack_by_tokens``; as many on every rank: ``rank_micro_batches``) and the log-probs
of their sampled tokens (``sampled_logprobs``). Used by the GRPO update (``mmsr.train.update``) and
``SFTModule``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mmsr.algo import logprobs_and_entropy
from mmsr.models.policy import Policy, check_image_tokens
from mmsr.models.vision import VisionInput
from mmsr.parallel import all_reduce
from mmsr.rollout.trajectory import Trajectory
from mmsr.train.packed import can_pack, packed_logprobs, packed_pays, packing_pays, pair_cost
from mmsr.train.prefix import PASS_COST_TOKENS, can_share, plan_prefixes, shared_logprobs


@dataclass
class TrainBatch:
    """A right-padded micro-batch of n trajectories, T tokens.

    Attributes:
        input_ids: ``[n, T]``.
        attention_mask: ``[n, T]`` 1 on real tokens.
        position_ids: ``[3, n, T]`` M-RoPE ids, or ``[n, T]`` for text-only policies.
        loss_mask: ``[n, T-1]`` 1 where the *label* token (position t+1) was sampled by the policy.
        engine_logprobs: ``[n, T-1]`` the engine's log-prob of each label token (0 off-mask).
        vision: every image, row-major in order of appearance.
        index: ``[n]`` positions of these trajectories in the step's list.
        group: ``[n]`` each row's GRPO group (``Trajectory.group_id``); ``None`` when unknown.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    loss_mask: torch.Tensor
    engine_logprobs: torch.Tensor
    vision: list[VisionInput]
    index: torch.Tensor
    group: torch.Tensor | None = None

    @property
    def labels(self) -> torch.Tensor:
        """``[n, T-1]`` the next token at every position."""
        return self.input_ids[:, 1:]


def collate(trajs: Sequence[Trajectory], index: Sequence[int], policy: Policy, device: torch.device) -> TrainBatch:
    """Pad ``trajs`` to the longest; checks image tokens against images before any forward pass."""
    image_id = getattr(policy.model.config, "image_token_id", None)
    width = max(len(t) for t in trajs)
    n = len(trajs)
    pad_id = policy.tokenizer.pad_token_id or 0
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    attn, mask = torch.zeros(n, width, dtype=torch.long), torch.zeros(n, width)
    lps = torch.zeros(n, width)
    pos = None
    for b, t in enumerate(trajs):
        if policy.is_vision:
            check_image_tokens(t.input_ids, t.vision, image_id)
        seq = torch.tensor(t.input_ids, dtype=torch.long)
        p = policy.position_ids(seq, t.vision)
        pos = pos if pos is not None else torch.zeros(*p.shape[:-1], n, width, dtype=torch.long)
        ids[b, : len(t)], attn[b, : len(t)], pos[..., b, : len(t)] = seq, 1, p
        mask[b, : len(t)] = torch.tensor(t.loss_mask, dtype=torch.float)
        lps[b, : len(t)] = torch.tensor(t.logprobs)
    vision = [v for t in trajs for v in t.vision]
    return TrainBatch(ids.to(device), attn.to(device), pos.to(device), mask[:, 1:].to(device),
                      lps[:, 1:].to(device), vision, torch.tensor(list(index)),
                      torch.tensor([t.group_id for t in trajs]))  # fmt: skip


def pack_by_tokens(lengths: Sequence[int], budget: int, prompts: Sequence[tuple[int, int]] | None = None,
                   pairs_per_token: float = 0.0) -> list[list[int]]:  # fmt: skip
    """Group indices into micro-batches whose padded size stays within ``budget``, with the least padded
    tokens plus ``PASS_COST_TOKENS`` per micro-batch (packed rows: their attention pairs weighed too).

    Whole rows (``prompts`` ``None``): a micro-batch costs rows x longest; indices are taken longest first and
    cut into runs (similar lengths share a batch: less padding). Shared prefixes in packed rows (``prompts``:
    each index's GRPO group and shared prompt length, ``group_prompts``): a micro-batch costs its groups'
    packed rows (each group's prompt once, then its rows' turns: ``mmsr.train.packed``) x the longest where
    packing pays (``packed_pays`` at ``pairs_per_token``, as ``sampled_logprobs`` decides), its whole rows
    otherwise, and its cost counts each padded row's pairs x ``pairs_per_token`` (at 7B sizes a 16k-token
    packed row spends a third of its compute on them); a group's episodes stay together where the budget
    allows (split, each part runs the prompt again); groups are taken by packed length, longest first, each
    group's rows longest first. The cuts are the cheapest (dynamic programming over that order). Equal
    lengths give the fewest micro-batches the budget allows; a sequence longer than the budget gets one of
    its own.
    """
    order, runs = _whole_rows(lengths) if prompts is None else _groups_together(lengths, prompts, pairs_per_token)
    n = len(order)
    # cost[j]: the cheapest packing of order[:j]; its last run starts at cut[j]
    cost, cut = [0.0] + [math.inf] * n, [0] * (n + 1)
    for j in range(1, n + 1):
        for i, padded, floor, spent in runs(j):  # the last run is order[i:j]; floor never shrinks as it grows
            if floor > budget and i < j - 1:
                break
            if padded > budget and i < j - 1:
                continue
            if cost[i] + spent + PASS_COST_TOKENS <= cost[j]:  # ties: the longer run
                cost[j], cut[j] = cost[i] + spent + PASS_COST_TOKENS, i
    batches, j = [], len(order)
    while j:
        batches.append(order[cut[j] : j])
        j = cut[j]
    return batches[::-1]


def group_prompts(trajs: Sequence[Trajectory]) -> list[tuple[int, int]]:
    """Each episode's GRPO group and the tokens a packed row shares: the prompt but its last token, whose
    logits score the first sampled token (``plan_prefixes``)."""
    return [(t.group_id, t.prompt_len - 1) for t in trajs]


def _whole_rows(lengths: Sequence[int]):
    """Longest first; ``runs(j)`` yields ``(i, size, size, size)``, size = rows x longest of ``order[i:j]``,
    for i = j-1 down to 0."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])

    def runs(j: int):
        for i in range(j - 1, -1, -1):
            size = (j - i) * lengths[order[i]]
            yield i, size, size, size

    return order, runs


def _groups_together(lengths: Sequence[int], prompts: Sequence[tuple[int, int]], pairs_per_token: float):
    """Groups by packed length, longest first, each group's rows longest first; ``runs(j)`` yields ``(i, size,
    floor, cost)`` for i = j-1 down to 0 (a group's rows are adjacent): ``order[i:j]``'s size as it will run
    (packed rows: groups x the longest packed row, or rows x the longest row), the smaller of the two, and
    the size plus its rows' pairs x ``pairs_per_token``."""
    members: dict[int, list[int]] = {}
    for i, (group, _) in enumerate(prompts):
        members.setdefault(group, []).append(i)
    packed = {g: lengths[rows[0]] + sum(lengths[i] - prompts[i][1] for i in rows[1:]) for g, rows in members.items()}
    order = [i for g in sorted(members, key=lambda g: -packed[g]) for i in sorted(members[g], key=lambda i: -lengths[i])]

    def runs(j: int):
        longest = current = count = widest = saved = 0
        for i in range(j - 1, -1, -1):
            row = order[i]
            if i < j - 1 and prompts[order[i + 1]][0] == prompts[row][0]:  # the group the run starts with
                current, saved = current + lengths[row] - prompts[row][1], saved + prompts[row][1]
            else:
                longest, current, count = max(longest, current), lengths[row], count + 1
            widest, width = max(widest, lengths[row]), max(longest, current)
            rows, wide = (count, width) if saved >= PASS_COST_TOKENS and packed_pays(j - i, widest, count, width,
                                                                                     pairs_per_token) else (j - i, widest)  # fmt: skip
            yield i, rows * wide, min(count * width, (j - i) * widest), rows * wide * (1 + pairs_per_token * wide)

    return order, runs


def rank_micro_batches(lengths: Sequence[int], budget: int, device: torch.device,
                       prompts: Sequence[tuple[int, int]] | None = None, pairs_per_token: float = 0.0
                       ) -> list[list[int] | None]:  # fmt: skip
    """``pack_by_tokens``, padded with ``None`` (run as a zero-weight pass) to the most any rank has:
    DDP and FSDP2 hang unless every rank runs as many forward/backward passes."""
    micros: list[list[int] | None] = pack_by_tokens(lengths, budget, prompts, pairs_per_token)
    return micros + [None] * (int(all_reduce(len(micros), "max", device)) - len(micros))


def sampled_logprobs(policy: Policy, batch: TrainBatch, model: torch.nn.Module | None = None, temperature: float = 1.0,
                     with_entropy: bool = False, share_prefix: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """Log-probs ``[n, T-1]`` of the next tokens (and entropies ``[n, T-1]``) under ``model`` (default: the
    policy), where some row of the micro-batch sampled its label (loss mask 1), 0 elsewhere: nothing reads them.

    The LM head only runs at those ``K`` positions (``logits_to_keep``): the logits are ``[n, K, V]``, not
    ``[n, T, V]`` (prompts, tool results and image tokens are most of a multi-turn sequence), and the
    log-softmax is chunked over them (``mmsr.algo.logprobs``). ``share_prefix``: rows that share a prefix
    run it once where that saves enough tokens (``prefix_route``): through a KV cache (``mmsr.train.prefix``)
    on the CPU when ``model`` allows it, else in packed rows (``mmsr.train.packed``: on a GPU, under gradient
    checkpointing, FSDP2) when its attention takes a 4-D mask and their dense attention costs less than the
    tokens saved (``packing_pays``); whole rows otherwise (flash-attention 2).
    """
    model = model if model is not None else policy.model
    shared = prefix_route(model, batch.input_ids.device) if share_prefix else None
    if shared is not None:
        image_token_id = getattr(policy.model.config, "image_token_id", None)
        split = shared_split(batch, image_token_id, shared is shared_logprobs, pair_cost(policy.model.config))
        if split is not None:
            return shared(policy, batch, split, model, temperature, with_entropy)
    keep = batch.loss_mask.any(0).nonzero()[:, 0]  # [K] positions t whose label t+1 was sampled
    out = policy.forward(batch.input_ids, batch.attention_mask, batch.position_ids, batch.vision, model=model,
                         logits_to_keep=keep)  # fmt: skip
    logp, entropy = logprobs_and_entropy(out.logits, batch.labels[:, keep], temperature=temperature,
                                         with_entropy=with_entropy)  # fmt: skip
    spread = lambda x: x.new_zeros(batch.labels.shape).index_copy(1, keep, x)  # noqa: E731 - [n, K] -> [n, T-1]
    return spread(logp), spread(entropy) if entropy is not None else None


def shared_split(batch: TrainBatch, image_token_id: int | None, cached: bool, pairs_per_token: float):
    """The prefixes ``batch`` trains on (a ``PrefixSplit``; ``None``: whole rows): through the KV cache
    (``cached``) as ``plan_prefixes`` shares them, in packed rows each row apart from the rows it shares no
    prompt with, and only where that costs less than whole rows (``packing_pays`` at ``pairs_per_token``)."""
    split = plan_prefixes(batch, image_token_id, merge_alone=cached)
    if split is None or cached or packing_pays(batch.attention_mask.sum(1).tolist(), split, pairs_per_token):
        return split
    return None


def packs_rows(model: torch.nn.Module, device: torch.device) -> bool:
    """Whether ``model`` shares prefixes in packed rows (``mmsr.train.packed``) on ``device``."""
    return prefix_route(model, device) is packed_logprobs


def prefix_route(model: torch.nn.Module, device: torch.device):
    """How ``model`` trains on shared prefixes on ``device``: ``shared_logprobs`` (a KV cache), ``packed_logprobs``
    (packed rows under a 4-D mask) or ``None`` (whole rows: flash-attention 2 takes no such mask).

    The KV cache only on the CPU, where ``model`` can carry gradients through one (no checkpointing, no
    FSDP2): there it is the faster way (1.57x whole rows against packed rows' 1.27-1.35x), while on an H200
    in bf16 it ran at 0.57-0.73x of whole rows and packed rows at 2.0-2.1x (README, Performance)."""
    if device.type == "cpu" and can_share(model):
        return shared_logprobs
    return packed_logprobs if can_pack(model) else None
