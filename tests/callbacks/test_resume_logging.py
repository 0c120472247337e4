"""What a resumed ``mmsr fit`` logs (tests/callbacks/scripted_run.py, real runs in-process): trajectories numbered
as the metrics, the validation a kill skipped, a wandb run rewound to the checkpoint (``mmsr.callbacks.run_dir``)."""

import csv
import json
import struct
from pathlib import Path

import lightning as L
import pytest
import torch
from jsonargparse import Namespace

from mmsr.callbacks import resume_point
from mmsr.callbacks.run_dir import repoint_loggers
from mmsr.report.records import read_records
from tests.callbacks.scripted_run import run

TRAJECTORIES = {"class_path": "mmsr.callbacks.trajectory_logger.TrajectoryLogger", "init_args": {"max_trajectories": 2}}
VALIDATION = ["--data.val_files", '["data/fvqa_dev_20/fvqa_dev.jsonl"]', "--trainer.val_check_interval", "2",
              "--trainer.check_val_every_n_epoch", "null", "--trainer.limit_val_batches", "1",
              "--trainer.num_sanity_val_steps", "0"]  # fmt: skip


def checkpoints(root: Path) -> dict:
    """A ``ModelCheckpoint`` saving ``root/ckpt/step=<global_step>.ckpt`` at every step's end."""
    args = {"dirpath": str(root / "ckpt"), "every_n_train_steps": 1, "save_top_k": -1, "filename": "{step}"}
    return {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": args}


def fit(root: Path, steps: int, callbacks: list[dict], *args: str, resume: str | None = None):
    resumed = ["--ckpt_path", str(root / "ckpt" / resume)] if resume else []
    return run(root, "--trainer.max_steps", str(steps), "--trainer.enable_checkpointing", "true",
               "--trainer.callbacks", json.dumps([checkpoints(root), *callbacks]), *args, *resumed)  # fmt: skip


def rows(root: Path) -> list[tuple[int, str]]:
    """``metrics.csv`` rows as (step, "val" for a validation's, "train" for a training step's)."""
    with (root / "csv" / "version_0" / "metrics.csv").open(newline="") as f:
        return [(int(r["step"]), "val" if r.get("val/episodes") else "train") for r in csv.DictReader(f)]


def test_trajectories_are_numbered_as_the_metrics_when_the_logger_joins_at_resume(tmp_path):
    """A TrajectoryLogger added at resume counted steps from 0 (its own counter, from its own checkpoint state):
    the records of steps 2 and 3 said 0 and 1, and a later resume cut the file at its count, not at the step."""
    fit(tmp_path, 2, [])  # no TrajectoryLogger: its checkpoints hold no state of one
    fit(tmp_path, 4, [TRAJECTORIES], resume="step=2.ckpt")
    path = tmp_path / "csv" / "version_0" / "trajectories.jsonl"
    assert [r.step for r in read_records(path)] == [2, 2, 3, 3]
    fit(tmp_path, 4, [TRAJECTORIES], resume="step=3.ckpt")  # step 3 again: its records are replaced
    assert [r.step for r in read_records(path)] == [2, 2, 3, 3]
    assert [s for s, _ in rows(tmp_path)] == [0, 1, 2, 3]


class Killed(Exception):
    """The test's SIGKILL: raised where a kill would leave the process."""


class KillAtValidation(L.Callback):
    """Dies when the validation after optimizer step ``step`` starts: that step's checkpoint is saved."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.global_step == self.step and not trainer.sanity_checking:
            raise Killed(trainer.global_step)


def test_a_validation_killed_after_its_checkpoint_runs_when_the_run_resumes(tmp_path):
    """Lightning saves a step's checkpoint before the validation after that step, and a run resumed from it
    fast-forwarded past that validation: a kill during it lost the step's validation for good."""
    kill = {"class_path": f"{__name__}.KillAtValidation", "init_args": {"step": 2}}
    with pytest.raises(Killed):
        fit(tmp_path, 4, [kill], *VALIDATION)
    assert rows(tmp_path) == [(0, "train"), (1, "train")]
    uninterrupted = [(0, "train"), (1, "train"), (1, "val"), (2, "train"), (3, "train"), (3, "val")]
    fit(tmp_path, 4, [], *VALIDATION, resume="step=2.ckpt")
    assert rows(tmp_path) == uninterrupted
    # Resumed again from that checkpoint: the step's rows are replaced (its validation once), not doubled.
    fit(tmp_path, 3, [], *VALIDATION, resume="step=2.ckpt")
    assert rows(tmp_path) == uninterrupted[:4]


def wandb_records(run_file: Path) -> list:
    """The records of a wandb run file (LevelDB log format: a 7-byte file header, 32 KiB blocks of records
    with 7-byte headers: checksum, length, type; types 1 and 4 end a record)."""
    from wandb.proto import wandb_internal_pb2

    data, records, part, at = run_file.read_bytes()[7:], [], b"", 0
    while at + 7 <= len(data):
        left = 32768 - at % 32768
        _, length, kind = struct.unpack("<IHB", data[at : at + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (length == 0 and kind == 0):  # block trailer, or zero padding to the block's end
            at += left
            continue
        part, at = part + data[at + 7 : at + 7 + length], at + 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(part)
            records.append(record)
            part = b""
    return records


def history(run_file: Path) -> list[tuple[int, int]]:
    """(wandb ``_step``, ``trainer/global_step``) of each history row of a run file."""
    out = []
    for record in wandb_records(run_file):
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): item.value_json for item in record.history.item}
            out.append((record.history.step.num, json.loads(items["trainer/global_step"])))
    return out


def test_a_resumed_wandb_run_is_rewound_to_its_checkpoint(tmp_path, offline_wandb, monkeypatch):
    """A run resumed in place kept the killed run's wandb points after the checkpoint and logged those steps
    again: twice in one run. ``RunDirectory(rewind_wandb=True)`` records the wandb step in each checkpoint and
    resumes with ``resume_from``. Rewinding is done by W&B's server: wandb stays offline here, with the check
    that keeps offline runs from rewinding lifted, so the run files show what the server would get."""
    import wandb

    for var in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home" / var.lower()))
    monkeypatch.setattr(resume_point, "WANDB_NO_REWIND", ("disabled",))
    online = {"save_dir": str(tmp_path), "project": "mmsr-tests"}  # not offline: WANDB_MODE keeps it so
    loggers = json.dumps([{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path), "name": "csv"}},
                          {"class_path": "lightning.pytorch.loggers.WandbLogger", "init_args": online}])  # fmt: skip
    rewinding = [{"class_path": "mmsr.callbacks.run_dir.RunDirectory", "init_args": {"rewind_wandb": True}}]
    try:
        run_id = fit(tmp_path, 2, rewinding, "--trainer.logger", loggers).trainer.loggers[1].version
    finally:
        wandb.finish()
    # step=2.ckpt is saved at the end of the second step, before its row: wandb holds step 0's row (_step 0).
    state = torch.load(tmp_path / "ckpt" / "step=2.ckpt", weights_only=True)["callbacks"]["RunDirectory"]
    assert state["wandb_steps"] == {run_id: 0}
    try:
        resumed = fit(tmp_path, 3, rewinding, "--trainer.logger", loggers, resume="step=2.ckpt").trainer.loggers[1]
        moment = resumed.experiment.settings.resume_from
    finally:
        wandb.finish()
        wandb.teardown()  # waits for the service to write the run files out (finish may return before)
    assert (resumed.version, moment.run, moment.metric, moment.value) == (run_id, run_id, "_step", 0)
    first, again = sorted(tmp_path.glob("wandb/offline-run-*/run-*.wandb"), key=lambda p: p.parent.name)
    (record,) = [r.run for r in wandb_records(again) if r.WhichOneof("record_type") == "run"]
    assert (record.branch_point.run, record.branch_point.metric, record.branch_point.value) == (run_id, "_step", 0)
    assert history(first) == [(0, 0), (1, 1)]
    # Rewound to _step 0, the run goes on at _step 1: step 1's row (the rewind drops it), then step 2's.
    assert history(again) == [(1, 1), (2, 2)]


def wandb_entry(**init_args) -> Namespace:
    """A ``WandbLogger`` config entry as jsonargparse parses it (``wandb.init``'s arguments among its init_args)."""
    args = {"save_dir": "runs", "version": None, "id": None, "resume": None, "resume_from": None, "offline": False,
            "mode": None}  # fmt: skip
    return Namespace(class_path="lightning.pytorch.loggers.WandbLogger", init_args=Namespace(**(args | init_args)))


def test_a_wandb_run_is_rewound_only_online_and_when_the_config_leaves_resuming_unset(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run_ = {"logger": "WandbLogger", "version": "abc123", "root_dir": None, "rewind_step": 6}
    rewound = wandb_entry()
    repoint_loggers([rewound], [run_])
    assert (rewound.init_args.resume, rewound.init_args.resume_from) == (None, "abc123?_step=6")
    for entry in (wandb_entry(offline=True), wandb_entry(mode="offline")):
        repoint_loggers([entry], [run_])
        assert (entry.init_args.resume, entry.init_args.resume_from) == ("allow", None)
    pinned = wandb_entry(resume="allow")  # the way out where the server refuses to rewind
    repoint_loggers([pinned], [run_])
    assert pinned.init_args.resume_from is None
    unrecorded = wandb_entry()
    repoint_loggers([unrecorded], [run_ | {"rewind_step": None}])
    assert (unrecorded.init_args.resume, unrecorded.init_args.resume_from) == ("allow", None)
    monkeypatch.setenv("WANDB_MODE", "offline")
    offline = wandb_entry()
    repoint_loggers([offline], [run_])
    assert offline.init_args.resume == "allow"


def test_the_final_validation_killed_after_the_last_checkpoint_runs_when_the_run_resumes(tmp_path):
    """The last step's checkpoint is saved before the validation after it too, and a run resumed from it found
    ``max_steps`` reached: Lightning skipped the fit loop (no ``on_train_start``) and the run ended unvalidated."""
    kill = {"class_path": f"{__name__}.KillAtValidation", "init_args": {"step": 4}}
    with pytest.raises(Killed):
        fit(tmp_path, 4, [kill], *VALIDATION)
    killed = [(0, "train"), (1, "train"), (1, "val"), (2, "train"), (3, "train")]
    assert rows(tmp_path) == killed
    fit(tmp_path, 4, [], *VALIDATION, resume="step=4.ckpt")
    assert rows(tmp_path) == [*killed, (3, "val")]
    fit(tmp_path, 4, [], *VALIDATION, resume="step=4.ckpt")  # again: the step's validation once, not twice
    assert rows(tmp_path) == [*killed, (3, "val")]


class KillAtStep(L.Callback):
    """Dies as the training step logged at ``step`` starts."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.fit_loop.epoch_loop._batches_that_stepped == self.step:
            raise Killed(self.step)


def epoch_fit(root: Path, *callbacks: dict, resume: str | None = None):
    """4 steps in epochs of 2, with a ``ModelCheckpoint(every_n_epochs=1)`` (saved at each epoch's end)."""
    args = {"dirpath": str(root / "ckpt"), "every_n_epochs": 1, "save_top_k": -1, "filename": "{step}"}
    checkpoint = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": args}
    resumed = ["--ckpt_path", str(root / "ckpt" / resume)] if resume else []
    return run(root, "--trainer.max_steps", "4", "--trainer.limit_train_batches", "2", "--trainer.enable_checkpointing",
               "true", "--trainer.callbacks", json.dumps([checkpoint, TRAJECTORIES, *callbacks]), *resumed)  # fmt: skip


def test_a_run_resumed_from_an_epoch_end_checkpoint_numbers_its_steps_as_the_uninterrupted_one(tmp_path):
    """Restarted from a checkpoint saved at an epoch's end, Lightning counted the epoch's last step again: the
    resumed run logged steps 2 and 3 as 3 and 4, kept the killed run's step 2, and saved the inflated count."""
    epoch_fit(tmp_path / "whole")
    with pytest.raises(Killed):  # after step 2, whose epoch-end checkpoint is step=2.ckpt
        epoch_fit(tmp_path, {"class_path": f"{__name__}.KillAtStep", "init_args": {"step": 3}})
    epoch_fit(tmp_path, resume="step=2.ckpt")
    assert rows(tmp_path) == rows(tmp_path / "whole") == [(0, "train"), (1, "train"), (2, "train"), (3, "train")]
    records = [r.step for r in read_records(tmp_path / "csv" / "version_0" / "trajectories.jsonl")]
    assert records == [0, 0, 1, 1, 2, 2, 3, 3]
    for step in (2, 4):  # the replayed epoch end saved step=2.ckpt again
        for root in (tmp_path, tmp_path / "whole"):
            loops = torch.load(root / "ckpt" / f"step={step}.ckpt", weights_only=False)["loops"]
            assert loops["fit_loop"]["epoch_loop.state_dict"]["_batches_that_stepped"] == step
