"""``mmsr plan -c CONFIG [-c MORE.yaml ...] [--gpu-gb 79.1]``: does a run fit on its GPUs?

Builds the configured policy on the meta device (no weights) and prints, per GPU, the memory of every
term in the rollout and the training phase (``mmsr.plan.memory`` says what each one counts), the peak,
whether it fits ``--gpu-gb`` (exit status 1 when it does not), the weight-sync bytes and the tokens per
step the rollout limits allow. Dotted overrides work as in ``mmsr fit``. GiB = 2**30 bytes; every size,
``--gpu-gb`` included, is in GiB: a GPU's is what CUDA reports (79.1 for an H100 sold as 80 GB, the
default; ``mmsr.plan.config.CARD_GIB``). Given a size cards are sold with (80), stderr says what CUDA gives.

    mmsr plan -c configs/mmsearch_r1/qwen2_5_vl_7b_4x8.yaml
    mmsr plan -c configs/mmsearch_r1/qwen2_5_vl_7b_1x8.yaml --model.init_args.micro_batch_tokens 8192 --json

Heavy imports (Lightning, transformers, torch) happen after argument parsing.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace

from mmsr.plan.config import CARD_GIB, GiB, RunSpec

# table rows: (key in the phases, label); rows that are 0 in both phases are left out
ROWS = (
    ("params", "params ({param_dtype}{shard})"),
    ("grads", "grads"),
    ("adamw", "AdamW state"),
    ("reference", "reference model ({ref})"),
    ("reference_scoring", "reference, on the GPU to score"),
    ("gathered_params", "{gathered} ({compute_dtype})"),
    ("unsharded_grads", "unsharded grads (root + 1 block{reduce})"),
    ("activations", "activations ({micro_tokens} tokens, {ckpt})"),
    ("vision_activations", "vision activations"),
    ("packed_mask", "packed rows' mask ({attention}{flash})"),
    ("logits", "logits + their grad"),
    ("engine", "{engine}"),
    ("weight_sync", "weight sync (bucket{probe})"),
    ("overhead", "overhead"),
)


def gpu_gib(text: str) -> float:
    """``type`` of ``--gpu-gb``: a GPU's memory, more than 0 GiB and finite (-3 planned "does not fit by 5.1 GiB")."""
    value = float(text)
    if not 0.0 < value < float("inf"):  # NaN too
        raise argparse.ArgumentTypeError(f"must be a GPU's memory in GiB, more than 0, got {text}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmsr plan", description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                epilog="Other arguments are dotted overrides of the run config "
                                       "(--model.init_args.micro_batch_tokens 8192).")  # fmt: skip
    p.add_argument("-c", "--config", action="append", required=True, help="run config; several merge in order")
    p.add_argument("--gpu-gb", type=gpu_gib, default=CARD_GIB[80], metavar="GIB",
                   help=f"memory of one GPU in GiB, as torch.cuda.mem_get_info() reports its total (default "
                        f"{CARD_GIB[80]}: an H100 or A100 sold as 80 GB; an H200 {CARD_GIB[141]})")  # fmt: skip
    p.add_argument("--overhead-gb", type=float, default=2.0, help="CUDA context, NCCL buffers, fragmentation (GiB)")
    p.add_argument("--vllm-overhead-gb", type=float, default=4.0,
                   help="vLLM's activations, CUDA graphs and non-torch memory within gpu_memory_utilization (GiB)")
    p.add_argument("--images-per-episode", type=int, default=1,
                   help="images at max_pixels per episode whose vision-tower activations are counted")
    p.add_argument("--json", action="store_true", help="print the numbers (bytes) as one JSON object")
    return p


def labels(spec: RunSpec) -> dict[str, str]:
    """The table's row labels, filled from the run's settings."""
    from mmsr.plan.memory import micro_batch_tokens

    sleep = "asleep" if spec.sleep_mode else "awake"
    engine = f"vLLM ({spec.gpu_memory_utilization:.2f} x GPU, {sleep} in training)"
    fields = vars(spec) | dict(shard=f", 1/{spec.world_size}" if spec.fsdp else "",
                               engine=engine if spec.engine == "vllm" else "HF engine (weights + KV cache)",
                               ref="offloaded" if spec.ref_offload else "on GPU",
                               gathered="gathered params" if spec.fsdp else "autocast weight cache",
                               ckpt="checkpointed" if spec.gradient_checkpointing else "no checkpointing",
                               micro_tokens=micro_batch_tokens(spec),
                               reduce=" + fp32 copy" if spec.fsdp and spec.compute_dtype != spec.param_dtype else "",
                               probe=" or probe forward" if spec.engine == "vllm" and spec.verify_every else "",
                               flash="; 0 with flash-attn" if spec.attention == "auto" else "")  # fmt: skip
    return {key: label.format(**fields) for key, label in ROWS}


def table(spec: RunSpec, result: dict) -> list[str]:
    """One line per term: GiB per GPU in the rollout and the training phase ('-': not in that phase)."""
    rollout, training = result["memory"]["rollout"], result["memory"]["training"]

    def row(label: str, key: str) -> str:
        cells = (f"{phase[key] / GiB:9.1f}" if key in phase else f"{'-':>9}" for phase in (rollout, training))
        return f"  {label:<44}" + "".join(cells)

    shown = [row(v, k) for k, v in labels(spec).items()
             if rollout.get(k) or training.get(k) or (k == "reference" and spec.kl)]  # fmt: skip
    return [f"{'per GPU (GiB)':<46}{'rollout':>9}{'training':>9}", *shown, row("total", "total")]


def verdict(result: dict) -> str:
    """``fits`` or ``does not fit by X GiB``, with any other reason on its own line."""
    peak, gpu, margin = result["peak"] / GiB, result["gpu_bytes"] / GiB, result["margin"] / GiB
    head = f"peak {peak:.1f} GiB of {gpu:.1f} GiB per GPU: "
    if result["fits"]:
        return head + f"fits ({margin:.1f} GiB to spare)"
    why = "".join(f"\n  {p}" for p in result["problems"])
    return head + (f"does not fit by {-margin:.1f} GiB" if margin < 0 else "does not fit") + why


def engine_lines(spec: RunSpec, e: dict) -> list[str]:
    if e["kind"] == "hf":
        return [f"HF engine: weights {e['weights'] / GiB:.1f} GiB, KV cache {e['kv_cache'] / GiB:.1f} GiB "
                f"({e['contexts']} contexts of {spec.max_context_tokens})"]  # fmt: skip
    return [f"vLLM per GPU: weights {e['weights'] / GiB:.1f} GiB ({spec.engine_dtype}, tp {spec.tp}), allowance "
            f"{e['allowance'] / GiB:.1f} GiB, KV cache {e['kv_cache'] / GiB:.1f} GiB",
            f"  = {e['kv_tokens']:,} tokens of {e['kv_bytes_per_token'] / 1024:.1f} KiB = {e['contexts']} contexts "
            f"of {spec.max_model_len}"]  # fmt: skip


def sync_line(spec: RunSpec, sync: dict) -> str:
    line = f"weight sync per step: {sync['bytes_per_step'] / GiB:.1f} GiB ({spec.sync_dtype}) to the engine per rank"
    received = sync["all_gather_received_per_rank"] / GiB
    return line + (f", {received:.1f} GiB of it all-gathered" if spec.fsdp else "")


def token_lines(spec: RunSpec, tokens: dict) -> list[str]:
    def count(n: dict) -> str:
        return (f"{n['prompts']:,} prompts, {n['episodes']:,} episodes, context <= {n['context_tokens']:,}, "
                f"sampled <= {n['sampled_tokens']:,}")  # fmt: skip

    return [f"tokens per step (rollout limits), per rank: {count(tokens['per_rank'])}",
            f"  in all: {count(tokens['total'])}",
            f"an update: {tokens['episodes_per_update']} episodes per rank in {tokens['micro_batches_per_update']} "
            f"micro-batches of {tokens['episodes_per_micro_batch']} x {spec.max_context_tokens} tokens; "
            f"{tokens['updates_per_step']} update(s) per step"]  # fmt: skip


def render(spec: RunSpec, result: dict) -> str:
    """The report ``mmsr plan`` prints: the table, the verdict, then engine, sync and token lines."""
    p, act = result["params"], result["activations"]
    ranks = f"{spec.world_size} rank{'s' if spec.world_size > 1 else ''}"
    head = (f"{result['policy']}: {p['total']:,} params ({p['vision']:,} vision); {ranks}, "
            f"{'FSDP2' if spec.fsdp else 'unsharded'}; params {spec.param_dtype}, compute {spec.compute_dtype}")
    act_line = (f"activations of a micro-batch (LM + vision): {act['checkpointed'] / GiB:.1f} GiB checkpointed, "
                f"{act['not_checkpointed'] / GiB:.1f} GiB without")
    lines = [head, *table(spec, result), verdict(result), act_line, *engine_lines(spec, result["engine"])]
    return "\n".join([*lines, sync_line(spec, result["weight_sync"]), *token_lines(spec, result["tokens"])])


def card_note(gpu_gib: float) -> str | None:
    """What to say when ``--gpu-gb`` is a size cards are sold with (GB), which is more than CUDA gives: 80 GiB
    planned a 79.1 GiB H100 as 0.9 GiB larger, and vLLM's share of it 0.5 GiB larger at 0.6."""
    if gpu_gib not in CARD_GIB:
        return None
    return (f"mmsr plan: --gpu-gb {gpu_gib:g} is {gpu_gib:g} GiB; a GPU sold as {gpu_gib:g} GB gives CUDA "
            f"{CARD_GIB[gpu_gib]} GiB (torch.cuda.mem_get_info): plan for it with --gpu-gb {CARD_GIB[gpu_gib]}")


def main(argv: list[str] | None = None) -> dict:
    args, overrides = parser().parse_known_args(argv)
    if note := card_note(args.gpu_gb):
        print(note, file=sys.stderr)
    from mmsr.plan.config import instantiate, meta_model, model_shape, parse_run_config, policy_config, run_spec
    from mmsr.plan.memory import plan

    config = parse_run_config([a for c in args.config for a in ("-c", c)] + overrides)
    spec = replace(run_spec(config), images_per_episode=args.images_per_episode)
    policy = config["model"]["init_args"]["policy"]
    shape = model_shape(meta_model(policy_config(instantiate(policy))))
    result = plan(shape, spec, args.gpu_gb, args.overhead_gb, args.vllm_overhead_gb)
    result["policy"] = (policy.get("init_args") or {}).get("path") or policy["class_path"].rpartition(".")[2]
    print(json.dumps(result) if args.json else render(spec, result))
    if not result["fits"]:
        raise SystemExit(1)
    return result
