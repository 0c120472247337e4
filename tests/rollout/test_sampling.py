"""Per-episode sampling streams: the right distribution, and draws that do not depend on the batch."""

import math

import pytest
import torch

from mmsr.rollout.engine import GenerationRequest, SamplingParams
from mmsr.rollout.hf_engine import HFEngine, sample_tokens
from mmsr.rollout.sampling import gumbel_sample, request_seed, splitmix64, stream_uniform


def test_request_seeds_are_stable_and_distinct():
    a = request_seed(0, 3, "q1#0", 1)
    assert a == request_seed(0, 3, "q1#0", 1) and 0 <= a < 2**63
    others = {request_seed(0, 3, "q1#1", 1), request_seed(0, 4, "q1#0", 1), request_seed(1, 3, "q1#0", 1),
              request_seed(0, 3, "q1#0", 2)}  # fmt: skip
    assert a not in others and len(others) == 4


def test_splitmix_matches_the_reference_values():
    # SplitMix64 of state 0, 1, 2 (the finalizer applied to 0 + k*golden, as the C reference does);
    # values from the reference implementation, written as signed int64
    ref = [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
    seeds = torch.tensor([0, -7046029254386353131, 4354685564936845354], dtype=torch.long)  # (k - 1) * golden
    got = splitmix64(seeds).tolist()
    assert [g & (2**64 - 1) for g in got] == ref


def test_uniform_noise_is_uniform_and_depends_only_on_its_counters():
    seeds, pos = torch.arange(64, dtype=torch.long) * 7919, torch.arange(64, dtype=torch.long) % 5
    u = stream_uniform(seeds, pos, 4096)
    assert u.min() > 0 and u.max() < 1 and abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.var()) - 1 / 12) < 0.005
    assert torch.equal(stream_uniform(seeds[3:4], pos[3:4], 4096)[0], u[3])  # row 3 alone: the same noise


def test_gumbel_draws_follow_the_softmax():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    n = 20000
    logits = probs.log().expand(n, 4)
    tokens = gumbel_sample(logits, torch.arange(n, dtype=torch.long) * 104729, torch.zeros(n, dtype=torch.long))
    freq = torch.bincount(tokens, minlength=4).double() / n
    chi2 = float(((freq - probs) ** 2 / probs).sum() * n)
    assert chi2 < 16.3, (freq, chi2)  # p = 0.001 for 3 degrees of freedom


def test_filtered_tokens_are_never_drawn():
    logits = torch.zeros(512, 6)
    sampling = SamplingParams(temperature=1.0, top_k=2)
    logits[:, 4], logits[:, 1] = 3.0, 2.0
    tokens, logp = sample_tokens(logits, sampling, torch.arange(512, dtype=torch.long), torch.zeros(512, dtype=torch.long))
    assert set(tokens.tolist()) == {1, 4}
    full = torch.log_softmax(logits, -1)
    torch.testing.assert_close(logp, full.gather(-1, tokens[:, None])[:, 0])  # unfiltered log-probs, as the trainer scores


def test_top_p_keeps_the_token_that_crosses_it():
    """p = [0.5, 0.3, 0.2], top_p 0.6: 0.5 alone falls short, so token 1 (cumulative 0.8) stays and only token 2
    goes; the kept two are drawn renormalized, 5/8 and 3/8."""
    n = 4000
    logits = torch.tensor([0.5, 0.3, 0.2]).log().expand(n, 3)
    tokens, _ = sample_tokens(logits, SamplingParams(top_p=0.6), torch.arange(n, dtype=torch.long) * 7919,
                              torch.zeros(n, dtype=torch.long))  # fmt: skip
    assert set(tokens.tolist()) == {0, 1}
    assert float((tokens == 1).double().mean()) == pytest.approx(3 / 8, abs=0.03)


def test_hf_engine_draws_do_not_depend_on_the_batch(tiny_policy):
    engine = HFEngine(seed=5)
    engine.bind(tiny_policy)
    prompt = tiny_policy.encoder().encode("<|im_start|>user\nWhat is this?<|im_end|>\n<|im_start|>assistant\n")
    other = tiny_policy.encoder().encode("<|im_start|>user\nAnd where?<|im_end|>\n<|im_start|>assistant\n")
    sampling = SamplingParams(max_tokens=12, stop=())
    a = GenerationRequest(tuple(prompt), key="s1#0", stream=1)
    together = engine.generate([GenerationRequest(tuple(other), key="s2#0", stream=1), a, a.__class__(a.input_ids, key="s1#1", stream=1)], sampling)
    alone = engine.generate([a], sampling)
    assert together[1].token_ids == alone[0].token_ids and together[1].logprobs == pytest.approx(alone[0].logprobs, abs=1e-5)
    assert together[2].token_ids != together[1].token_ids  # another episode of the same prompt: its own stream
    later = engine.generate([GenerationRequest(tuple(prompt), key="s1#0", stream=2)], sampling)
    assert later[0].token_ids != alone[0].token_ids  # the next rollout draws anew


def test_hf_engine_state_resumes_keyless_streams(tiny_policy):
    engine = HFEngine(seed=1)
    engine.bind(tiny_policy)
    request = GenerationRequest(tuple(tiny_policy.encoder().encode("<|im_start|>user\nhi<|im_end|>\n")))
    sampling = SamplingParams(max_tokens=8, stop=())
    engine.generate([request], sampling)
    state = engine.state_dict()
    first = engine.generate([request, request], sampling)
    assert first[0].token_ids != first[1].token_ids or math.isclose(sum(first[0].logprobs), 0.0)
    engine.load_state_dict(state)
    again = engine.generate([request, request], sampling)
    assert [o.token_ids for o in again] == [o.token_ids for o in first]


def test_hf_engine_finishes_on_eos_stop_strings_and_budget(tiny_policy):
    from mmsr.rollout.hf_engine import _Turn

    engine = HFEngine()
    engine.bind(tiny_policy)
    stop = SamplingParams().stop
    encode = lambda text: tiny_policy.tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    eos, candidates = tiny_policy.stop_token_ids(), engine._stop_candidates(stop)
    ids = encode("<reason>look</reason><answer>Paris</answer>")
    last, turn = ids[-1], _Turn(budget=100, tokens=ids[:-1])
    assert last in candidates and engine._finish(turn, last, eos, candidates, stop) == "stop"
    assert engine._finish(_Turn(100, ids[:-3]), ids[-3], eos, candidates, stop) is None  # not completed yet
    assert engine._finish(turn, next(iter(eos)), eos, candidates, stop) == "eos"
    assert engine._finish(_Turn(len(ids) - 2, ids[:-3]), ids[-3], eos, candidates, stop) == "length"
    assert all(">" in tiny_policy.tokenizer.decode([i]) for i in candidates)  # every stop string ends with ">"


def test_hf_engine_prefills_each_distinct_context_once(tiny_policy, fvqa_samples, monkeypatch):
    """A GRPO group's episodes share their prompt and image: one prefill row per distinct context,
    its KV cache fanned out; every episode still samples its own tokens, as if prefilled alone."""
    from tests.rollout.test_loop import make_loop

    loop, _ = make_loop(tiny_policy, lambda r: "")
    starts = [loop._start(s, i, k) for i, s in enumerate(fvqa_samples[:2]) for k in range(3)]
    requests = [GenerationRequest(tuple(e.traj.input_ids), tuple(e.traj.vision), e.key, 0, None, 1) for e in starts]
    engine = HFEngine(seed=3)
    engine.bind(tiny_policy)
    rows, forward = [], tiny_policy.forward
    monkeypatch.setattr(tiny_policy, "forward", lambda ids, *a, **k: rows.append(len(ids)) or forward(ids, *a, **k))
    sampling = SamplingParams(max_tokens=6, stop=())
    together = engine.generate(requests, sampling)
    assert rows == [2]  # 6 episodes of 2 prompts: 2 prefill rows
    alone = [engine.generate([r], sampling)[0] for r in requests]
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]
    assert len({tuple(o.token_ids) for o in together}) > 2  # the episodes of a prompt differ


def test_in_place_noise_equals_the_formula_bit_for_bit():
    """``stream_uniform``/``gumbel_sample`` compute in place and fold constants; the bits are those of
    the formula written out (so the tokens of a seed do not change with the implementation)."""

    def shr(x, s):
        return (x >> s) & ((1 << (64 - s)) - 1)

    seeds, pos = torch.randint(0, 2**62, (16,)), torch.randint(0, 1000, (16,))
    row = splitmix64(seeds + splitmix64(pos))
    ids = torch.arange(3001, dtype=torch.long) * -7046029254386353131  # golden ratio constant, signed
    u = (shr(splitmix64(row[:, None] + ids), 11).double() + 0.5) / float(1 << 53)
    assert torch.equal(stream_uniform(seeds, pos, 3001), u)
    logits = torch.randn(16, 3001)
    assert torch.equal(gumbel_sample(logits, seeds, pos), (logits.double() - torch.log(-torch.log(u))).argmax(-1))


def test_hf_engine_stops_at_a_tag_split_by_a_special_token(tiny_policy):
    """vLLM checks stop strings on text without special tokens (``skip_special_tokens``), and the loop parses
    such text: ``</text_<|box_start|>search>`` closes the tag for both. HFEngine decoded the special token
    and sampled on past the tag, which the loop then executed."""
    from mmsr.rollout.hf_engine import _Turn

    engine = HFEngine()
    engine.bind(tiny_policy)
    tok, stop = tiny_policy.tokenizer, SamplingParams().stop
    split = [*tok.encode("<text_search>Paris</text_", add_special_tokens=False), tok.convert_tokens_to_ids("<|box_start|>")]
    split += tok.encode("search>", add_special_tokens=False)
    assert tok.decode(split, skip_special_tokens=True) == "<text_search>Paris</text_search>"
    eos, candidates = tiny_policy.stop_token_ids(), engine._stop_candidates(stop)
    assert engine._finish(_Turn(100, split[:-1]), split[-1], eos, candidates, stop) == "stop"


def test_an_engine_seed_left_unset_is_the_runs_seed_everything(tiny_policy, monkeypatch):
    """``seed_everything`` changed no rollout: an engine sampled from seed 0 unless its own ``seed`` was set. Unset, it
    is the run's (``PL_GLOBAL_SEED``, which ``seed_everything`` sets), fixed at ``bind`` and kept in checkpoints."""
    from mmsr.rollout.vllm_engine import VLLMEngine

    prompt = tiny_policy.encoder().encode("<|im_start|>user\nWhat is this?<|im_end|>\n<|im_start|>assistant\n")
    requests = [GenerationRequest(tuple(prompt), key=f"s1#{k}", stream=1) for k in range(4)]

    def rollout(run_seed: int, **engine_args) -> tuple[list, int]:
        monkeypatch.setenv("PL_GLOBAL_SEED", str(run_seed))
        engine = HFEngine(**engine_args)
        engine.bind(tiny_policy)
        monkeypatch.setenv("PL_GLOBAL_SEED", "9")  # a later seed_everything: the run's seed is fixed already
        outputs = engine.generate(requests, SamplingParams(max_tokens=8, stop=()))
        return [o.token_ids for o in outputs], engine.state_dict()["seed"]

    assert rollout(0) == rollout(0, seed=0) == rollout(5, seed=0)  # an explicit seed is kept, 0 is the old default
    assert rollout(1)[1] == 1 and rollout(1)[0] != rollout(0)[0]
    monkeypatch.setenv("PL_GLOBAL_SEED", "4")
    assert (VLLMEngine().state_dict()["seed"], VLLMEngine(seed=2).state_dict()["seed"]) == (4, 2)
    monkeypatch.delenv("PL_GLOBAL_SEED")
    assert HFEngine().state_dict()["seed"] == 0  # a run seeded by none
