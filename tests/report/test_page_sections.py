"""What the page says where the context budget dropped an observation, and where a section has nothing to show."""

import re

import pytest

from mmsr.report.cli import write_report
from mmsr.report.html import dropped_turns, render_html
from mmsr.report.records import ToolCallRecord, TrajectoryRecord, TurnRecord, write_records
from mmsr.rollout.context import CUT, describe
from mmsr.tools.base import ToolResult


def _turn(index: int, observation: str | None) -> TurnRecord:
    tool = ToolCallRecord("text_search", "capital", True, 0.1, 0.0, ["t"], observation, []) if observation else None
    return TurnRecord(index, f"text {index}", "text_search" if tool else "answer", "capital", (index, index + 1), False, tool)


def _record(turns: list[TurnRecord], context: list[str] = ()) -> TrajectoryRecord:
    return TrajectoryRecord(step=0, global_step=0, index=0, sample_id="s", group_id=0, data_source="src", question="q?",
                            answers=["x"], image=None, reward=0.0, advantage=0.0, correct=False, reward_terms={},
                            finish_reason="truncated", answer=None, length=9, sampled_tokens=2, turns=turns,
                            context=list(context))  # fmt: skip


def test_a_dropped_observation_is_marked_as_not_shown_to_the_policy():
    """Turn 2's observation did not fit (the loop's note, as in a real long-horizon episode: ``turn 2: text_search
    observation of 2122 tokens, 1931 left for it: dropped, the episode ends (truncated)``); its record still holds
    the result, which the page showed as "what the policy read", without the note. Turn 1's was cut to fit: what
    its record holds is what the policy read."""
    cut = describe(1, "text_search", 900, 500, ToolResult("y" * 100), ToolResult("y" * 10 + CUT))
    dropped = describe(2, "text_search", 2122, 1931, ToolResult("Paris is the capital"), None)
    record = _record([_turn(0, "y" * 10 + CUT), _turn(1, "Paris is the capital")], [cut, dropped])
    assert dropped_turns(record) == {1}
    html = render_html("run", [record], {})
    _, first, second = html.split('<li class="turn')
    assert "Observation (what the policy read)" in first and "not shown to the policy" not in first
    assert "not shown to the policy" in second and "what the policy read" not in second
    assert "Paris is the capital" in second  # still there to read, marked as dropped
    notes = re.findall(r'<li class="context-note">(.*?)</li>', html)
    assert notes == [cut, dropped]


def test_each_tool_call_shows_its_tool_query_outcome_and_latency_in_its_turn():
    """A reader tells a slow or failed search from the page: each call's line names it, its query, ok or FAILED,
    and its latency, in the turn that made it."""
    ok = ToolCallRecord("text_search", "capital of France", True, 0.125, 0.0, ["t"], "Paris", [])
    failed = ToolCallRecord("image_search", "", False, 2.5, 0.0, [], "error: timeout", [])
    turns = [TurnRecord(0, "text 0", "text_search", "capital of France", (0, 1), False, ok),
             TurnRecord(1, "text 1", "image_search", "", (2, 3), False, failed)]  # fmt: skip
    _, first, second = render_html("run", [_record(turns)], {}).split('<li class="turn')
    lines = [re.findall(r'<div class="tool[^"]*">\s*<div class="meta">(.*?)</div>', turn) for turn in (first, second)]
    assert lines == [["text_search “capital of France” · ok · 0.125 s"], ["image_search · FAILED · 2.500 s"]]


CURVES = "epoch,step,val/reward/accuracy,val/rollout/search_ratio/any\n0,0,0.5,0.2\n0,10,0.6,0.3\n"


@pytest.mark.parametrize(("files", "messages"), [
    ({"metrics.csv": "epoch,reward/mean,step\n"},
     ["metrics.csv has no training curves.", "No trajectories.jsonl in the run directory (add the TrajectoryLogger callback)."]),
    ({"trajectories.jsonl": ""}, ["No metrics.csv in the run directory.", "trajectories.jsonl has no trajectories."]),
    ({"metrics.csv": CURVES, "trajectories.jsonl": ""}, ["trajectories.jsonl has no trajectories."]),
])  # fmt: skip
def test_an_empty_section_says_whether_its_file_is_missing(tmp_path, files, messages):
    """The page said "No metrics.csv" and "No trajectories.jsonl" where each file was there but held nothing shown;
    a metrics.csv of held-out columns alone was one (their curves were not plotted)."""
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    html = write_report(tmp_path).read_text()
    assert re.findall(r'<p class="empty">(.*?)</p>', html) == messages


def test_held_out_curves_are_plotted(tmp_path):
    (tmp_path / "metrics.csv").write_text(CURVES)
    html = write_report(tmp_path).read_text()
    assert re.findall(r'<img class="plot[^"]*" id="plot-([a-z_]+)"', html) == ["val_accuracy", "val_search_ratio"]


def test_trajectories_all_omitted_are_not_called_missing(tmp_path):
    write_records(tmp_path / "trajectories.jsonl", [_record([_turn(0, None)])])
    html = write_report(tmp_path, max_trajectories=0).read_text()
    assert re.findall(r'<p class="empty">(.*?)</p>', html) == [
        "No metrics.csv in the run directory.", "All 1 trajectories omitted (--max-trajectories)."]
