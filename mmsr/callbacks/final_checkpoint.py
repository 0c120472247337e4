"""``last.ckpt`` holds a run's last step, also when the checkpoint interval does not divide ``max_steps``.

Lightning's ``ModelCheckpoint(save_last=True)`` writes ``last.ckpt`` with each interval's checkpoint, and at the end
of training only when it never saved one (lightning/pytorch/callbacks/model_checkpoint.py ``on_train_end``): a run of
100 steps checkpointing every 40 ended with ``last.ckpt`` at step 80, and steps 81-100 were saved nowhere.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class FinalCheckpoint(L.Callback):
    """At the end of training, saves ``last`` of each ``ModelCheckpoint`` with ``save_last`` whose last save was
    at an earlier step (none at all: Lightning's own ``on_train_end`` saves it). ``save_last: link`` first saves
    the step's checkpoint, as an interval's save does: the link needs a file of that step to point to.
    ``mmsr``'s LightningCLI adds it to every trainer with such a checkpoint callback (``cli_checks.add_final_checkpoint``)."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
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


def saves_last(trainer: L.Trainer) -> bool:
    """Whether one of the trainer's checkpoint callbacks keeps a ``last`` checkpoint (``FinalCheckpoint``'s work)."""
    return any(isinstance(c, ModelCheckpoint) and c.save_last for c in trainer.checkpoint_callbacks)
