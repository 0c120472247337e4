"""ScriptedEngine ends a scripted turn where a real engine would: at the first stop string or eos token."""

import pytest

from mmsr.rollout.engine import GenerationRequest, SamplingParams, ScriptedEngine

ANS = "<reason>look</reason><answer>Paris</answer>"
SEARCH = "<search><img></search>"


@pytest.mark.parametrize(("text", "kept", "finish"), [
    # vLLM and HFEngine stop on the sampled <|im_end|>: the search after it was never sampled, nor called
    (f"Paris, I think<|im_end|>{SEARCH}", "Paris, I think", "eos"),
    ("Paris<|im_end|>trailing text", "Paris", "eos"),
    ("Paris<|im_end|>", "Paris", "eos"),  # one eos, not the script's and then the appended one
    (f"{SEARCH}<|im_end|>Paris", SEARCH, "stop"),  # the stop string completes first
    (f"{ANS}<|im_end|>{SEARCH}", ANS, "stop"),  # </answer> is a stop string too
    ("Paris", "Paris", "eos"),
])  # fmt: skip
def test_a_scripted_turn_ends_at_its_first_eos_or_stop_string(tiny_policy, text, kept, finish):
    tok = tiny_policy.tokenizer
    engine = ScriptedEngine(lambda r: text, tok)
    (out,) = engine.generate([GenerationRequest((1, 2), key="s#0")], SamplingParams())
    eos = [tok.convert_tokens_to_ids("<|im_end|>")] if finish == "eos" else []
    assert out.token_ids == tok.encode(kept, add_special_tokens=False) + eos
    assert out.finish == finish and out.logprobs == [-1.0] * len(out.token_ids)


def test_an_eos_that_fills_the_turn_budget_ends_the_turn_as_eos(tiny_policy):
    """The eos is the budget's last token: the turn ended on it ("eos"), it did not run out of tokens ("length")."""
    tok = tiny_policy.tokenizer
    engine = ScriptedEngine(lambda r: f"Paris, I think<|im_end|>{SEARCH}", tok)
    kept = tok.encode("Paris, I think", add_special_tokens=False) + [tok.convert_tokens_to_ids("<|im_end|>")]
    for budget, finish in ((len(kept), "eos"), (len(kept) - 1, "length")):
        (out,) = engine.generate([GenerationRequest((1, 2), key="s#0", max_tokens=budget)], SamplingParams())
        assert (out.token_ids, out.finish) == (kept[:budget], finish)
