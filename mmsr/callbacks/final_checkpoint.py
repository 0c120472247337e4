"""``last.ckpt`` holds a run's last step, also when the checkpoint interval does not divide ``max_steps``.

Lightning's ``ModelCheckpoint(save_last=True)`` writes ``last.ckpt`` with each interval's checkpoint, and at the end
of training only when it never saved one (lightning/pytorch/callbacks/model_checkpoint.py ``on_train_end``): a run of
100 steps checkpointing every 40 ended with ``last.ckpt`` at step 80, and steps 81-100 were saved nowhere.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class FinalCheckpoint(L.Callback):
    """At the end of training, saves ``last`` of each ``ModelCheckpoint`` with ``save_last`` whose last save was
    at an earlier step (none at all: Lightning's own ``on_train_end`` saves it). ``save_last: link`` first saves
    the step's checkpoint, as an interval's save does: the link needs a file of that step to point to.
    ``mmsr``'s LightningCLI adds it to every trainer with a ``ModelCheckpoint`` (``cli_checks.add_final_checkpoint``):
    its ``on_save_checkpoint`` mends their saves at the end of a cut epoch too."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A run resumed from an interval's checkpoint (saved before ``last.ckpt``, so it records no last file)
        restores no ``last_model_path``: Lightning then found ``last.ckpt`` taken and wrote this run's last step to
        ``last-v1.ckpt``, leaving ``last.ckpt`` at the old step (``mmsr eval --ckpt last.ckpt`` evaluated it). The
        resumed run continues the ``last.ckpt`` beside that checkpoint; one of another folder is not this run's."""
        if trainer.ckpt_path is None:
            return
        resumed_from = Path(trainer.ckpt_path).resolve().parent
        for checkpoint in trainer.checkpoint_callbacks:
            if not (isinstance(checkpoint, ModelCheckpoint) and checkpoint.save_last and checkpoint.dirpath):
                continue
            last = Path(checkpoint.dirpath) / f"{checkpoint.CHECKPOINT_NAME_LAST}{checkpoint.FILE_EXTENSION}"
            named = "{" not in checkpoint.CHECKPOINT_NAME_LAST  # a template's name depends on the step's metrics
            if not checkpoint.last_model_path and named and last.resolve().parent == resumed_from and last.exists():
                checkpoint.last_model_path = str(last)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        with epoch_in_progress(trainer):
            self._save_last(trainer)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        """A save at the end of an epoch ``max_steps`` or a stop cut short (``ModelCheckpoint``'s default interval,
        ``on_train_epoch_end``) records the epoch as still running: Lightning counts it processed before that hook,
        and a run resumed from it began the next epoch (under ``max_epochs``, the cut epoch's rest never trained)."""
        progress = trainer.fit_loop.epoch_progress.current
        if cut_short(trainer) and progress.processed > progress.completed and "loops" in checkpoint:
            saved = checkpoint["loops"]["fit_loop"]["epoch_progress"]
            for part in ("current", "total"):
                saved[part]["processed"] -= 1

    @staticmethod
    def _save_last(trainer: L.Trainer) -> None:
        for checkpoint in trainer.checkpoint_callbacks:
            if not isinstance(checkpoint, ModelCheckpoint) or not checkpoint.save_last:
                continue
            # the callback's own test: not in fast_dev_run, only while fitting, not saved at this step yet
            if checkpoint._should_skip_saving_checkpoint(trainer):
                continue
            metrics = checkpoint._monitor_candidates(trainer)
            if checkpoint.save_last == "link":
                checkpoint._save_topk_checkpoint(trainer, metrics)
            checkpoint._save_last_checkpoint(trainer, metrics)


def checkpoints(trainer: L.Trainer) -> bool:
    """Whether the trainer has a ``ModelCheckpoint`` (``FinalCheckpoint``'s work: its ``last``, and any save at the
    end of a cut epoch)."""
    return any(isinstance(c, ModelCheckpoint) for c in trainer.checkpoint_callbacks)


@contextmanager
def epoch_in_progress(trainer: L.Trainer) -> Iterator[None]:
    """While the run's last checkpoint is saved: an epoch that ``max_steps``, ``max_time`` or a stop cut short
    counted as still running, as an interval's save inside it records it. Lightning's fit loop counts the epoch
    done before ``on_train_end``, so a run resumed from that ``last.ckpt`` began the next epoch: under
    ``max_epochs`` it trained the cut epoch's remaining steps nowhere (and epoch-based triggers fired an epoch late)."""
    progress = trainer.fit_loop.epoch_progress
    cut = cut_short(trainer) and progress.current.completed > 0
    if cut:
        for counts in (progress.current, progress.total):
            counts.completed -= 1
            counts.processed -= 1
    try:
        yield
    finally:
        if cut:
            for counts in (progress.current, progress.total):
                counts.completed += 1
                counts.processed += 1


def cut_short(trainer: L.Trainer) -> bool:
    """Whether the fit's current epoch ended, or ends, before its last batch (``max_steps``, ``max_time``, a stop)."""
    return not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
