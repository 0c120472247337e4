"""RAG's query turn (``ForcedTurn(question_if_empty=True)``) written as an image search: ``<img>``, an image tool's
argument, is no query text, so the turn searches the question (``mmsr.eval.forced.IMAGE_ARGUMENT``)."""

import pytest

from mmsr.eval.forced import IMAGE_ARGUMENT, ForcedTurn, ForcedTurnsEngine
from mmsr.rollout.engine import GenerationOutput, GenerationRequest, SamplingParams
from mmsr.tools.spec import IMAGE_SEARCH


class WritesThenEnds:
    """Writes ``text`` then its end-of-turn token, for every request."""

    def __init__(self, tokenizer, text, eos):
        self.ids = tokenizer.encode(text, add_special_tokens=False) + [eos]

    def generate(self, requests, sampling):
        return [GenerationOutput(list(self.ids), [-0.5] * len(self.ids), "eos") for _ in requests]


def _query_turn(tiny_policy, written):
    question = "What is the name of the group these characters belong to?"
    eos = min(tiny_policy.stop_token_ids())
    turns = {0: ForcedTurn("<text_search>", "</text_search>", question_if_empty=True)}
    forced = ForcedTurnsEngine(WritesThenEnds(tiny_policy.tokenizer, written, eos), tiny_policy.tokenizer, turns, [eos],
                               questions={"q": question})  # fmt: skip
    (out,) = forced.generate([GenerationRequest((1, 2), key="q#0", turn=0)], SamplingParams(max_tokens=64))
    return tiny_policy.tokenizer.decode(out.token_ids), question


def test_the_image_argument_is_read_from_the_image_search_spec():
    assert IMAGE_ARGUMENT == "<img>" and IMAGE_SEARCH.call == f"<search>{IMAGE_ARGUMENT}</search>"


@pytest.mark.parametrize("written", ["<search><img></search>", " <img> ", "<img><img>", "<text_search> <img></text_search>"])
def test_a_query_of_nothing_but_the_image_argument_searches_the_question(tiny_policy, written):
    """``<search><img></search>`` lost its tags and searched the literal text ``<img>``."""
    text, question = _query_turn(tiny_policy, written)
    assert text == f"<text_search>{question}</text_search>"


def test_a_query_with_words_beside_the_image_argument_is_the_models_own(tiny_policy):
    text, _ = _query_turn(tiny_policy, "eiffel <img> tower")
    assert text == "<text_search>eiffel <img> tower</text_search>"
