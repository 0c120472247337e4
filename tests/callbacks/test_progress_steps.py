"""StageProgressBar's step total on a real ``mmsr fit`` (tests/callbacks/scripted_run.py) whose ``trainer.max_steps``
is no multiple of the updates a step makes."""

import json

from tests.callbacks.scripted_run import run

BAR = {"class_path": "mmsr.callbacks.progress.StageProgressBar",
       "init_args": {"plain": True, "plain_every_s": 0.0, "poll_s": 0}}  # every step a line, no watcher


def test_the_total_counts_the_step_that_ends_past_max_steps(tmp_path, capsys):
    """3 updates at 2 a step: Lightning finishes the second step's updates before it stops, so the run has 2 steps.
    The total was floored: the lines said ``step 2/1`` and a negative ETA."""
    cli = run(tmp_path, "--trainer.max_steps", "3", "--model.mini_batches", "2", "--trainer.enable_progress_bar", "true",
              "--trainer.callbacks", json.dumps([BAR]))  # fmt: skip
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("grpo step")]
    assert cli.trainer.global_step == 4
    assert [line.split(" | ")[0] for line in lines] == ["grpo step 1/2", "grpo step 2/2"]
    assert not any("ETA -" in line for line in lines), lines
