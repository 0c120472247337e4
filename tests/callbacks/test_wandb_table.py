"""``turn_rows``: the per-turn wandb table's rows, an episode without turns included."""

from mmsr.callbacks.wandb_table import COLUMNS, turn_rows
from mmsr.report.records import TrajectoryRecord, TurnRecord

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
