"""Behaviours of mmsr/callbacks that no other test pinned: each test here failed against a mutant of the module that
the other callback tests let pass (a mutation audit of mmsr/callbacks)."""

import csv
from dataclasses import replace
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment

from mmsr.callbacks.progress import StageProgressBar
from mmsr.callbacks.requeue import hpc_resume_path
from mmsr.callbacks.trajectory_logger import TrajectoryLogger
from mmsr.callbacks.wandb_table import COLUMNS, turn_rows
from tests.callbacks.test_progress import LinearModule
from tests.callbacks.test_resume_logging import VALIDATION, Killed, fit
from tests.callbacks.test_trajectory_logger import StepsOfWandb, TwoUpdatesAStep
from tests.callbacks.test_wandb_table import _record


def test_the_last_step_s_plain_line_is_written_however_recent_the_line_before(capsys, tmp_path):
    """A log file's last progress line is the run's end: throttled (``plain_every_s``) like the others, a run whose
    last line came a moment before showed the run stopping short of its total (``step 1/3`` for a finished run)."""
    bar = StageProgressBar(poll_s=0, name="linear", plain_every_s=1e9)  # after the first, only a forced line
    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, default_root_dir=tmp_path, callbacks=[bar],
                        limit_val_batches=0)  # fmt: skip
    trainer.fit(LinearModule())
    lines = [line.split(" | ")[0] for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert lines == ["linear step 1/3", "linear step 3/3"]


def test_a_requeued_job_resumes_from_the_latest_hpc_checkpoint(tmp_path, monkeypatch):
    """Each requeue of a job saves the next ``hpc_ckpt_N.ckpt``: the one with the highest N holds the latest step.
    Resuming from an older one retrains the steps since, and the run directory gets their rows twice."""
    monkeypatch.setattr(SLURMEnvironment, "detect", staticmethod(lambda: True))
    for n in (2, 10):  # 10 after 9, as a number: "10" < "2" as text
        (tmp_path / f"hpc_ckpt_{n}.ckpt").write_bytes(b"a requeue's save")
    assert hpc_resume_path({"default_root_dir": str(tmp_path)}) == str(tmp_path / "hpc_ckpt_10.ckpt")


def test_a_stop_min_steps_overrides_logs_each_later_step_s_table(scripted_run, tmp_path):
    """A stop asked for before ``min_steps`` (early stopping) does not end the run, but from then on Lightning logs
    every step's scalars (its logger connector's ``should_update_logs``: ``or trainer.should_stop``): each of those
    steps' tables belongs beside them, not only every ``every_n_steps`` and at the last step."""
    import wandb

    logger = StepsOfWandb(str(tmp_path))
    trainer = L.Trainer(max_steps=99, min_steps=12, accelerator="cpu", logger=logger, log_every_n_steps=4,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[TrajectoryLogger(every_n_steps=4, max_trajectories=1)])  # fmt: skip
    module = TwoUpdatesAStep(scripted_run.model.last_rollout, stop_at=1)  # 12 updates at 2 a step: steps 0..5
    try:  # an epoch of 6 steps: min_steps also keeps the epoch going to its end (Lightning's implied min_epochs=1)
        trainer.fit(module, torch.utils.data.DataLoader(torch.zeros(6, 1)))
    finally:
        wandb.finish()
    tables, scalars = ([s for kind, s in logger.calls if kind == k] for k in ("table", "scalars"))
    assert scalars == [1, 2, 3, 4, 5] and tables == scalars


def test_the_ground_truth_column_is_the_first_answer():
    """A sample's answers list its ground truth first, then the accepted aliases (``mmsr.data.answers``): the
    table's ``ground_truth`` is the one the reward and ``mmsr report`` name, not the last alias."""
    record = replace(_record(0, [], "truncated"), answers=["Eiffel Tower", "La tour Eiffel"])
    (row,) = turn_rows([record])
    assert dict(zip(COLUMNS, row))["ground_truth"] == "Eiffel Tower"


def validations(root: Path) -> list[tuple[int, float]]:
    """(step, ``val/episodes``) of each validation row of the run's ``metrics.csv``."""
    with (root / "csv" / "version_0" / "metrics.csv").open(newline="") as f:
        return [(int(r["step"]), float(r["val/episodes"])) for r in csv.DictReader(f) if r.get("val/episodes")]


def test_the_validation_a_resume_runs_covers_every_held_out_batch_after_an_earlier_validation(tmp_path):
    """The checkpoint restores the validation loop's progress as "restarting", counting the batches of the killed
    run's previous validation as already fetched: the resumed run's validation stopped after its first batch, and
    its ``val/`` metrics covered part of the held-out set. Two batches, killed at the second validation."""
    kill = {"class_path": "tests.callbacks.test_resume_logging.KillAtValidation", "init_args": {"step": 4}}
    two_batches = [*VALIDATION, "--trainer.limit_val_batches", "2"]
    with pytest.raises(Killed):
        fit(tmp_path, 4, [kill], *two_batches)
    (first,) = validations(tmp_path)
    fit(tmp_path, 4, [], *two_batches, resume="step=4.ckpt")
    assert validations(tmp_path) == [first, (3, first[1])] and first == (1, 4.0)
