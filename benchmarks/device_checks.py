"""The GPU checks of issue #9, prepared for a session that is lent a device (minutes of it, all tries
together): one script, one JSON line per check, exit status 1 if any fails. The suite runs it on the CPU
(``--device cpu``) so it keeps working where no GPU is.

    python benchmarks/device_checks.py --device cuda [--steps 3] [--hidden 64 --layers 2]

Each check runs on its own (one that fails does not stop the others), on a random-weight Qwen2.5-VL of the
real architecture with the small BPE tokenizer (``--hidden``/``--layers`` size it up where memory is to be
measured at scale):
- ``environment``: torch, transformers and Lightning versions, the device, bf16 support, flash-attn;
- ``engine_parity``: ``HFEngine`` on the device, its greedy continuation of the sync probe (an image
  prompt) against the trainer's log-probs of the same tokens (``mmsr.sync.probe.verify_sampling``);
- ``bf16_mixed``: the 7B recipes' precision regime through ``mmsr fit``'s own path: ``configs/smoke.yaml``
  with the policy saved in bf16 and loaded as ``PretrainedPolicy(dtype: bfloat16)``, ``precision:
  bf16-mixed``, lr 2e-6, gradient checkpointing, ``--steps`` steps. Master weights stay fp32, the updates
  reach them (rounded to bf16 weights they would mostly vanish), the decoder's matmuls return bf16, the
  losses are finite;
- ``plan``: ``mmsr plan`` for that same run (without its CUDA-context allowance) against the peak memory
  PyTorch allocated in it: the plan must bound it (CUDA only; on the CPU the plan alone is computed). On
  CUDA it fails if ``bf16_mixed`` did not run before it and measure that peak (nothing to bound). The
  module reads and resets CUDA's peak every step (``memory/cuda_peak_gb``), so the run's peak is the largest
  its CSV logger recorded, or the peak since the last reset if larger.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib.util
import io
import json
import math
import os
import tempfile
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
FVQA = ROOT / "data" / "fvqa_dev_20"
SMOKE = ROOT / "configs" / "smoke.yaml"
PARITY_TOLERANCE = 1e-3  # mean |dlogp| of fp32 engine vs trainer (the same kernels: ~1e-6 on the CPU)


def tiny_policy(hidden: int, layers: int):
    """The random Qwen2.5-VL (fp32, on the CPU), sized as ``shared_prefix.py`` sizes it up (heads of 128;
    16 at the default 64)."""
    from shared_prefix import decoder_size  # benchmarks/ is the script's directory

    from mmsr.demo.tokenizer import Scaffold
    from mmsr.models.build import TinyQwen2_5_VL

    return TinyQwen2_5_VL(tokenizer_texts=[str(FVQA / "fvqa_dev.jsonl"), str(FVQA / "search" / "corpus.jsonl")],
                          scaffold=Scaffold(), vocab_size=512, seed=0,
                          **decoder_size(hidden, layers)).build()  # fmt: skip


def environment(device: torch.device, args) -> dict:
    import lightning
    import transformers

    info = {"torch": torch.__version__, "transformers": transformers.__version__, "lightning": lightning.__version__,
            "device": str(device), "flash_attn": importlib.util.find_spec("flash_attn") is not None}  # fmt: skip
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info |= {"name": props.name, "memory_gib": props.total_memory / 2**30, "bf16": torch.cuda.is_bf16_supported()}
    return info


def engine_parity(device: torch.device, args) -> dict:
    from mmsr.rollout.hf_engine import HFEngine
    from mmsr.sync.probe import sampling_probe, verify_sampling

    policy = tiny_policy(args.hidden, args.layers)
    policy.model.to(device)
    engine = HFEngine(seed=0)
    engine.bind(policy)
    ids, vision = sampling_probe(policy)
    check = verify_sampling(policy, engine, ids, PARITY_TOLERANCE, vision)  # raises past the tolerance
    return {"tokens": check.tokens, "mean_abs_diff": check.mean_abs_diff, "max_abs_diff": check.max_abs_diff}


def run_args(device: torch.device, args, tmp: Path) -> list[str]:
    """``mmsr fit`` arguments of the bf16 run (and of its plan): the smoke config, a bf16 checkpoint."""
    from mmsr.models.build import save_policy

    policy = tiny_policy(args.hidden, args.layers)
    policy.model.to(torch.bfloat16)  # as Qwen2.5-VL-7B-Instruct is published
    save_policy(policy, tmp / "policy")
    overlay = tmp / "bf16.yaml"
    overlay.write_text(json.dumps({"model": {"init_args": {
        "policy": {"class_path": "mmsr.models.build.PretrainedPolicy",
                   "init_args": {"path": str(tmp / "policy"), "dtype": "bfloat16"}},
        "lr": 2e-6, "gradient_checkpointing": True}}}))  # fmt: skip
    return ["-c", str(SMOKE), "-c", str(overlay), "--trainer.accelerator", "gpu" if device.type == "cuda" else "cpu",
            "--trainer.precision", "bf16-mixed", "--trainer.max_steps", str(args.steps),
            "--trainer.default_root_dir", str(tmp / "run"), "--trainer.logger.init_args.save_dir", str(tmp / "run"),
            "--model.init_args.image_search.init_args.index", str(FVQA / "search" / "image_index.jsonl"),
            "--model.init_args.text_search.init_args.corpus", str(FVQA / "search" / "corpus.jsonl"),
            "--data.train_files", f"[{FVQA / 'fvqa_dev.jsonl'}]"]  # fmt: skip


def bf16_mixed(device: torch.device, args) -> dict:
    from mmsr.cli import lightning_cli

    cli = lightning_cli(run_args(device, args, args.tmp), run=False)
    model = cli.model.model
    initial = {k: p.detach().clone() for k, p in model.named_parameters()}
    linear = next(m for n, m in model.named_modules() if n.endswith("layers.0.mlp.down_proj"))  # the decoder's
    outputs: set[torch.dtype] = set()
    hook = linear.register_forward_hook(lambda m, i, out: outputs.add(out.dtype))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    hook.remove()
    if device.type == "cuda":
        args.peak_allocated = max(torch.cuda.max_memory_allocated(device), logged_peak(args.tmp / "run"))
    dtypes = sorted({str(p.dtype) for p in model.parameters()})
    loss = float(cli.trainer.callback_metrics["train/loss"])
    result = {"param_dtypes": dtypes, "matmul_outputs": sorted(map(str, outputs)), "steps": cli.trainer.global_step,
              "share_of_weights_moved": share_moved(initial, model.named_parameters()), "last_loss": loss}  # fmt: skip
    if dtypes != ["torch.float32"] or "torch.bfloat16" not in result["matmul_outputs"]:
        raise AssertionError(f"expected fp32 master weights and bf16 matmuls: {result}")
    if result["share_of_weights_moved"] < 0.5 or not math.isfinite(loss):
        raise AssertionError(f"expected the lr 2e-6 updates in most weights and a finite loss: {result}")
    return result


def share_moved(initial: dict[str, torch.Tensor], params) -> float:
    """The share of the weights (elements of every tensor of ``params``, ``(name, tensor)`` pairs, together)
    that differ from ``initial[name]``. Counted by element: a mean of per-tensor shares would give a norm's
    few weights the vote of an embedding's many."""
    moved = total = 0
    for name, p in params:
        moved += int((p.detach().float() != initial[name].float()).sum())
        total += p.numel()
    return moved / total


def logged_peak(run_dir: Path) -> int:
    """The largest per-step CUDA peak, in bytes, that the run's CSV logger recorded under ``run_dir`` (0: none).
    ``memory_metrics`` resets the peak after reading it every step: after ``fit``, ``max_memory_allocated``
    covers only what followed the last step's reading (weights, optimizer state and reference resident)."""
    peaks = [float(row["memory/cuda_peak_gb"]) for path in sorted(run_dir.rglob("metrics.csv"))
             for row in csv.DictReader(path.open()) if row.get("memory/cuda_peak_gb")]  # fmt: skip
    return round(max(peaks, default=0.0) * 2**30)


def plan(device: torch.device, args) -> dict:
    from mmsr.plan import main as plan_main

    with contextlib.redirect_stdout(io.StringIO()):  # its own JSON line: the numbers are returned here
        result = plan_main([*run_args(device, args, args.tmp / "plan"), "--overhead-gb", "0", "--json"])
    memory = result["memory"]
    planned = {"peak": result["peak"], "training": memory["training"]["total"], "rollout": memory["rollout"]["total"],
               "measured_peak_allocated": args.peak_allocated}  # fmt: skip
    if device.type == "cuda" and args.peak_allocated is None:  # not ok: nothing was checked
        raise AssertionError(f"no measured peak to hold the plan against: run bf16_mixed before plan ({planned})")
    if args.peak_allocated is not None and args.peak_allocated > result["peak"]:
        raise AssertionError(f"the run allocated more than mmsr plan bounds: {planned}")
    return planned


CHECKS = {"environment": environment, "engine_parity": engine_parity, "bf16_mixed": bf16_mixed, "plan": plan}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default=None, help="default: cuda, refused where no CUDA device is visible (the checks "
                    "exist for the GPU; --device cpu runs them on the CPU, as the test suite does)")
    ap.add_argument("--steps", type=int, default=3, help="training steps of the bf16-mixed run")
    ap.add_argument("--hidden", type=int, default=64, help="the policy's hidden size (intermediate: twice it)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--checks", nargs="+", choices=list(CHECKS), default=list(CHECKS))
    args = ap.parse_args(argv)
    if args.device is None and not torch.cuda.is_available():  # run on a GPU node, they passed without checking it
        ap.error(f"no CUDA device is visible (torch {torch.__version__}, CUDA_VISIBLE_DEVICES="
                 f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')!r}): these checks are for the GPU; --device cpu "
                 "runs them on the CPU")  # fmt: skip
    device, rows = torch.device(args.device or "cuda"), []
    args.peak_allocated = None
    with tempfile.TemporaryDirectory() as tmp:
        args.tmp = Path(tmp)
        for name in args.checks:
            try:
                rows.append({"check": name, "ok": True, **CHECKS[name](device, args)})
            except Exception as exc:  # noqa: BLE001 - every check reports, whatever the others do
                rows.append({"check": name, "ok": False, "error": f"{type(exc).__name__}: {exc}",
                             "where": traceback.format_exc().strip().splitlines()[-3:]})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    if not all(r["ok"] for r in rows):
        raise SystemExit(1)
    return rows


if __name__ == "__main__":
    main()
