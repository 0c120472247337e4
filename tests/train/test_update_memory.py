"""The update computes logits only where the policy sampled: with the real ~152k Qwen vocabulary a
micro-batch's peak memory falls by more than half, and the losses do not change.

Each way runs in a fresh process, and the peak is the rise of the process's maximum resident size
over the micro-batch's forward and backward (CPU tensors: there is no allocator counter to read).
"""

import json
import subprocess
import sys

from tests.conftest import ROOT, subprocess_env
from tests.prompt.test_chat import qwen_tokenizer

SCRIPT = r"""
import json, resource, sys
import torch
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM
from mmsr.algo import aggregate, logprobs_and_entropy
from mmsr.models.policy import Policy
from mmsr.train.batch import TrainBatch
from mmsr.train.update import PolicyUpdate, UpdateSettings

tokenizer = AutoTokenizer.from_pretrained(sys.argv[2], local_files_only=True)
torch.manual_seed(0)
config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1, intermediate_size=128, tie_word_embeddings=True)
policy = Policy(Qwen2ForCausalLM(config), tokenizer)
n, T, sampled = 4, 512, 96  # a multi-turn episode: most tokens are prompt and tool results
ids = torch.randint(0, len(tokenizer) - 300, (n, T))
mask = torch.zeros(n, T - 1)
mask[:, -sampled:] = 1
batch = TrainBatch(ids, torch.ones_like(ids), torch.arange(T).expand(n, T), mask, torch.zeros(n, T - 1), [], torch.arange(n))
update = PolicyUpdate(policy, UpdateSettings())

def everywhere(batch, model, with_entropy):  # the LM head at every position, as before
    out = policy.forward(batch.input_ids, batch.attention_mask, batch.position_ids, [], model=model)
    return logprobs_and_entropy(out.logits[:, :-1], batch.labels, with_entropy=with_entropy)

way = update.token_logprobs if sys.argv[1] == "kept" else everywhere
def loss():
    logp, entropy = way(batch, policy.model, True)
    return -aggregate(logp, mask, "token-mean") - 0.01 * aggregate(entropy, mask, "token-mean")

small = TrainBatch(ids[:1, :8], torch.ones(1, 8, dtype=torch.long), torch.arange(8)[None], mask[:1, :7] + 1,
                   torch.zeros(1, 7), [], torch.arange(1))
logp, _ = way(small, policy.model, False)  # warm up the allocator and the kernels
logp.sum().backward()
policy.model.zero_grad(set_to_none=True)
before = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
value = loss()
value.backward()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"loss": float(value), "peak_mb": (peak - before) / 2**20}))
"""


def run_both(tokenizer_dir: str) -> dict[str, dict]:
    """Both ways at once, each in its own process on one thread (their imports overlap; the peaks are per process)."""
    env = subprocess_env(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    procs = {way: subprocess.Popen([sys.executable, "-c", SCRIPT, way, tokenizer_dir], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True) for way in ("everywhere", "kept")}  # fmt: skip
    try:
        done = {way: (*proc.communicate(timeout=600), proc.returncode) for way, proc in procs.items()}
    finally:  # one that failed or hung must not leave the other running after the test
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for way, (_, stderr, code) in done.items():
        assert code == 0, f"{way}: {stderr[-3000:]}"
    return {way: json.loads(stdout.strip().splitlines()[-1]) for way, (stdout, _, _) in done.items()}


def test_logits_only_where_sampled_halve_the_peak_with_the_real_vocabulary(tmp_path):
    tokenizer = qwen_tokenizer()
    assert len(tokenizer) > 150_000
    tokenizer.save_pretrained(tmp_path)
    runs = run_both(str(tmp_path))
    everywhere, kept = runs["everywhere"], runs["kept"]
    assert abs(kept["loss"] - everywhere["loss"]) < 1e-5
    assert kept["peak_mb"] < 0.5 * everywhere["peak_mb"], (kept, everywhere)
