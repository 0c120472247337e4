"""``ForcedTurnsEngine``: the forced tokens count against the turn's budget, under the rule every engine applies
(``turn_budget``: the request's cap under ``SamplingParams.max_tokens``, a cap below 1 refused)."""

import pytest

from mmsr.eval.forced import ForcedTurn, ForcedTurnsEngine
from mmsr.rollout.engine import GenerationOutput, GenerationRequest, SamplingParams, turn_budget


class FillingEngine:
    """Samples token 5 until the turn's budget is spent; records the requests."""

    def __init__(self):
        self.requests = []

    def generate(self, requests, sampling):
        self.requests += requests
        return [GenerationOutput([5] * turn_budget(r, sampling), [-1.0] * turn_budget(r, sampling), "length") for r in requests]


@pytest.fixture
def forced(tiny_policy):
    turns = {0: ForcedTurn("<answer>", "</answer>"), 1: ForcedTurn("<search><img></search>")}
    return ForcedTurnsEngine(FillingEngine(), tiny_policy.tokenizer, turns, tiny_policy.stop_token_ids())


def test_the_forced_opening_and_the_models_tokens_fit_the_turns_budget(forced):
    opening = len(forced.ids[0])
    sampling = SamplingParams(max_tokens=8)
    for cap in (None, 100, 8, 3):  # no cap and a cap above sampling's: 8 tokens ("or" took the request's 100)
        (out,) = forced.generate([GenerationRequest((1, 2), turn=0, max_tokens=cap)], sampling)
        assert len(out.token_ids) == min(cap or 8, 8) and out.token_ids[:opening] == forced.ids[0]
    with pytest.raises(ValueError, match="max_tokens=0, must be >= 1"):  # "or" read 0 as no cap
        forced.generate([GenerationRequest((1, 2), turn=0, max_tokens=0)], sampling)


def test_a_forced_turn_longer_than_the_budget_is_cut_and_truncated_without_asking_the_model(forced):
    whole = forced.ids[1]
    assert len(whole) > 1 and len(forced.ids[0]) == 1
    requests = [GenerationRequest((1, 2), turn=0, max_tokens=1), GenerationRequest((1, 2), turn=1, max_tokens=len(whole) - 1),
                GenerationRequest((1, 2), turn=1, max_tokens=len(whole))]  # fmt: skip
    outs = forced.generate(requests, SamplingParams(max_tokens=64))
    assert [(o.token_ids, o.finish) for o in outs] == [(forced.ids[0], "length"), (whole[:-1], "length"), (whole, "stop")]
    assert forced.inner.requests == []  # no room left for a token of the model's


def test_a_query_the_budget_cuts_is_still_closed_so_the_workflow_searches_it(tiny_policy):
    """RAG makes its two searches whatever the query's length (spec §9): a query turn cut by the budget had no
    closing tag, so the loop ended the episode truncated after one search. The closing's tokens are kept free."""
    turns = {0: ForcedTurn("<text_search>", "</text_search>")}
    forced = ForcedTurnsEngine(FillingEngine(), tiny_policy.tokenizer, turns, tiny_policy.stop_token_ids())
    (out,) = forced.generate([GenerationRequest((1, 2), turn=0, max_tokens=12)], SamplingParams(max_tokens=64))
    opening, closing = forced.ids[0], forced.close_ids[0]
    assert out.finish == "stop" and len(out.token_ids) == 12
    assert out.token_ids == opening + [5] * (12 - len(opening) - len(closing)) + closing
    assert forced.inner.requests[0].max_tokens == 12 - len(opening) - len(closing)


class SilentEngine:
    """Ends every turn at once: its end-of-turn token and nothing else."""

    def __init__(self, eos):
        self.eos = eos

    def generate(self, requests, sampling):
        return [GenerationOutput([self.eos], [-0.5], "eos") for _ in requests]


def test_an_empty_query_becomes_the_question_cut_to_the_turns_budget(tiny_policy):
    """RAG's query turn with nothing of the model's: the question is the query (``<text_search></text_search>`` had
    ended the episode after one call), within the tokens the opening and closing leave; an episode whose question
    the engine was not given is an error naming it, not an empty query."""
    question = "What is the name of the group these characters belong to?"
    turns = {0: ForcedTurn("<text_search>", "</text_search>", question_if_empty=True)}
    eos = min(tiny_policy.stop_token_ids())
    forced = ForcedTurnsEngine(SilentEngine(eos), tiny_policy.tokenizer, turns, [eos], questions={"q#7": question})
    asked = tiny_policy.tokenizer.encode(question, add_special_tokens=False)
    opening, closing = forced.ids[0], forced.close_ids[0]
    (whole,) = forced.generate([GenerationRequest((1, 2), key="q#7#0", turn=0)], SamplingParams(max_tokens=64))
    assert whole.token_ids == opening + asked + closing and whole.finish == "stop" and set(whole.logprobs) == {0.0}
    (cut,) = forced.generate([GenerationRequest((1, 2), key="q#7#1", turn=0, max_tokens=len(opening) + len(closing) + 3)],
                             SamplingParams(max_tokens=64))  # fmt: skip
    assert cut.token_ids == opening + asked[:3] + closing
    with pytest.raises(ValueError, match=r"episode 'other#0': no question for sample 'other'"):
        forced.generate([GenerationRequest((1, 2), key="other#0", turn=0)], SamplingParams(max_tokens=64))


class OneShortEngine(FillingEngine):
    """Returns one output fewer than it was asked for (a user's engine with an off-by-one)."""

    def generate(self, requests, sampling):
        return super().generate(requests, sampling)[:-1]


def test_an_inner_engine_one_output_short_is_named_not_a_silently_missing_turn(tiny_policy):
    """``zip`` stopped at the shorter list: the last request's turn stayed ``None`` and failed later, unnamed."""
    forced = ForcedTurnsEngine(OneShortEngine(), tiny_policy.tokenizer, {0: ForcedTurn("<answer>", "</answer>")},
                               tiny_policy.stop_token_ids())  # fmt: skip
    requests = [GenerationRequest((1, 2), turn=0, key="q0"), GenerationRequest((1, 2), turn=0, key="q1")]
    with pytest.raises(ValueError, match=r"engine OneShortEngine\.generate returned 1 outputs for 2 requests; "
                                         r"request 'q1' has none"):  # fmt: skip
        forced.generate(requests, SamplingParams(max_tokens=8))
