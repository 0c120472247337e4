"""What a checkpoint saved at a training step's end leaves for the run resumed from it to do (``RunDirectory``).

Lightning saves a step's checkpoint (``ModelCheckpoint.on_train_batch_end``) inside the step: its metrics row, the
validation Lightning runs after it and what the loggers get from then on all come after the checkpoint, so a run
killed then and resumed from it would lose the row, skip the validation and (wandb) log its steps a second time
into the same run. Each checkpoint records what it needs to put that right:
- ``unlogged_row``: the step's metrics row, put back if the killed run did not write it;
- ``validation_due``: whether the validation after the step was still to run; ``run_validation`` runs it (after
  the last step, where the resumed fit has no step left to train, from ``before_finished_fit``);
- ``wandb_steps``: the last wandb history step of each online run, to rewind it to (``rewinds``).

A checkpoint saved outside a step (at an epoch's end) records ``next_step``: Lightning counts such a save's step again
on restart, and the resumed run would number every later step one too high (see ``next_step``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import lightning as L
from jsonargparse import Namespace
from lightning.fabric.utilities.apply_func import convert_tensors_to_scalars
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.loops.utilities import _is_max_limit_reached

# wandb modes whose runs are not rewound: offline (whether `wandb sync` rewinds is unchecked), off, several writers
WANDB_NO_REWIND = ("offline", "dryrun", "disabled", "shared")


def inside_step(trainer: L.Trainer) -> bool:
    """Whether the fit is inside a training step's end (where ``ModelCheckpoint`` saves): its batch is processed
    but not yet counted completed (lightning/pytorch/loops/training_epoch_loop.py ``advance``)."""
    progress = trainer.fit_loop.epoch_loop.batch_progress.current
    return trainer.training and progress.processed == progress.completed + 1


def next_step(trainer: L.Trainer) -> int | None:
    """The step the fit logs its next training batch at, for a checkpoint saved after the loop counted the last one
    (``_batches_that_stepped``, at the end of the step's ``on_advance_end``): at an epoch's end; None inside a step or
    the validation after it, which the loop counts later.

    Restarted from such a checkpoint, Lightning replays the epoch's last batch, returns before training it (its
    validation ran) and counts it a second time (lightning/pytorch/loops/training_epoch_loop.py ``advance``,
    ``on_advance_end``): that is right for a save during that validation only, and the resumed run logged step
    S as S + 1, its epoch-end checkpoint saving the inflated count. ``RunDirectory`` puts this one back."""
    if not trainer.training or inside_step(trainer):
        return None
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def unlogged_row(trainer: L.Trainer) -> dict[str, Any] | None:
    """The metrics row Lightning will log for the current training step, while a checkpoint is saved
    between the step's end and that row being written (``{"step": s, "metrics": {...}}``); else None.

    The row is what ``update_train_step_metrics`` would log there: the step's logged metrics plus ``epoch``.
    """
    loop = trainer.fit_loop.epoch_loop
    if not inside_step(trainer):
        return None
    connector = trainer._logger_connector
    if loop._should_accumulate() and trainer.lightning_module.automatic_optimization:
        return None  # no row is logged mid-accumulation
    if not connector.should_update_logs:
        return None
    metrics = convert_tensors_to_scalars(connector.metrics["log"])
    metrics.setdefault("epoch", trainer.current_epoch)
    return {"step": loop._batches_that_stepped, "metrics": metrics}


def validation_due(trainer: L.Trainer) -> bool:
    """Whether Lightning validates after the training step whose end a checkpoint is being saved at (Lightning's
    ``ModelCheckpoint(every_n_train_steps=...)``, in the window of ``unlogged_row``): a run resumed from that
    checkpoint fast-forwards past that validation (lightning/pytorch/loops/training_epoch_loop.py ``advance``).
    The same test as the loop's, at the same point: nothing it reads changes before the loop makes it."""
    return inside_step(trainer) and trainer.fit_loop.epoch_loop._should_check_val_fx(trainer.fit_loop._data_fetcher)


def run_validation(trainer: L.Trainer) -> None:
    """Run the fit's validation loop now, between training batches, as the training epoch loop does after a step
    (``on_advance_end``): its metrics are logged at ``_batches_that_stepped``. The loop is restored from the
    checkpoint as "restarting": it is told to run a whole validation, not to finish one."""
    val_loop = trainer.fit_loop.epoch_loop.val_loop
    val_loop.restarting = False
    first_loop_iter = trainer._logger_connector._first_loop_iter  # the loop keeps it across its validations too
    trainer.validating = True
    val_loop.run()
    trainer.training = True
    trainer._logger_connector._first_loop_iter = first_loop_iter


def before_finished_fit(trainer: L.Trainer, hook: Callable[[], None]) -> None:
    """Call ``hook`` when the fit loop, restored from a checkpoint of the run's last step, finds ``max_steps`` reached:
    it then returns without training and without ``on_train_start`` (lightning/pytorch/loops/fit_loop.py ``run``,
    ``skip``), where a resumed run runs the validation due after its checkpoint's step, so a kill during the final
    validation lost it for good. Call before the fit (``setup``): the loop's state is restored after ``on_fit_start``,
    so ``hook`` runs from the loop's own ``run``, wrapped on this trainer (once: a later call replaces ``hook``)."""
    loop = trainer.fit_loop

    def run_or_hook() -> None:
        if _is_max_limit_reached(loop.epoch_loop.global_step, loop.max_steps):  # the test of ``done`` that ``skip`` makes
            hook()
        type(loop).run(loop)

    loop.run = run_or_hook


def wandb_steps(trainer: L.Trainer) -> dict[str, int]:
    """The last history step (wandb's ``_step``, counting logged rows from 0) of each online wandb run the trainer
    logs to, by run id; runs that logged nothing yet are left out (no step to rewind to). Rank 0 only."""
    steps = {}
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            run = logger.experiment
            if run.settings.mode not in WANDB_NO_REWIND and run.step > 0:  # `step`: that of the next log() call
                steps[run.id] = run.step - 1
    return steps


def rewinds(wandb_args: Namespace) -> bool:
    """Whether a ``WandbLogger`` configured with ``wandb_args`` can rewind its run: the installed wandb takes
    ``resume_from`` (0.17.1 on), the config sets none, and the run is online (offline, the run file would be
    numbered from the rewind on, but whether ``wandb sync`` rewinds the server's run could not be checked)."""
    if "resume_from" not in wandb_args or wandb_args.get("resume_from") is not None:
        return False
    modes = (wandb_args.get("mode"), os.environ.get("WANDB_MODE"))
    return not wandb_args.get("offline") and not any(mode in WANDB_NO_REWIND for mode in modes)
