"""Each distinct image through the vision tower once, against every copy: the forward and backward
passes of one GRPO update's micro-batches, both ways, alternated in one run.

    python benchmarks/distinct_images.py [--repeats 5] [--groups 4] [--generations 8]

The workload is ``shared_prefix.py``'s (the CPU demo's policy shape, ``groups`` FVQA dev questions x
``generations`` scripted episodes with thumbnails in some, packed as the update packs them), trained
whole rows. Every copy: the model is called with each row's images, as ``Policy.forward`` did before it
encoded distinct images once; distinct: ``Policy.forward``. The vision tower's share of a pass's
arithmetic (2 x parameters x patches, against 2 x parameters x tokens for the language model) is
printed beside it: with the default 168 x 168 question images it is ~18%, near Qwen2.5-VL-7B's under
the recipes' pixel bounds (~8-16%: a ~0.63B tower over 1,300-4,600 patches per question image, a ~6.2B
decoder over ~1,600-2,500 tokens per episode).

Prints one JSON object: patches encoded each way, the vision share, the median seconds of all passes
each way, their ratio, and the largest log-prob difference between the ways.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from mmsr.algo import logprobs_and_entropy
from mmsr.models.vision import distinct_images
from shared_prefix import alternated, micro_batches  # benchmarks/ is the script's directory

# Question images of 168 x 168 (36 tokens, 144 patches; the demo's are at most 112 x 112): the vision
# tower's share of the arithmetic is then about Qwen2.5-VL-7B's under the recipes' bounds.
PIXELS = 168 * 168


def logprobs(policy, batch, every_copy: bool) -> torch.Tensor:
    """``[n, K]`` log-probs of the sampled positions' labels."""
    keep = batch.loss_mask.any(0).nonzero()[:, 0]
    if every_copy:
        images = dict(pixel_values=torch.cat([v.pixel_values for v in batch.vision]),
                      image_grid_thw=torch.tensor([v.grid_thw for v in batch.vision]))  # fmt: skip
        out = policy.mask_banned(policy.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                              position_ids=batch.position_ids, logits_to_keep=keep, **images))  # fmt: skip
    else:
        out = policy.forward(batch.input_ids, batch.attention_mask, batch.position_ids, batch.vision, logits_to_keep=keep)
    return logprobs_and_entropy(out.logits, batch.labels[:, keep], with_entropy=False)[0] * batch.loss_mask[:, keep]


def passes(policy, batches, every_copy: bool) -> tuple[float, list[torch.Tensor]]:
    """Seconds of every micro-batch's forward and backward, and the masked log-probs."""
    out, start = [], time.perf_counter()
    for batch in batches:
        logp = logprobs(policy, batch, every_copy)
        (logp * torch.linspace(-1.0, 1.0, len(batch.index))[:, None]).sum().backward()
        out.append(logp.detach())
    policy.model.zero_grad(set_to_none=True)
    return time.perf_counter() - start, out


def arithmetic(policy, batches) -> dict[str, float]:
    """Patches each way, and the vision tower's share of a whole-rows pass's arithmetic (every copy)."""
    every = sum(v.pixel_values.shape[0] for b in batches for v in b.vision)
    once = sum(v.pixel_values.shape[0] for b in batches for v in distinct_images(b.vision)[0])
    visual = sum(p.numel() for p in policy.model.model.visual.parameters())
    decoder = sum(p.numel() for n, p in policy.model.named_parameters() if ".visual." not in f".{n}" and "embed" not in n)
    tokens = sum(int(b.attention_mask.sum()) for b in batches)
    return {"patches_every_copy": every, "patches_distinct": once, "vision_share": visual * every / (visual * every + decoder * tokens)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--pixels", type=int, default=PIXELS, help="question images resized to about this many pixels")
    args = ap.parse_args(argv)
    policy, batches = micro_batches(args.groups, args.generations, min_pixels=args.pixels, max_pixels=args.pixels)
    policy.model.train()
    once_s, every_s, diff = alternated(passes, policy, batches, args.repeats)
    result = {"episodes": args.groups * args.generations, "micro_batches": len(batches), **arithmetic(policy, batches),
              "every_copy_s": every_s, "distinct_s": once_s, "every_over_distinct": every_s / once_s,
              "max_logprob_diff": diff}  # fmt: skip
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
