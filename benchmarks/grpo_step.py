"""Fixed GRPO workload on the tiny Qwen2.5-VL: rollout and train tokens/s and seconds per stage.

    python benchmarks/grpo_step.py [--steps 3] [--prompts 4] [--generations 4]

Prints one JSON object: the medians over the steps after the first (which warms caches and first-call
paths up; with ``--steps 1``, over that step), ``steps_timed`` of them, and the whole run's wall seconds.
Timings on shared CPUs are noisy: compare runs made in one sitting, as ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import lightning as L
import torch

from mmsr.data.loaders import load_samples
from mmsr.demo.tokenizer import Scaffold
from mmsr.models.build import TinyQwen2_5_VL
from mmsr.module import GRPOModule
from mmsr.rollout.loop import RolloutSettings
from mmsr.tools.local import LocalImageSearch, LocalTextSearch

ROOT = Path(__file__).resolve().parents[1]
FVQA = ROOT / "data" / "fvqa_dev_20"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--generations", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    torch.manual_seed(0)
    module = GRPOModule(
        policy=TinyQwen2_5_VL(tokenizer_texts=[str(FVQA / "fvqa_dev.jsonl")], scaffold=Scaffold()),
        image_search=LocalImageSearch(str(FVQA / "search" / "image_index.jsonl")),
        text_search=LocalTextSearch(str(FVQA / "search" / "corpus.jsonl")),
        rollout=RolloutSettings(max_tokens_per_turn=args.max_tokens),
        num_generations=args.generations,
        entropy_coef=1e-3,
    )
    samples = load_samples(FVQA / "fvqa_dev.jsonl")[: args.prompts * args.steps]
    loader = torch.utils.data.DataLoader(samples, batch_size=args.prompts, collate_fn=list)
    steps: list[dict[str, float]] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *_):
            steps.append({k: float(v) for k, v in trainer.callback_metrics.items()})

    start = time.perf_counter()
    trainer = L.Trainer(max_steps=args.steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Record()])  # fmt: skip
    trainer.fit(module, loader)
    wall = time.perf_counter() - start
    out = {"workload": vars(args), **summary(steps, args.prompts * args.generations), "wall_seconds": wall}
    print(json.dumps(out, indent=2))


def summary(steps: list[dict[str, float]], episodes: int) -> dict:
    """Medians of the steps' logged metrics (``steps``: one dict per training step, in order; ``episodes``
    per step) over the steps after the first, which warms up (the one step of a 1-step run)."""
    warm = steps[1:] or steps
    med = lambda k: statistics.median(s.get(k, 0.0) for s in warm)  # noqa: E731
    return {
        "steps_timed": len(warm),
        "seconds_per_step": {k.split("/")[1]: med(k) for k in ("timing/rollout", "timing/generate", "timing/tools",
                                                               "timing/reward", "timing/train", "timing/sync")},  # fmt: skip
        "rollout_tokens_per_s": med("rollout/tokens_per_s"),
        "train_tokens_per_s": statistics.median(s["rollout/length"] * episodes / s["timing/train"] for s in warm),
    }


if __name__ == "__main__":
    main()
