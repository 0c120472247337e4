"""``turn_rows``: the per-turn wandb table's rows, an episode without turns included."""

from dataclasses import replace

from mmsr.callbacks.wandb_table import COLUMNS, turn_rows
from mmsr.report.records import ToolCallRecord, TrajectoryRecord, TurnRecord, read_records, write_records

NOTE = "prompt of 50 tokens fills max_context_tokens=50: no turn generated, the episode ends (truncated)"


def _record(index: int, turns: list[TurnRecord], finish: str) -> TrajectoryRecord:
    return TrajectoryRecord(step=3, global_step=3, index=index, sample_id=f"s{index}", group_id=index, data_source="src",
                            question="q?", answers=["gt"], image=None, reward=0.0, advantage=-0.5, correct=False,
                            reward_terms={"correct": 0.0}, finish_reason=finish, answer=None, length=50,
                            sampled_tokens=sum(t.span[1] - t.span[0] for t in turns), turns=turns,
                            context=[NOTE] if not turns else [])  # fmt: skip


def test_an_episode_without_turns_has_a_row_with_its_finish_reason():
    """A prompt that fills ``max_context_tokens`` ends the episode before its first turn: it had no row, so the table
    did not show the episode (nor why it scored 0)."""
    answered = _record(0, [TurnRecord(0, "<answer>x</answer>", "answer", "x", (50, 56), False, None)], "answer")
    raw = turn_rows([answered, _record(1, [], "truncated")])
    assert [len(row) for row in raw] == [len(COLUMNS)] * len(raw)
    rows = [dict(zip(COLUMNS, row)) for row in raw]
    assert [(r["trajectory"], r["turn"], r["finish_reason"]) for r in rows] == [(0, 0, "answer"), (1, None, "truncated")]
    empty = rows[1]
    assert (empty["sample_id"], empty["reward"], empty["advantage"]) == ("s1", 0.0, -0.5)
    assert (empty["model_text"], empty["action"], empty["loss_mask_span"], empty["sampled_tokens"]) == ("", "", "", 0)
    assert rows[0]["loss_mask_span"] == "[50, 56)" and rows[0]["sampled_tokens"] == 6


def test_each_row_holds_its_turn_s_text_and_its_episode_s_reward_as_the_jsonl_records_do(tmp_path):
    """The table is read beside the run's ``trajectories.jsonl``: a row's model text and reward are its record's."""
    search = TurnRecord(0, "<search>who?</search>", "text_search", "who?", (50, 58), False,
                        ToolCallRecord("text_search", "who?", True, 0.25, 0.0, ["t"], "text", []))  # fmt: skip
    answer = TurnRecord(1, "<answer>gt</answer>", "answer", "gt", (70, 76), False, None)
    right = replace(_record(0, [search, answer], "answer"), reward=0.75, advantage=0.5, correct=True, answer="gt")
    write_records(tmp_path / "t.jsonl", [right, replace(_record(1, [answer], "answer"), reward=-0.25)])
    records = list(read_records(tmp_path / "t.jsonl"))
    rows = [dict(zip(COLUMNS, row)) for row in turn_rows(records)]
    expected = [(r.index, t.text, r.reward) for r in records for t in r.turns]
    assert [(row["trajectory"], row["model_text"], row["reward"]) for row in rows] == expected
    assert expected == [(0, search.text, 0.75), (0, answer.text, 0.75), (1, answer.text, -0.25)]
