"""Shared-prefix training against whole rows: the forward and backward passes of one GRPO update's
micro-batches, both ways, alternated in one run.

    python benchmarks/shared_prefix.py [--repeats 5] [--groups 4] [--generations 8] [--route cache|packed]
                                       [--checkpointed] [--device cuda] [--hidden 2048 --layers 16] [--bf16]

The workload: the CPU demo's policy shape (a random tiny Qwen2.5-VL: hidden 128, 4 layers, 4 heads,
FFN 256, vision depth 2, a ~1,024-token BPE), ``groups`` FVQA dev questions with their images and the
default MMSearch-R1 prompt, ``generations`` scripted episodes each (answers at once, image search with
two thumbnails then an answer, text search then an answer, in turn), packed into micro-batches as the
update packs them (``micro_batch_tokens`` 4096: by length, and for packed rows a group's episodes
together, their attention pairs weighed as the policy's ``pair_cost``). The loss is the log-probs'
masked sum with a weight per row, like advantages. ``--route``: the shared prefixes (``shared_split``, as
the update splits them) run through a KV cache (``mmsr.train.prefix``, what a single process without
checkpointing takes on the CPU) or in packed rows under a 4-D mask (``mmsr.train.packed``, what a GPU,
gradient checkpointing and FSDP2 take: the 7B recipes); ``--checkpointed`` checkpoints the layers both ways (as the
recipes; packed rows only). ``--device``: where the passes run (the episodes are scripted on the CPU);
``--hidden``/``--layers`` size the decoder up (heads of 128, FFN twice the width), for a GPU, where the
demo's shape measures kernel launches more than arithmetic; ``--bf16`` runs the forwards under bf16 autocast
(fp32 weights, bf16 matmuls: the recipes' ``bf16-mixed``).

Prints one JSON object: tokens each way (whole rows: their padded widths; shared: the prefixes' and the
suffixes'), the median seconds of all passes each way, whole / shared, the largest log-prob difference
between the ways (float rounding: the same numbers, summed in another order), and on paper the forward's
TFLOPs each way at Qwen2.5-VL-7B's decoder sizes over the same episodes (``paper_tflops``: at hidden 128
attention is a large part of a pass; at 3,584 the projections and MLP are most of it), packed rows
micro-batched and chosen as a 7B update would (a pair weighed at 7B's ratio).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from functools import partial
from pathlib import Path

import torch
from PIL import Image

from mmsr.data.loaders import load_samples
from mmsr.demo.tokenizer import Scaffold
from mmsr.models.build import TinyQwen2_5_VL
from mmsr.prompt.render import PromptBuilder
from mmsr.rollout.engine import SamplingParams, ScriptedEngine
from mmsr.rollout.loop import RolloutLoop, RolloutSettings
from mmsr.tools.base import IMAGE_MARKER, ToolRequest, ToolResult
from mmsr.train.batch import collate, group_prompts, pack_by_tokens, sampled_logprobs, shared_split
from mmsr.train.packed import pack_rows, packed_logprobs, pair_cost
from mmsr.train.prefix import shared_logprobs

ROUTES = {"cache": shared_logprobs, "packed": packed_logprobs}

ROOT = Path(__file__).resolve().parents[1]
FVQA = ROOT / "data" / "fvqa_dev_20"
REASON = "<reason>I am not sure what this shows, so I look it up before I answer.</reason>"
SCRIPTS = [[f"{REASON}<answer>the old stone tower</answer>"],
           [f"{REASON}<search><img></search>", "<reason>The first result names it.</reason><answer>Eiffel</answer>"],
           [f"{REASON}<text_search>where is the tower</text_search>", "<reason>The page says.</reason><answer>Paris</answer>"]]  # fmt: skip


class Thumbnails:
    """An image search answering with two thumbnails and their titles."""

    async def __call__(self, request: ToolRequest) -> ToolResult:
        thumbs = (Image.new("RGB", (56, 56), "red"), Image.new("RGB", (84, 56), "blue"))
        return ToolResult(f"1. image: {IMAGE_MARKER}\ntitle: Eiffel\n2. image: {IMAGE_MARKER}\ntitle: Louvre\n", thumbs)


class Pages:
    """A text search answering with one page's text."""

    async def __call__(self, request: ToolRequest) -> ToolResult:
        return ToolResult("1. The tower stands in Paris, on the left bank of the river, since 1889.")


def episodes(groups: int, generations: int, **policy_args):
    """The policy (the demo's shape, ``policy_args`` on top) and ``groups`` x ``generations`` scripted episodes."""
    texts = [str(FVQA / "fvqa_dev.jsonl"), str(FVQA / "search" / "corpus.jsonl")]
    shape = dict(vocab_size=1024, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=256,
                 vision_depth=2, vision_hidden_size=64, seed=0)  # fmt: skip
    policy = TinyQwen2_5_VL(tokenizer_texts=texts, scaffold=Scaffold(), **shape | policy_args).build()
    samples = load_samples(FVQA / "fvqa_dev.jsonl")[:groups]
    script = {f"{s.id}#{k}": SCRIPTS[k % len(SCRIPTS)] for s in samples for k in range(generations)}
    tools = {"image_search": Thumbnails(), "text_search": Pages()}
    loop = RolloutLoop(ScriptedEngine(script, policy.tokenizer), policy, PromptBuilder(), tools, RolloutSettings())
    return policy, loop.run(samples, generations, SamplingParams())


def packed_as_the_update(policy, trajs, groups_together: bool, pairs_per_token: float | None = None,
                         device: str = "cpu") -> list:  # fmt: skip
    """The micro-batches the update makes (``micro_batch_tokens`` 4096) on ``device``: by length, or a group's
    episodes together (packed rows), a pair weighed as ``pairs_per_token`` tokens (default: ``pair_cost``)."""
    prompts = group_prompts(trajs) if groups_together else None
    pairs = pair_cost(policy.model.config) if pairs_per_token is None else pairs_per_token
    micros = pack_by_tokens([len(t) for t in trajs], 4096, prompts, pairs)
    return [collate([trajs[i] for i in micro], micro, policy, device) for micro in micros]


def decoder_size(hidden: int | None, layers: int | None) -> dict[str, int]:
    """``TinyQwen2_5_VL`` arguments of a decoder ``hidden`` wide and ``layers`` deep (none: the demo's shape)."""
    size = {"num_layers": layers} if layers else {}
    if hidden:
        heads = max(4, hidden // 128)
        size |= dict(hidden_size=hidden, num_heads=heads, num_kv_heads=heads // 2, intermediate_size=2 * hidden)
    return size


def micro_batches(groups: int, generations: int, **policy_args):
    """The policy and the update's whole-row micro-batches of ``groups`` x ``generations`` scripted episodes."""
    policy, trajs = episodes(groups, generations, **policy_args)
    return policy, packed_as_the_update(policy, trajs, groups_together=False)


def passes(policy, batches: dict, shared: bool, route: str = "cache",
           bf16: bool = False) -> tuple[float, list[torch.Tensor]]:
    """Seconds of every micro-batch's forward and backward (``batches[shared]``), and each episode's masked
    log-probs ``[len - 1]`` in episode order. ``bf16``: the forward under bf16 autocast (the recipes'
    ``bf16-mixed``: fp32 weights, bf16 matmuls)."""
    image_id, out = policy.model.config.image_token_id, {}
    synchronize(policy.model.device)
    start = time.perf_counter()
    for batch in batches[shared]:
        split = shared_split(batch, image_id, route == "cache", pair_cost(policy.model.config)) if shared else None
        with torch.autocast(policy.model.device.type, torch.bfloat16, enabled=bf16):
            logp = ROUTES[route](policy, batch, split) if split else sampled_logprobs(policy, batch)
        logp = logp[0] * batch.loss_mask
        weights = torch.linspace(-1.0, 1.0, len(batch.index), device=logp.device)[:, None]
        (logp * weights).sum().backward()
        for row, (i, n) in enumerate(zip(batch.index.tolist(), batch.attention_mask.sum(1).tolist())):
            out[i] = logp[row, : n - 1].detach()
    policy.model.zero_grad(set_to_none=True)
    synchronize(policy.model.device)  # a GPU runs the passes asynchronously: the clock waits for them
    return time.perf_counter() - start, [out[i].cpu() for i in sorted(out)]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tokens(policy, batches: dict, route: str) -> dict[str, int]:
    whole = sum(b.input_ids.numel() for b in batches[False])
    shared = 0
    for b in batches[True]:
        split = shared_split(b, policy.model.config.image_token_id, route == "cache", pair_cost(policy.model.config))
        shared += b.input_ids.numel() if split is None else (int(b.attention_mask.sum()) - split.saved)
    return {"whole": whole, "shared": shared, "real": sum(int(b.attention_mask.sum()) for b in batches[False])}


# Qwen2.5-VL-7B's decoder on paper: FLOPs of a token's projections and MLP (forward, 2 per weight), and of a
# query-key pair's scores and weighted values (4 per head dimension), over its 28 layers
HIDDEN, KV, FFN, LAYERS = 3584, 512, 18944, 28
PER_TOKEN = 2 * (2 * HIDDEN * HIDDEN + 2 * HIDDEN * KV + 3 * HIDDEN * FFN) * LAYERS
PER_PAIR = 4 * HIDDEN * LAYERS


def paper_tflops(policy, batches: list, route: str | None) -> float:
    """A forward's TFLOPs at Qwen2.5-VL-7B's decoder sizes over ``batches`` (vision tower left out): whole rows
    (``route`` ``None``) attend causally (flash-attention), a packed row over every pair (its dense mask), a
    cached prefix causally and each suffix to the prefix and itself."""
    flops = 0.0
    for b in batches:
        split = shared_split(b, policy.model.config.image_token_id, route == "cache", PER_PAIR / PER_TOKEN) if route else None
        lengths = b.attention_mask.sum(1).tolist()
        if split is None:
            flops += sum(n * PER_TOKEN + n * n / 2 * PER_PAIR for n in lengths)
        elif route == "packed":
            packed = pack_rows(b, split, 0)
            flops += sum(n * PER_TOKEN + n * n * PER_PAIR for n in (packed.segment >= 0).sum(1).tolist())
        else:
            flops += sum(p * PER_TOKEN + p * p / 2 * PER_PAIR for p in split.lengths)
            suffixes = [(n - split.lengths[g], split.lengths[g]) for n, g in zip(lengths, split.group)]
            flops += sum(w * PER_TOKEN + w * (p + w / 2) * PER_PAIR for w, p in suffixes)
    return flops / 1e12


def paper(policy, trajs, batches: dict, route: str) -> dict[str, float]:
    """``paper_tflops`` of whole rows and of shared prefixes, packed rows micro-batched as a 7B update would
    (weighing a pair at 7B's ratio, not the tiny policy's)."""
    shared = packed_as_the_update(policy, trajs, True, PER_PAIR / PER_TOKEN) if route == "packed" else batches[True]
    return {"whole": paper_tflops(policy, batches[False], None), "shared": paper_tflops(policy, shared, route)}


def alternated(passes, policy, batches, repeats: int) -> tuple[float, float, float]:
    """Median seconds of ``passes(policy, batches, False)`` and of ``passes(policy, batches, True)``, run in
    turn ``repeats`` times after a warm-up of each, and the largest log-prob difference between the two ways."""
    for way in (False, True):  # warm-up of both: each way has its own first-call paths (and shapes to allocate)
        passes(policy, batches, way)
    times: dict[bool, list[float]] = {False: [], True: []}
    diff = 0.0
    for _ in range(repeats):
        outs = []
        for way in (False, True):
            seconds, logp = passes(policy, batches, way)
            times[way].append(seconds)
            outs.append(logp)
        diff = max([diff] + [float((a - b).abs().max()) for a, b in zip(*outs)])
    return statistics.median(times[False]), statistics.median(times[True]), diff


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--route", choices=sorted(ROUTES), default="cache")
    ap.add_argument("--checkpointed", action="store_true", help="checkpoint the layers both ways (packed rows only)")
    ap.add_argument("--device", default="cpu", help="where the passes run (e.g. cuda)")
    ap.add_argument("--hidden", type=int, default=None, help="the decoder's width (default: the demo's, 128)")
    ap.add_argument("--layers", type=int, default=None, help="the decoder's layers (default: the demo's, 4)")
    ap.add_argument("--bf16", action="store_true", help="forwards under bf16 autocast, as the recipes' bf16-mixed")
    args = ap.parse_args(argv)
    if args.checkpointed and args.route == "cache":
        ap.error("--checkpointed: the KV cache route cannot run under gradient checkpointing; add --route packed")
    policy, trajs = episodes(args.groups, args.generations, **decoder_size(args.hidden, args.layers))
    batches = {way: packed_as_the_update(policy, trajs, way and args.route == "packed", device=args.device)
               for way in (False, True)}  # fmt: skip
    policy.model.to(args.device).train()
    if args.checkpointed:
        policy.model.gradient_checkpointing_enable()
    whole, shared, diff = alternated(partial(passes, route=args.route, bf16=args.bf16), policy, batches, args.repeats)
    text = policy.model.config.get_text_config()
    result = {"route": args.route, "checkpointed": args.checkpointed, "bf16": args.bf16, "device": args.device,
              "decoder": {"hidden": text.hidden_size, "layers": text.num_hidden_layers},
              "episodes": args.groups * args.generations,
              "micro_batches": {"whole": len(batches[False]), "shared": len(batches[True])},
              "tokens": tokens(policy, batches, args.route), "whole_s": whole, "shared_s": shared, "whole_over_shared": whole / shared,
              "max_logprob_diff": diff, "paper_7b_tflops": paper(policy, trajs, batches, args.route)}  # fmt: skip
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
