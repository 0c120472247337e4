"""HFEngine stops on a stop string wherever vLLM does, which checks the detokenized text (special tokens skipped)."""

import pytest
import torch

import mmsr.rollout.hf_engine as hf_engine
from mmsr.rollout.engine import GenerationRequest, SamplingParams
from mmsr.rollout.hf_engine import HFEngine


def scripted_draws(monkeypatch, script):
    """Make every row draw ``script[step]`` (log-prob 0): the tokens a policy could sample, chosen by the test."""

    def draw(logits, sampling, seeds, positions):
        return torch.tensor([script[int(p)] for p in positions]), torch.zeros(len(positions))

    monkeypatch.setattr(hf_engine, "sample_tokens", draw)


@pytest.mark.parametrize("specials", [0, 2, 8, 30])
def test_a_stop_string_split_by_special_tokens_stops_the_turn(tiny_policy, monkeypatch, specials):
    """``</search>`` drawn a character a token, with ``specials`` <|box_start|> (not banned, decoded to nothing)
    before its ``>``: the text is ``</search>``, so vLLM stops at ``>``. The window of the last 16 ids (longest
    stop + 2) missed the ``<`` from 8 special tokens on and the turn ran on to its budget."""
    tok = tiny_policy.tokenizer
    chars = [tok.convert_tokens_to_ids(c) for c in "</search>"]
    box, a = tok.convert_tokens_to_ids("<|box_start|>"), tok.convert_tokens_to_ids("a")
    sampled = chars[:-1] + [box] * specials + chars[-1:]
    scripted_draws(monkeypatch, sampled + [a] * 4)
    engine = HFEngine()
    engine.bind(tiny_policy)
    request = GenerationRequest(tuple(tok.encode("hi")), key="e#0")
    (out,) = engine.generate([request], SamplingParams(max_tokens=len(sampled) + 4))
    assert (out.token_ids, out.finish) == (sampled, "stop")
    assert tok.decode(out.token_ids, skip_special_tokens=True) == "</search>"  # what vLLM's stop check reads


def test_only_the_special_tokens_decode_to_nothing(tiny_policy):
    engine = HFEngine()
    engine.bind(tiny_policy)
    tok = tiny_policy.tokenizer
    assert engine._silent_ids() == frozenset(tok.convert_tokens_to_ids(tok.all_special_tokens))
