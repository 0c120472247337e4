"""One GRPO workload, TRL's ``GRPOTrainer`` and mmsr's ``GRPOModule`` back to back, seconds per step.

    pip install -e ".[bench]"        # trl, pinned
    python benchmarks/vs_trl.py [--steps 6] [--rounds 3]
    python benchmarks/vs_trl.py --generation 15   # HFEngine alone (no TRL): A/B between commits

The workload (the same for both): a tiny random Qwen2 (2 layers, hidden 128, 4 heads, 2 KV heads,
FFN 512) with a ~2,048-token BPE, 8 prompts x 4 generations x up to 64 sampled tokens, one turn, no
tools and no stop strings (a completion ends at eos or at 64 tokens, as TRL samples it), a toy reward
(the fraction of digits in the completion), no KL (beta 0), lr 1e-4, one optimizer update per step, fp32
on the CPU (TRL's configs default to bf16 mixed precision, even on a CPU: it is turned off here, and the
JSON reports what TRL's accelerator ran), no gradient checkpointing and a constant lr (TRL 1.16 defaults
to checkpointing and a linear decay: both turned off, as mmsr trains by default, and reported). Both
start from the same weights and see the same prompt strings (mmsr's chat-formatted first turn, given to
TRL as plain text prompts).

Prints one JSON object: the median seconds per step of each (steps after the first of each round, which
warms caches up), their ratio, the mean tokens each sampled a timed step (``trl_sampled_tokens``,
``mmsr_sampled_tokens``: the same work, up to sampling noise), mmsr's stage breakdown (``timing/*``) and
the arithmetic lower bound of a step: the least matmul FLOPs either trainer must do to sample and train
it (``lower_bound_s``) over this machine's measured fp32 matmul rate. Timings on shared CPUs are noisy,
and drift over a minute: ``--rounds R`` alternates the two R times (TRL, mmsr, TRL, mmsr, ...; each
round from the same weights and prompts), so a slow spell of the machine weighs on both.

``--generation N`` times ``HFEngine.generate`` alone on the first step's 8 x 4 requests, N times:
median and best wall and CPU seconds, sampled tokens, and a digest of every token and log-prob (the
same digest at two commits: the same outputs, bit for bit).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mmsr.data.loaders import load_samples
from mmsr.data.sample import Sample
from mmsr.demo.tokenizer import Scaffold
from mmsr.models.tiny_text import TinyQwen2
from mmsr.prompt.render import PromptBuilder

ROOT = Path(__file__).resolve().parents[1]
FVQA = ROOT / "data" / "fvqa_dev_20"
PROMPTS, GENERATIONS, MAX_TOKENS, LR = 8, 4, 64, 1e-4


def digit_fraction(text: str) -> float:
    """The toy reward: the share of digits among the completion's characters."""
    return sum(c.isdigit() for c in text) / max(len(text), 1)


class DigitReward:
    """``digit_fraction`` of the episode's sampled text, as an mmsr reward."""

    def __call__(self, trajectory, sample) -> float:
        return digit_fraction("".join(trajectory.assistant_texts))


class Prebuilt:
    """A policy builder that hands out a copy of an already built policy (same weights for both)."""

    def __init__(self, policy) -> None:
        self.policy = policy

    def build(self):
        return copy.deepcopy(self.policy)


def workload(templates: Path):
    """The policy, the prompt builder and the text-only samples (the FVQA dev questions)."""
    texts = [str(FVQA / "fvqa_dev.jsonl"), str(FVQA / "search" / "corpus.jsonl")]
    policy = TinyQwen2(tokenizer_texts=texts, scaffold=Scaffold(), vocab_size=2048, hidden_size=128, num_layers=2, num_heads=4,
                       num_kv_heads=2, intermediate_size=512).build()  # fmt: skip
    (templates / "r1.txt").write_text("<image>{question}")
    (templates / "after.txt").write_text("")
    prompts = PromptBuilder(str(templates / "r1.txt"), str(templates / "after.txt"), str(templates / "after.txt"))
    samples = [Sample(s.id, s.question, None, s.ground_truth) for s in load_samples(FVQA / "fvqa_dev.jsonl")]
    return policy, prompts, samples


def batches(samples: list[Sample], steps: int) -> list[Sample]:
    """``steps x PROMPTS`` samples, cycling through the questions."""
    return [samples[i % len(samples)] for i in range(steps * PROMPTS)]


def trl_config(out: Path, steps: int):
    """TRL's ``GRPOConfig`` of the workload: fp32, no gradient checkpointing and a constant lr, as
    ``GRPOModule`` trains by default (TRL 1.16 defaults to bf16, checkpointing and a linear decay)."""
    from trl import GRPOConfig

    return GRPOConfig(output_dir=str(out), per_device_train_batch_size=PROMPTS * GENERATIONS,
                      num_generations=GENERATIONS, max_completion_length=MAX_TOKENS, beta=0.0, learning_rate=LR,
                      max_steps=steps, logging_steps=1, report_to="none", use_cpu=True, save_strategy="no",
                      temperature=1.0, seed=0, bf16=False, gradient_checkpointing=False,
                      lr_scheduler_type="constant")  # fmt: skip


def run_trl(policy, prompt_texts: list[str], steps: int, out: Path) -> tuple[list[float], dict, list[float]]:
    """Seconds of each ``GRPOTrainer`` step, what it ran (``trl_mixed_precision``: its accelerator's, ``no``:
    fp32; ``trl_gradient_checkpointing``: its model's; ``trl_lr_scheduler``) and the tokens each step sampled."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOTrainer

    marks: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *args, **kwargs):
            marks.append(time.perf_counter())

        def on_step_end(self, *args, **kwargs):
            marks.append(time.perf_counter())

    reward = lambda completions, **_: [digit_fraction(c) for c in completions]  # noqa: E731
    trainer = GRPOTrainer(model=copy.deepcopy(policy.model), reward_funcs=[reward], args=trl_config(out, steps),
                          train_dataset=Dataset.from_list([{"prompt": t} for t in prompt_texts]),
                          processing_class=policy.tokenizer, callbacks=[Clock()])  # fmt: skip
    trainer.train()
    ran = {"trl_mixed_precision": str(trainer.accelerator.mixed_precision),
           "trl_gradient_checkpointing": trainer.model.is_gradient_checkpointing,
           "trl_lr_scheduler": trainer.args.lr_scheduler_type.value}  # fmt: skip
    # a step's mean completion length over its 8 x 4 rows, its eos included (as mmsr counts it)
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    sampled = [n * PROMPTS * GENERATIONS for n in lengths]
    return [end - begin for begin, end in zip(marks[::2], marks[1::2])], ran, sampled


def mmsr_module(policy, prompts: PromptBuilder, stops: bool = False):
    """The workload's ``GRPOModule``, sampling as TRL does: to eos or ``MAX_TOKENS``, no stop string. The loop
    adds ``</answer>`` and the tools' closing tags to any sampling (single tokens of this BPE, which a random
    policy samples: ~7% fewer tokens a step than TRL's); one turn without tools never needs them. ``stops``: keep
    them, as this benchmark did before it compared equal work (``generation_ab.py`` runs an older tree's
    ``run_mmsr``, which keeps them, beside this one's: the same sampled work both ways)."""
    from mmsr.module import GRPOModule
    from mmsr.rollout.hf_engine import HFEngine
    from mmsr.rollout.loop import RolloutSettings

    module = GRPOModule(policy=Prebuilt(policy), engine=HFEngine(seed=0), prompts=prompts, reward=DigitReward(),
                        rollout=RolloutSettings(max_rounds=1, max_tokens_per_turn=MAX_TOKENS),
                        num_generations=GENERATIONS, kl_coef=0.0, lr=LR)  # fmt: skip
    if not stops:
        module.loop.stops, module.sampling = (), dataclasses.replace(module.sampling, stop=())
    return module


def run_mmsr(policy, prompts: PromptBuilder, samples: list[Sample], steps: int, stops: bool = True
             ) -> tuple[list[float], list[dict]]:  # fmt: skip
    """Seconds of each ``GRPOModule`` step (rollout included) and its logged metrics; ``stops``: sample with the
    loop's stop strings (``mmsr_module``; ``generation_ab.py`` calls every tree's ``run_mmsr`` so)."""
    import lightning as L

    module = mmsr_module(policy, prompts, stops)
    seconds, metrics = [], []

    class Clock(L.Callback):
        def on_train_batch_start(self, *args):
            seconds.append(-time.perf_counter())

        def on_train_batch_end(self, trainer, *args):
            seconds[-1] += time.perf_counter()
            metrics.append({k: float(v) for k, v in trainer.callback_metrics.items()})

    loader = torch.utils.data.DataLoader(batches(samples, steps), batch_size=PROMPTS, collate_fn=list)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Clock()])  # fmt: skip
    trainer.fit(module, loader)
    return seconds, metrics


def matmul_flops_per_s(n: int = 1024, repeats: int = 5) -> float:
    """This machine's fp32 matmul rate (the best of ``repeats``)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def matmul_params(model) -> tuple[int, int]:
    """The weights of the decoder layers' matmuls and of the LM head (tied or not): the input embedding
    is a lookup, biases and norms are not matmuls."""
    embedding, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    layers = sum(p.numel() for p in model.parameters() if p.dim() >= 2 and p is not embedding and p is not head)
    return layers, head.numel()


def step_flops(layers: int, head: int, prompt_tokens: float, sampled: float) -> tuple[float, float]:
    """The least matmul FLOPs to sample a step's ``sampled`` tokens (``PROMPTS x GENERATIONS`` rows after
    ``PROMPTS`` distinct prompts of ``prompt_tokens`` in all) and to train on them: (generate, train).

    Both need the same tokens through the layers and the same logits. Through the layers: each prompt
    once (a group's rows share it: ``HFEngine`` prefills it once and fans its KV cache out, the CPU update
    shares it through the KV cache) and every sampled token but each row's last (nothing is sampled after
    it). Logits: only where a sampled token is predicted (``sampled_logprobs``), after each prompt once and
    after every fed sampled token. A forward costs 2 FLOPs per weight and token, training 6 (forward and
    backward): generate = 2 x (layers x fed + head x logits), train = 3 x generate. Attention's own matmuls
    (query-key, attention-value) and everything elementwise are left out, which only lowers the bound."""
    rows = PROMPTS * GENERATIONS
    fed = prompt_tokens + sampled - rows
    logits = sampled - rows + PROMPTS
    forward = 2 * (layers * fed + head * logits)
    return forward, 3 * forward


def lower_bound_s(policy, metrics: list[dict], rate: float) -> dict[str, float]:
    """``step_flops`` of the median step over ``rate`` (FLOP/s), from each step's logged mean episode
    length and sampled tokens (one turn: a row is its group's prompt and its own sampled tokens)."""
    layers, head = matmul_params(policy.model)
    lengths = [m["rollout/length"] for m in metrics]
    sampled = [m["rollout/response_tokens"] for m in metrics]
    rows = PROMPTS * GENERATIONS
    flops = [step_flops(layers, head, PROMPTS * (n - s), rows * s) for n, s in zip(lengths, sampled)]
    generate, train = (statistics.median(f[i] for f in flops) for i in (0, 1))
    return {"params": sum(p.numel() for p in policy.model.parameters()), "layer_matmul_params": layers,
            "head_params": head, "tokens_per_step": statistics.median(lengths) * rows,
            "sampled_per_step": statistics.median(sampled) * rows, "generate_flops": generate, "train_flops": train,
            "step_flops": generate + train, "matmul_flops_per_s": rate,
            "seconds": (generate + train) / rate}  # fmt: skip


def after_first(values: list) -> list:
    """A round's steps after its first (which warms caches up); the one step of a 1-step round."""
    return values[1:] if len(values) > 1 else values


def time_generation(policy, prompts: PromptBuilder, samples: list[Sample], repeats: int) -> dict:
    """Seconds of ``HFEngine.generate`` on one step's requests (after one warm-up call) and a digest
    of its outputs (tokens and log-probs, exact)."""
    from mmsr.rollout.engine import GenerationRequest, SamplingParams
    from mmsr.rollout.hf_engine import HFEngine

    engine = HFEngine(seed=0)
    engine.bind(policy)
    ids = [policy.tokenizer(policy.chat.first_prompt(prompts.first_user_text(s)))["input_ids"] for s in samples[:PROMPTS]]
    requests = [GenerationRequest(tuple(i), key=f"{j}#{k}") for j, i in enumerate(ids) for k in range(GENERATIONS)]
    sampling = SamplingParams(temperature=1.0, max_tokens=MAX_TOKENS)
    engine.generate(requests, sampling)
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        outs = engine.generate(requests, sampling)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    digest = hashlib.sha256(repr([(o.token_ids, o.logprobs) for o in outs]).encode()).hexdigest()[:16]
    return {"requests": len(requests), "tokens": sum(len(o.token_ids) for o in outs), "threads": torch.get_num_threads(),
            "wall_s": {"median": statistics.median(wall), "min": min(wall)},
            "cpu_s": {"median": statistics.median(cpu), "min": min(cpu)}, "digest": digest}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=6, help="steps of each trainer in each round")
    ap.add_argument("--rounds", type=int, default=1, help="TRL then mmsr, this many times (alternated)")
    ap.add_argument("--generation", type=int, default=0, metavar="N", help="time HFEngine.generate N times instead")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        policy, prompts, samples = workload(Path(tmp))
        if args.generation:
            out = time_generation(policy, prompts, samples, args.generation)
            print(json.dumps(out, indent=2))
            return out
        texts = [policy.chat.first_prompt(prompts.first_user_text(s)) for s in batches(samples, args.steps)]
        trl_s, trl_sampled, mmsr_s, metrics = [], [], [], []
        for r in range(args.rounds):  # alternated: a drift of the machine's speed weighs on both
            seconds, trl_ran, sampled = run_trl(policy, texts, args.steps, Path(tmp) / f"trl{r}")
            trl_s.append(seconds)
            trl_sampled.append(sampled)
            seconds, logged = run_mmsr(policy, prompts, samples, args.steps, stops=False)  # as TRL samples
            mmsr_s.append(seconds)
            metrics.append(logged)
    stages = ("rollout", "generate", "reward", "train", "sync")
    steady = [m for logged in metrics for m in after_first(logged)]
    out = {
        "workload": {"prompts": PROMPTS, "generations": GENERATIONS, "max_tokens": MAX_TOKENS, "steps": args.steps,
                     "rounds": args.rounds},  # fmt: skip
        "trl_s_per_step": statistics.median(t for run in trl_s for t in after_first(run)),
        "mmsr_s_per_step": statistics.median(t for run in mmsr_s for t in after_first(run)),
        **trl_ran,
        "steps_timed": {"trl": sum(len(after_first(run)) for run in trl_s), "mmsr": len(steady)},
        # the timed steps' sampled tokens: both trainers did the same work (lower_bound counts mmsr's)
        "trl_sampled_tokens": statistics.mean(n for run in trl_sampled for n in after_first(run)),
        "mmsr_sampled_tokens": statistics.mean(m["rollout/response_tokens"] * PROMPTS * GENERATIONS for m in steady),
        "mmsr_stages_s": {s: statistics.median(m.get(f"timing/{s}", 0.0) for m in steady) for s in stages},
        "lower_bound": lower_bound_s(policy, steady, matmul_flops_per_s()),
    }
    out["trl_over_mmsr"] = out["trl_s_per_step"] / out["mmsr_s_per_step"]
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
