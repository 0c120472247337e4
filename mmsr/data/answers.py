"""Answer cells -> answers: the one rule of every loader (``mmsr.data.rows`` for parquet and jsonl rows,
``mmsr.data.columns.ColumnMapping`` for any other table), so the same cell gives the same ground truth and
candidates whatever read it (the LLM judge's prompt and cache key list them)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

from mmsr.data.errors import row_error


def plain_value(value):
    """``value`` as Python objects: a numpy array or scalar (a list cell of parquet read by pandas, whose
    ``==`` and ``bool`` act elementwise) as its ``tolist()``; anything else as it is."""
    return value.tolist() if not isinstance(value, str | bytes) and callable(getattr(value, "tolist", None)) else value


def distinct_answers(texts: Iterable[str]) -> list[str]:
    """``texts`` stripped, without empty ones or repeats, in order: ``["Eiffel", "Eiffel "]`` is one answer
    (the LLM judge's prompt and cache key list the candidates, so every loader must list them alike)."""
    return list(dict.fromkeys(t for t in (text.strip() for text in texts) if t))


def candidate_list(value, path, row, field: str = "candidate_answers") -> tuple[str, ...]:
    """Candidate answers come as a list or as a JSON string of a list (upstream data), cleaned as
    ``distinct_answers``; errors name ``field`` (where the row's schema keeps them). Numbers (upstream JSON holds ints, e.g. years) are stringified, as the reward's
    ``parse_candidate_answers`` does: this layer may not import ``mmsr.reward``, so the rule (``str(v)``) is
    repeated here and must stay the same."""
    value = plain_value(value)
    if value is None or (isinstance(value, str) and not value.strip()):
        return ()
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise row_error(path, row, field, f"not a JSON list ({exc.msg})") from None
    items = [plain_value(v) for v in value] if isinstance(value, list | tuple) else None
    if items is None or not all(_is_candidate(v) for v in items):
        raise row_error(path, row, field, f"expected a list of strings (or numbers), got {value!r:.80}")
    return tuple(distinct_answers(str(v) for v in items))


def _is_candidate(value) -> bool:
    """A string or a number; a bool is a number to Python but no answer (a broken export, more likely)."""
    return isinstance(value, str) or (isinstance(value, int | float) and not isinstance(value, bool))


def _answer_value(item):
    """The string or number an answer item holds (InfoSeek's numeric ``{"wikidata": x, "range": [lo, hi]}``
    entries: ``x``), else ``None``."""
    item = plain_value(item)
    if isinstance(item, dict):
        item = plain_value(item.get("wikidata"))
    return item if _is_candidate(item) else None


def _answer_items(value) -> list:
    """The items of an answer cell: a list's; a string's that is a JSON list of answers as a whole (a list
    stored as text: ``'["a", "b"]'``, and ``'[1990]'``, numbers being answers as in a list cell); else the
    cell itself, one answer (``[citation needed]``, ``'[1, [2]]'``: text that is no list of answers)."""
    value = plain_value(value)
    if isinstance(value, list | tuple):
        return list(value)
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            parsed = json.loads(value)
        except (json.JSONDecodeError, RecursionError):  # RecursionError: "[[[[..." nested too deep
            return [value]
        if isinstance(parsed, list) and all(_answer_value(v) is not None for v in parsed):
            return parsed
    return [value]


def answer_list(value, where, row, field) -> list[str]:
    """The answers an answer cell holds (ground truth first), read alike by every loader: a string, a number
    (its ``str``), a list (or numpy array) of them or a JSON-text list of them (``_answer_items``), InfoSeek's
    numeric entries as their value; cleaned as ``distinct_answers``. ``None`` holds none; anything else is a
    ``DataError`` naming ``where``, ``row`` and ``field``."""
    if value is None:
        return []
    items = [_answer_value(v) for v in _answer_items(value)]
    if any(v is None for v in items):
        raise row_error(where, row, field, f"expected a string, a number or a list of them, got {value!r:.60}")
    return distinct_answers(str(v) for v in items)


def other_answers(answers: Sequence[str], more: Iterable[str]) -> tuple[str, ...]:
    """The candidate answers beside the ground truth ``answers[0]``: the rest of ``answers``, then ``more``,
    without repeats or the ground truth (``answers`` and ``more`` cleaned as ``distinct_answers``)."""
    return tuple(a for a in dict.fromkeys([*answers[1:], *more]) if a != answers[0])


def answers_of(value, candidates, path, row, field, candidates_field: str = "candidate_answers") -> tuple[str, tuple[str, ...]]:
    """(ground truth, candidate answers) of a row, as ``ColumnMapping`` reads an answer and an alias cell; errors
    name ``field`` and ``candidates_field``."""
    answers = answer_list(value, path, row, field)
    if not answers:
        raise row_error(path, row, field, f"missing or empty ({value!r:.40})")
    return answers[0], other_answers(answers, candidate_list(candidates, path, row, candidates_field))
