"""Answer extraction and Search-R1 / SQuAD style answer matching."""

from __future__ import annotations

import json
import re
import string
from collections.abc import Sequence

_OPEN, _CLOSE = "<answer>", "</answer>"
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NO_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(s: str) -> str:
    """Lowercase, drop ASCII punctuation, drop articles a/an/the, collapse whitespace (SQuAD order)."""
    s = s.lower().translate(_NO_PUNCTUATION)  # a table, not a loop per character: ms per MB
    return " ".join(_ARTICLES.sub(" ", s).split())


def extract_answer(turn_text: str) -> str | None:
    """The last ``<answer>(.*?)</answer>`` match (DOTALL) in ``turn_text``, stripped; None if none.

    The matches are found with ``str.find``, as the regex's scan finds them, but in linear time: the
    lazy regex retries every later ``<answer>`` when no ``</answer>`` follows, so a model output of
    ``"<answer>" * 125_000`` (1 MB) took minutes to score.
    """
    last, pos = None, 0
    while (start := turn_text.find(_OPEN, pos)) >= 0:
        end = turn_text.find(_CLOSE, start + len(_OPEN))
        if end < 0:  # no later <answer> can be closed either
            break
        last, pos = turn_text[start + len(_OPEN) : end], end + len(_CLOSE)
    return last.strip() if last is not None else None


def episode_answer(turns: Sequence[str]) -> str | None:
    """The answer an episode is graded on: ``extract_answer`` of its last assistant turn (spec section 4).

    The one rule for the reward, the judge, evaluation's EM/SubEM and the logged records. The rollout
    parser's ``Answer`` (what ends an episode) takes the innermost tag instead, so for text such as
    ``<answer><answer>x</answer>`` the two differ, and evaluation had counted as right what the reward
    counted as wrong.
    """
    return extract_answer(turns[-1]) if turns else None


def exact_match(pred: str, answers: str | Sequence[str]) -> bool:
    """The normalized prediction equals some normalized answer.

    An answer that normalization erases ("A", "The The", "", "?") is compared without dropping articles
    (lowercase, no punctuation, whitespace collapsed) and never matches an empty prediction: else
    ``<answer></answer>`` or ``<answer>the</answer>`` would be right for it (SubEM matches such answers so too).
    """
    norm_pred = normalize_answer(pred)
    return any(_equal(pred, norm_pred, a) for a in _as_list(answers))


def _equal(pred: str, norm_pred: str, answer: str) -> bool:
    if norm := normalize_answer(answer):
        return norm == norm_pred
    kept = _with_articles(answer)
    return bool(kept) and kept == _with_articles(pred)


def _with_articles(s: str) -> str:
    return " ".join(s.lower().translate(_NO_PUNCTUATION).split())


def sub_exact_match(pred: str, answers: str | Sequence[str]) -> bool:
    """Some normalized answer is a substring of the normalized prediction.

    An answer that normalization erases ("A", "The The") is matched as ``exact_match`` matches it (equal with
    articles kept), so SubEM accepts every prediction EM accepts: as a substring "" is in every prediction,
    and "a" in nearly every one. Skipped, "A" was wrong under SubEM where EM had it right.
    """
    norm_pred = normalize_answer(pred)
    return any(_contains(pred, norm_pred, a) for a in _as_list(answers))


def _contains(pred: str, norm_pred: str, answer: str) -> bool:
    if norm := normalize_answer(answer):
        return norm in norm_pred
    return _equal(pred, norm_pred, answer)


def parse_candidate_answers(candidate_answers: str | Sequence[str] | None) -> list[str]:
    """Candidate answers as a list; upstream data stores them as a JSON string list ('["a","b"]').

    A string that is not JSON is taken as one candidate; "" and None mean no candidates.
    """
    if candidate_answers is None:
        return []
    if isinstance(candidate_answers, str):
        if not candidate_answers.strip():
            return []
        try:
            candidate_answers = json.loads(candidate_answers)
        except (json.JSONDecodeError, RecursionError):  # RecursionError: "[[[[..." nested too deep
            return [candidate_answers]
    return _as_list(candidate_answers)


def _as_list(answers: object) -> list[str]:
    """A str is one answer, a sequence is many; non-str elements are stringified (JSON ints)."""
    if isinstance(answers, str):
        return [answers]
    if isinstance(answers, Sequence):
        return [a if isinstance(a, str) else str(a) for a in answers]
    return [] if answers is None else [str(answers)]
