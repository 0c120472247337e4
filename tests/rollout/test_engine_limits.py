"""Sampling settings and requests out of range are refused, the same way by every engine, before any work."""

import math
from types import SimpleNamespace

import pytest
import torch

from mmsr.rollout.engine import GenerationRequest, SamplingParams, ScriptedEngine, turn_budget
from mmsr.rollout.hf_engine import HFEngine, sample_tokens
from mmsr.rollout.vllm_engine import VLLMEngine

PROMPT = (5, 6, 7, 8)


@pytest.mark.parametrize(
    ("field", "value"),
    [("top_p", 0.0), ("top_p", -0.5), ("top_p", 1.5), ("top_p", math.nan), ("top_k", -1),
     ("temperature", -0.1), ("temperature", math.nan), ("max_tokens", 0)],
)  # fmt: skip
def test_sampling_params_out_of_range_are_refused(field, value):
    with pytest.raises(ValueError, match=rf"SamplingParams: {field}={value!r} \(must be"):
        SamplingParams(**{field: value})


def test_sampling_params_at_the_edges_of_their_range_are_kept():
    SamplingParams(temperature=0.0, top_p=1.0, top_k=0, max_tokens=1)
    SamplingParams(temperature=2.0, top_p=1e-9, top_k=1)


def test_top_p_filter_keeps_the_most_likely_token():
    """Even a top_p that keeps no probability mass (SamplingParams refuses it) leaves the top token: the
    filter once set every logit to -inf, and the Gumbel argmax of such a row is id 0."""
    logits = torch.zeros(2, 10)
    logits[:, 7] = 20.0
    seeds, positions = torch.tensor([1, 2]), torch.tensor([0, 0])
    for top_p in (0.0, 1e-9):
        tokens, logprobs = sample_tokens(logits, SimpleNamespace(temperature=1.0, top_p=top_p, top_k=0), seeds, positions)
        assert tokens.tolist() == [7, 7] and torch.isfinite(logprobs).all()


def test_turn_budget_reads_a_zero_cap_as_a_cap():
    sampling = SamplingParams(max_tokens=8)
    assert turn_budget(GenerationRequest(PROMPT), sampling) == 8
    assert turn_budget(GenerationRequest(PROMPT, max_tokens=3), sampling) == 3
    assert turn_budget(GenerationRequest(PROMPT, max_tokens=30), sampling) == 8
    for cap in (0, -2):
        with pytest.raises(ValueError, match=rf"request 'q#0': max_tokens={cap}, must be >= 1"):
            turn_budget(GenerationRequest(PROMPT, key="q#0", max_tokens=cap), sampling)


@pytest.mark.parametrize(
    ("bad", "message"),
    [(GenerationRequest(PROMPT, key="capped#0", max_tokens=0), r"request 'capped#0': max_tokens=0"),
     (GenerationRequest((), key="empty#0"), r"request 'empty#0': empty prompt")],
)  # fmt: skip
def test_hf_engine_refuses_a_bad_request_alone_or_batched(tiny_policy, bad, message):
    engine = HFEngine(max_batch_size=1)
    engine.bind(tiny_policy)
    sampling = SamplingParams(max_tokens=2, stop=())
    for batch in ([bad], [GenerationRequest(PROMPT, key="ok#0"), bad]):
        with pytest.raises(ValueError, match=message):
            engine.generate(batch, sampling)
    assert engine.calls == 0  # refused before a call's sampling stream was drawn
    assert len(engine.generate([GenerationRequest(PROMPT, key="ok#0", max_tokens=1)], sampling)[0].token_ids) == 1


def test_scripted_engine_refuses_a_bad_request_before_recording_any(tiny_policy):
    engine = ScriptedEngine(lambda r: "<answer>x</answer>", tiny_policy.tokenizer)
    for bad in (GenerationRequest(PROMPT, key="capped#0", max_tokens=0), GenerationRequest((), key="empty#0")):
        with pytest.raises(ValueError, match=bad.key):
            engine.generate([GenerationRequest(PROMPT, key="ok#0"), bad], SamplingParams())
    assert engine.requests == []


def test_vllm_engine_refuses_a_bad_request_before_submitting_any():
    added = []
    engine = VLLMEngine()
    engine.llm = SimpleNamespace(llm_engine=SimpleNamespace(add_request=lambda *a: added.append(a)))
    for bad in (GenerationRequest(PROMPT, key="capped#0", max_tokens=0), GenerationRequest((), key="empty#0")):
        with pytest.raises(ValueError, match=bad.key):
            engine.submit([GenerationRequest(PROMPT, key="ok#0"), bad], SamplingParams())
    assert added == [] and not engine.in_flight and engine.calls == 0
