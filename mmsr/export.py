"""``mmsr export --ckpt RUN/checkpoints/last.ckpt --out DIR``: a training checkpoint (a single file, or
the distributed checkpoint directory ``ModelParallelStrategy`` writes) -> a Hugging Face directory
(safetensors, config, tokenizer, image processor, chat template) that transformers and vLLM load
directly (``PretrainedPolicy(path=DIR)`` in a config: tool images resized as in training). The weights
keep the checkpoint's dtype unless ``--dtype`` asks for another."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from mmsr.models.build import save_policy


def export(ckpt: str | Path, out: str | Path, run_config: str | Path | None = None, dtype: str | None = None) -> Path:
    """Rebuild the run's module from its config, without its engine and tools (their files need not be here), load
    the checkpoint's weights, write the policy (cast to ``dtype``, e.g. ``"bfloat16"``, when given)."""
    from mmsr.eval.load import EPISODE_ARGS, load_module

    policy = load_module(ckpt, run_config, leave_out=EPISODE_ARGS).policy
    if dtype is not None:
        policy.model.to(getattr(torch, dtype))
    return save_policy(policy, out)


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(prog="mmsr export", description=__doc__)
    ap.add_argument("--ckpt", required=True, help="a checkpoint written by mmsr fit (.ckpt file or distributed directory)")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--run-config", default=None, help="the run's config.yaml (default: found next to the ckpt)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="cast the weights (default: the checkpoint's)")
    args = ap.parse_args(argv)
    out = export(args.ckpt, args.out, args.run_config, args.dtype)
    print(f"wrote {out}")
    return out
