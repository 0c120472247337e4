"""Per-question evaluation records and their summary (JSON and a markdown table).

Search ratio under both of the paper's definitions (spec §9): ``search_ratio`` = share of responses
that made at least one search (§4.1 text), ``call_ratio`` = search calls made / the most allowed
(Table 1 caption). Per search type: ``image_only``, ``text_only``, ``mixed`` (shares of responses).
``tool_calls`` counts the calls made, ``failed_calls`` those whose result was a failure (the episode went on with
it as the observation): a tool that cannot serve the set (a cache keyed on other rows, a provider down) would
otherwise pass for a low accuracy. Each ``data_source`` and ``category`` is summarized over its own rows only (upstream computes every
source's search ratio over the whole validation batch), named by its text (``slice_name``: ``1`` and ``"1"`` are
one slice, a row without one is in ``"none"``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class EvalRecord:
    """One question answered once under one workflow (a line of ``trajectories.jsonl``).

    Attributes:
        turns: per assistant turn ``{"text", "action", "query", "tool_ok", "titles"}``.
        judge: the LLM judge's verdict; ``None`` without a judge or when its reply had no verdict; ``False``
            without asking for an episode without an answer.
        judge_reply: the judge's raw reply (or the error that prevented one; ``run.NOT_ASKED`` when not asked).
    """

    set: str
    workflow: str
    sample_id: str
    data_source: str
    category: str | None
    question: str
    ground_truth: str
    candidate_answers: list[str]
    answer: str | None
    em: bool
    subem: bool
    reward: float
    format_ok: bool
    image_searches: int
    text_searches: int
    allowed_calls: int
    finish_reason: str
    num_tokens: int
    turns: list[dict] = field(default_factory=list)
    judge: bool | None = None
    judge_reply: str | None = None
    tool_calls: dict[str, int] = field(default_factory=dict)  # calls of every configured tool, by name

    @property
    def calls(self) -> int:
        """Calls of any tool (records written before ``tool_calls``: the two searches)."""
        return sum(self.tool_calls.values()) if self.tool_calls else self.image_searches + self.text_searches


def _mean(xs: Sequence[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else 0.0


def metrics(records: Sequence[EvalRecord]) -> dict[str, float | int | None]:
    """Scores and search ratios of a group of records (one set x workflow, or a slice of it)."""
    img = [r.image_searches > 0 for r in records]
    txt = [r.text_searches > 0 for r in records]
    judged = [r.judge for r in records if r.judge is not None]
    wants_judge = any(r.judge_reply is not None for r in records)
    return {
        "n": len(records),
        "em": _mean([r.em for r in records]),
        "subem": _mean([r.subem for r in records]),
        # unparsed verdicts count as wrong, and are counted so the reader can see them
        "judge": _mean([r.judge is True for r in records]) if wants_judge else None,
        "judge_unparsed": len(records) - len(judged) if wants_judge else 0,
        "reward": _mean([r.reward for r in records]),
        "format": _mean([r.format_ok for r in records]),
        "search_ratio": _mean([r.calls > 0 for r in records]),
        "call_ratio": _mean([r.calls / r.allowed_calls if r.allowed_calls else 0.0 for r in records]),
        "image_only": _mean([i and not t for i, t in zip(img, txt)]),
        "text_only": _mean([t and not i for i, t in zip(img, txt)]),
        "mixed": _mean([i and t for i, t in zip(img, txt)]),
        "turns": _mean([len(r.turns) for r in records]),
        "tool_calls": sum(t.get("tool_ok") is not None for r in records for t in r.turns),
        "failed_calls": sum(t.get("tool_ok") is False for r in records for t in r.turns),
    }


def slice_name(value: object) -> str:
    """A ``data_source`` or ``category`` as the summary's key: a set may hold numbers (a jsonl column of ints)
    next to strings and rows without one, which sorted together raised ``TypeError`` after every episode had run;
    a row without one is in ``"none"``."""
    return "none" if value is None or value == "" else str(value)


def summarize(records: Sequence[EvalRecord]) -> dict:
    """``{set: {workflow: {"all": m, "by_data_source": {src: m}, "by_category": {cat: m}}}}``."""
    groups: dict[tuple[str, str], list[EvalRecord]] = defaultdict(list)
    for r in records:
        groups[(r.set, r.workflow)].append(r)
    out: dict = {}
    for (name, workflow), rows in groups.items():
        by_source, by_category = defaultdict(list), defaultdict(list)
        for r in rows:
            by_source[slice_name(r.data_source)].append(r)
            by_category[slice_name(r.category)].append(r)
        out.setdefault(name, {})[workflow] = {
            "all": metrics(rows),
            "by_data_source": {k: metrics(v) for k, v in sorted(by_source.items())},
            "by_category": {k: metrics(v) for k, v in sorted(by_category.items())},
        }
    return out


_COLUMNS = ("n", "em", "subem", "judge", "search_ratio", "call_ratio", "image_only", "text_only", "mixed")


def markdown(summary: dict) -> str:
    """One row per set x workflow x slice; rates in percent. With a judge, the episodes it gave no verdict
    (``judge_unparsed``: endpoint down, reply unparsed) follow its accuracy: they count wrong, and a judge
    outage would otherwise only show as a low score; so do failed tool calls, in a last column where any failed."""
    alls = [parts["all"] for workflows in summary.values() for parts in workflows.values()]
    judged, failed = any(m["judge"] is not None for m in alls), any(m["failed_calls"] for m in alls)
    head = ["set", "workflow", "slice", "n", "EM", "SubEM", "Judge", *(["Judge unparsed"] if judged else []),
            "SR (responses)", "SR (calls)", "image only", "text only", "mixed", *(["failed calls"] if failed else [])]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, workflows in summary.items():
        for workflow, parts in workflows.items():
            slices = [("all", parts["all"])] + [(f"source={k}", m) for k, m in parts["by_data_source"].items()]
            slices += [(f"category={k}", m) for k, m in parts["by_category"].items()]
            for label, m in slices:
                cells = [str(m["n"])] + ["–" if m[c] is None else f"{100 * m[c]:.1f}" for c in _COLUMNS[1:]]
                if judged:
                    cells.insert(_COLUMNS.index("judge") + 1, "–" if m["judge"] is None else str(m["judge_unparsed"]))
                if failed:
                    cells.append(f"{m['failed_calls']} of {m['tool_calls']}")
                lines.append("| " + " | ".join([name, workflow, label, *cells]) + " |")
    return "\n".join(lines) + "\n"
