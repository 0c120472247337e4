"""The parser and the reward against adversarial model outputs (property tests, hypothesis).

A policy early in RL emits anything: arbitrary unicode, tags nested or left open, image special
tokens as text, megabytes without a closing tag. Whatever it emits, ``parse_action`` and the
MMSearch-R1 reward must not raise, must finish in bounded time (no regex backtracking blow-up), and
the format score must be 1 exactly for the four legal shapes (spec section 4): legal shapes are
built and score 1, and any tag-level mutation of one scores 0. Runs are short and derandomized.
"""

from __future__ import annotations

import string
import time
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mmsr.data.sample import Sample
from mmsr.reward import MMSearchR1Reward, extract_answer, format_ok, mmsearch_r1_reward
from mmsr.reward.format import turn_kind
from mmsr.rollout.actions import Answer, ImageSearch, Invalid, TextSearch
from mmsr.rollout.parse import parse_action

FAST = settings(max_examples=200, deadline=None, derandomize=True)
# The tags the format counts; a legal turn holds each exactly as often as its shape says.
COUNTED = ("<reason>", "</reason>", "<answer>", "</answer>", "<search>", "</search>", "<text_search>", "</text_search>")
SPECIAL = ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_end|>", "<|im_start|>", "<|endoftext|>")
OTHER = ("<img>", "<search><img></search>", "<information>", "</information>", "<think>", "<", ">", "</", "/>")
WHITESPACE = (" ", "\n", "\t", "\r\n", "\u3000", "\x85", "\u2028")
REWARDS = {0.0, 0.1, 0.81, 0.9, 0.91, 1.0}  # the spec's table at format weight 0.1, search penalty 0.1

unicode = st.text(st.characters(codec=None, exclude_categories=()), max_size=12)  # surrogates too
piece = st.one_of(unicode, st.sampled_from(COUNTED + SPECIAL + OTHER + WHITESPACE))
soup = st.lists(piece, max_size=40).map("".join)
nested = st.recursive(
    piece,
    lambda inner: st.tuples(st.sampled_from(["reason", "answer", "search", "text_search"]), inner, st.integers(0, 3)).map(
        lambda t: ("" if t[2] == 1 else f"<{t[0]}>") + t[1] + ("" if t[2] == 2 else f"</{t[0]}>")  # 1, 2: unbalanced
    ),
    max_leaves=12,
)
output = st.one_of(soup, nested, st.lists(nested, max_size=4).map("".join))


# ---------------------------------------------------------------------------------------------------
# nothing raises; results keep their invariants


@FAST
@given(output)
def test_parse_never_raises_and_never_returns_a_tag(text: str) -> None:
    action = parse_action(text)
    argument = action.text if isinstance(action, Answer) else action.query if isinstance(action, TextSearch) else ""
    assert isinstance(action, Answer | ImageSearch | TextSearch | Invalid)
    assert not any(t in argument for t in ("<answer>", "</answer>", "<text_search>", "</text_search>", "<search>", "</search>"))
    if isinstance(action, TextSearch):
        assert action.query and action.query == " ".join(action.query.split())


@FAST
@given(st.lists(output, max_size=4), output, st.booleans())
def test_reward_never_raises_and_takes_only_the_documented_values(turns: list[str], truth: str, per_search: bool) -> None:
    reward = mmsearch_r1_reward(turns, truth, [truth[::-1]], per_search_penalty=per_search)
    allowed = REWARDS | ({0.9 * 0.9**k + f for k in (2, 3) for f in (0, 0.1)} if per_search else set())
    assert any(reward == pytest.approx(v) for v in allowed), reward
    sample = Sample(id="s", question="q", image=None, ground_truth=truth, candidate_answers=(truth[::-1],))
    trajectory, reward_fn = SimpleNamespace(assistant_texts=turns), MMSearchR1Reward()  # what the reward reads
    assert reward_fn(trajectory, sample) == pytest.approx(mmsearch_r1_reward(turns, truth, [truth[::-1]]))
    details = reward_fn.details(trajectory, sample)
    assert set(details.values()) <= {0.0, 1.0} and details["format"] == float(format_ok(turns))


# ---------------------------------------------------------------------------------------------------
# legal shapes score 1; any tag-level mutation scores 0

# Free text of a legal turn: anything but the counted tags (an <img>, a special token, a "<" are fine).
free = st.lists(st.one_of(unicode, st.sampled_from(SPECIAL + ("<img>", "<", ">", "</", "<think>"))), max_size=6).map("".join)
free = free.filter(lambda s: not any(t in s for t in COUNTED))
space = st.lists(st.sampled_from(WHITESPACE), max_size=3).map("".join)


@st.composite
def legal_turn(draw: st.DrawFn, kind: str) -> list[str]:
    """A well-formed turn of ``kind`` as its pieces: whitespace, tags and free text."""
    tail = {"answer": ["<answer>", draw(free), "</answer>"], "image_search": ["<search><img></search>"],
            "text_search": ["<text_search>", draw(free), "</text_search>"]}[kind]  # fmt: skip
    return [draw(space), "<reason>", draw(free), "</reason>", draw(free), *tail, draw(space)]


SHAPES = [("answer",), ("image_search", "answer"), ("text_search", "answer"), ("image_search", "text_search", "answer")]
shape = st.sampled_from(SHAPES).flatmap(lambda kinds: st.tuples(*[legal_turn(k) for k in kinds]))


NO_PUNCTUATION = str.maketrans("", "", string.punctuation)


@FAST
@given(shape)
def test_legal_shapes_score_one_and_parse_to_what_the_reward_scores(turns: tuple[list[str], ...]) -> None:
    texts = ["".join(t) for t in turns]
    assert format_ok(texts)
    answer = turns[-1][-3]
    assert extract_answer(texts[-1]) == answer.strip() and parse_action(texts[-1]) == Answer(answer.strip())
    erased = not " ".join(answer.translate(NO_PUNCTUATION).split())  # EM matches no such ground truth
    expected = 0.1 if erased else 0.91 if len(texts) > 1 else 1.0  # else correct: the truth is the answer given
    assert mmsearch_r1_reward(texts, answer) == pytest.approx(expected)
    for pieces, text in zip(turns[:-1], texts):
        action = parse_action(text)  # the rollout executes the search the reward counts
        if "<search><img></search>" in pieces:
            assert action == ImageSearch()
        else:
            query = " ".join(pieces[-3].split())
            assert action == (TextSearch(query) if query else Invalid("empty text_search query"))


def mutate(data: st.DataObject, pieces: list[str]) -> list[str]:
    """One tag-level change: a counted tag inserted, a tag removed or doubled, the tags reversed, or
    text before the first tag or after the last one."""
    tags = [i for i, p in enumerate(pieces) if p in COUNTED or p == "<search><img></search>"]
    kind = data.draw(st.sampled_from(["insert", "remove", "double", "reverse", "prefix", "suffix"]))
    i = data.draw(st.sampled_from(tags))
    if kind == "insert":
        at = data.draw(st.integers(0, len(pieces)))
        return [*pieces[:at], data.draw(st.sampled_from(COUNTED)), *pieces[at:]]
    if kind in ("remove", "double"):
        return [*pieces[:i], *([pieces[i]] * (kind == "double") * 2), *pieces[i + 1 :]]
    if kind == "reverse":
        order = iter(reversed([pieces[j] for j in tags]))
        return [next(order) if j in tags else p for j, p in enumerate(pieces)]
    text = data.draw(free.filter(lambda s: s.strip() != ""))
    return [text, *pieces] if kind == "prefix" else [*pieces, text]


@FAST
@given(shape, st.data())
def test_a_mutated_turn_breaks_the_shape(turns: tuple[list[str], ...], data: st.DataObject) -> None:
    k = data.draw(st.integers(0, len(turns) - 1))
    mutated = ["".join(mutate(data, t) if i == k else t) for i, t in enumerate(turns)]
    assert turn_kind(mutated[k]) is None and not format_ok(mutated)


@FAST
@given(st.lists(st.sampled_from(["answer", "image_search", "text_search"]), max_size=4).flatmap(
    lambda kinds: st.tuples(st.just(tuple(kinds)), st.tuples(*[legal_turn(k) for k in kinds]))))  # fmt: skip
def test_well_formed_turns_in_any_order_score_one_only_in_the_four_shapes(case) -> None:
    kinds, turns = case
    assert format_ok(["".join(t) for t in turns]) == (kinds in SHAPES)


# ---------------------------------------------------------------------------------------------------
# bounded time on megabyte outputs

MB = 1_000_000
HUGE = {
    "open reasons": lambda: "<reason>" * (MB // 8),
    "open answers": lambda: "<answer>" * (MB // 8),  # extract_answer's lazy regex took minutes here
    "open text searches": lambda: "<text_search>" * (MB // 13),
    "one open answer": lambda: "<reason>r</reason><answer>" + "x" * MB,
    "one open image search": lambda: "<search>" + " " * MB,
    "image pads": lambda: "<|vision_start|>" + "<|image_pad|>" * (MB // 13),
    "answer closed many times": lambda: "<reason>r</reason><answer>" + "</answer>x" * (MB // 10),
    "a megabyte answer": lambda: "<reason>r</reason><answer>" + "y " * (MB // 2) + "</answer>",
}


def elapsed(text: str) -> float:
    """Seconds to parse ``text`` and score it as a searching and as a one-turn trajectory."""
    start = time.perf_counter()
    parse_action(text)
    mmsearch_r1_reward([text, text], "y", ["x"], per_search_penalty=True)
    mmsearch_r1_reward([text], "y", mode="SubEM")
    return time.perf_counter() - start


@pytest.mark.parametrize("name", HUGE)
def test_a_megabyte_output_takes_well_under_a_second(name: str) -> None:
    assert elapsed(HUGE[name]()) < 0.5


@settings(max_examples=25, deadline=None, derandomize=True)
@given(st.lists(st.sampled_from(COUNTED + SPECIAL + OTHER + ("x", " ")), min_size=1, max_size=4).map("".join))
def test_any_unit_repeated_to_a_megabyte_takes_well_under_a_second(unit: str) -> None:
    assert elapsed(unit * (MB // len(unit))) < 0.5
