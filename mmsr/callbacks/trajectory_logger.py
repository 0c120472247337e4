"""Keeps sampled trajectories of a run: JSON lines in the run directory, and a per-turn wandb table.

Researchers debug RL runs by reading rollouts, so every ``every_n_steps`` training steps (at the steps
Lightning logs scalars at, see ``logs_scalars``) the callback takes the step's first ``max_trajectories``
trajectories (rollout order, so whole GRPO groups come first and their answers can be compared) from
``GRPOModule.last_rollout`` and
- appends them as ``TrajectoryRecord`` lines to ``<run dir>/trajectories.jsonl`` (``trainer.log_dir``:
  next to the resolved ``config.yaml`` and the CSV logger's ``metrics.csv``; under a first ``WandbLogger``,
  ``<save_dir>/<project>/<run id>``, and then again in each later ``CSVLogger``'s directory, see ``run_dirs``);
- when a ``WandbLogger`` is attached, logs a ``wandb.Table`` with one row per turn.
wandb is imported only in that case, so CSV / TensorBoard runs work without it.

On several ranks the trajectories are rank 0's (the first of its share of the step's prompts): the other
ranks' are not gathered, which would send every rank's thumbnails through a collective at each logged step.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

from mmsr.report.records import TRAJECTORIES_FILE, TrajectoryRecord, trajectory_record
from mmsr.tools.secrets import redact_all

if TYPE_CHECKING:
    from mmsr.train.step import StepRollout


class TrajectoryLogger(L.Callback):
    """Dumps sampled trajectories every ``every_n_steps`` training steps (rank 0's on several ranks).

    Args:
        every_n_steps: log on training steps N-1, 2N-1, ... (steps, not optimizer updates), counted as Lightning
            counts ``log_every_n_steps`` (``logs_scalars``), and on step 0 where Lightning logs its scalars
            (``log_every_n_steps: 1``): the untrained policy, the baseline, which a run shorter than N steps has. Steps
            are numbered as their scalars are in ``metrics.csv`` and wandb (``logged_step``; a resumed run numbers on
            from its checkpoint). A multiple of ``log_every_n_steps`` puts every table at a step with its scalars.
        max_trajectories: trajectories kept per logged step, in rollout order.
        thumbnail_px: longest side of the stored image thumbnails.
        filename: JSONL file name inside the run directory.
        wandb_key: key of the per-turn table when a ``WandbLogger`` is attached.
    """

    def __init__(
        self,
        every_n_steps: int = 1,
        max_trajectories: int = 8,
        thumbnail_px: int = 128,
        filename: str = TRAJECTORIES_FILE,
        wandb_key: str = "rollout/trajectories",
    ) -> None:
        if every_n_steps < 1 or max_trajectories < 1:
            raise ValueError("TrajectoryLogger: every_n_steps and max_trajectories must be >= 1")
        self.every_n_steps, self.max_trajectories = every_n_steps, max_trajectories
        self.thumbnail_px, self.filename, self.wandb_key = thumbnail_px, filename, wandb_key
        self.resuming = False  # a fit restored from a checkpoint: the file is cut back on its first step
        self.unlogged: int | None = None  # the last step, when it was not due (logged if the run then stops there)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # Called with or without a state of this callback in the checkpoint (one added at resume has none).
        self.resuming = trainer.state.fn == "fit"

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        # A resumed run logs its first step and later ones again: drop the killed run's records of them (the
        # rule of mmsr/callbacks/run_dir.py for metrics.csv). The step is read here, after the loop restored it.
        if self.resuming and trainer.is_global_zero:
            for directory in run_dirs(trainer):  # each copy of the file
                drop_records_from(directory / self.filename, logged_step(trainer))
        self.resuming = False

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        step = logged_step(trainer)
        rollout = getattr(pl_module, "last_rollout", None)
        self.unlogged = None
        if rollout is None or not trainer.is_global_zero:
            return
        if self.due(trainer, step):
            return self.write(trainer, rollout, step)
        self.unlogged = step

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A callback after this one stopped the run in the same hook (Lightning's Timer, ``max_time``, is appended
        # last): Lightning logged that step's scalars, ``due`` could not yet see the stop.
        if self.unlogged is not None and trainer.should_stop and trainer.is_global_zero:
            self.write(trainer, pl_module.last_rollout, self.unlogged)
        self.unlogged = None

    def write(self, trainer: L.Trainer, rollout: StepRollout, step: int) -> None:
        """Write step ``step``'s records to every run directory and, with wandb, its table (rank 0)."""
        records = redact_all(self.records(rollout, step, trainer.global_step))  # no API key in files or tables
        for directory in run_dirs(trainer):
            directory.mkdir(parents=True, exist_ok=True)
            with (directory / self.filename).open("a", encoding="utf-8") as f:
                f.writelines(r.to_json() + "\n" for r in records)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                from mmsr.callbacks.wandb_table import COLUMNS, turn_rows

                logger.log_table(self.wandb_key, columns=COLUMNS, data=turn_rows(records), step=step)

    def due(self, trainer: L.Trainer, step: int) -> bool:
        """Whether training step ``step``'s trajectories are logged: on the steps Lightning would log scalars at
        every ``every_n_steps``, and on step 0 if Lightning logs its scalars there. Steps 0, N, 2N put each table one
        step off its reward and accuracy under ``log_every_n_steps: N``: wandb never showed them side by side."""
        if logs_scalars(trainer, step, self.every_n_steps):
            return True
        return step == 0 and logs_scalars(trainer, step, trainer.log_every_n_steps)

    def records(self, rollout: StepRollout, step: int, global_step: int) -> list[TrajectoryRecord]:
        """The records of the step's first ``max_trajectories`` trajectories."""
        return [
            trajectory_record(
                t, rollout.samples[t.group_id], step=step, global_step=global_step, index=i,
                reward=float(rollout.rewards[i]), advantage=float(rollout.advantages[i]),
                reward_terms=rollout.details[i] if i < len(rollout.details) else {}, max_px=self.thumbnail_px,
            )
            for i, t in enumerate(rollout.trajectories[: self.max_trajectories])
        ]


def run_dirs(trainer: L.Trainer) -> list[Path]:
    """Where the run's files go: the first logger's directory, then each later ``CSVLogger``'s (with a first
    ``WandbLogger`` the ``metrics.csv`` is only there, and ``mmsr report`` of it needs the other files beside it).
    Read without ``trainer.log_dir``: that one broadcasts, and only rank 0 gets here (a collective on one rank hangs
    DDP / FSDP runs). No logger, or one without a directory (fast_dev_run's DummyLogger): the run's root directory."""
    return list(dict.fromkeys([first_logger_dir(trainer), *later_csv_dirs(trainer)]))  # in order, each once


def later_csv_dirs(trainer: L.Trainer) -> list[Path]:
    """The directories of the ``CSVLogger``s after the first logger."""
    return [Path(logger.log_dir) for logger in trainer.loggers[1:] if isinstance(logger, CSVLogger)]


def first_logger_dir(trainer: L.Trainer) -> Path:
    """The first logger's directory (a ``WandbLogger``'s: its run's folder, ``wandb_run_dir``)."""
    logger = trainer.loggers[0] if trainer.loggers else None
    if isinstance(logger, WandbLogger):
        return wandb_run_dir(logger)
    directory = logger and (logger.log_dir if isinstance(logger, CSVLogger | TensorBoardLogger) else logger.save_dir)
    return Path(directory or trainer.default_root_dir)


def logs_scalars(trainer: L.Trainer, step: int, every_n_steps: int) -> bool:
    """Whether Lightning logs training step ``step``'s scalars under ``log_every_n_steps: every_n_steps`` (its logger
    connector's ``should_update_logs``, checked after the step's ``on_train_batch_end`` with the step not yet counted,
    and ``update_train_step_metrics``): steps N-1, 2N-1, ..., the step a run is stopped at (``trainer.should_stop``:
    early stopping; reaching ``max_steps`` does not set it) and every step of a ``fast_dev_run``; none with 0."""
    on_phase = every_n_steps > 0 and ((step + 1) % every_n_steps == 0 or trainer.should_stop)
    return on_phase or bool(trainer.fast_dev_run)


def wandb_run_dir(logger: WandbLogger) -> Path:
    """``<save_dir>/<project>/<run id>``, the folder Lightning's ``ModelCheckpoint`` saves a wandb run's checkpoints
    under: the run's own. ``save_dir`` is every run's there (each appended to one file, and a resume dropped the other
    runs' records of its steps); a resumed run keeps its id, so its folder. Creates the run if not yet (rank 0)."""
    run = logger.experiment
    return Path(logger.save_dir or ".", logger.name or "", run.id)


def logged_step(trainer: L.Trainer) -> int:
    """The step Lightning logs the current training step's scalars at (its logger connector): the batches that
    stepped before it. ``global_step`` counts optimizer updates, already past this step's, several a step with
    ``mini_batches`` > 1. The callback keeps no count of its own: a count restarted at 0 when the callback was added
    at resume (a checkpoint's ``{"steps": n}`` state, from before, is ignored by ``Callback.load_state_dict``)."""
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def drop_records_from(path: Path, step: int) -> None:
    """Remove the records of training step ``step`` and later from a JSONL file (atomically), and a
    line torn by a kill mid-write (it would glue onto the next record appended)."""
    if not path.is_file():
        return
    lines = [line for line in path.read_bytes().split(b"\n") if line.strip()]  # records hold no raw "\n"
    kept = [line for line in lines if (s := _step_of(line)) is not None and s < step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(b"".join(line + b"\n" for line in kept))
    os.replace(tmp, path)


def _step_of(line: bytes) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None

