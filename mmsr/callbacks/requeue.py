"""SLURM's requeue signal acted on at the end of a step, not wherever it lands.

Under SLURM Lightning keeps auto-requeue on: on the requeue signal (``sbatch --signal=USR1@N``) its handler
saves ``hpc_ckpt_N.ckpt`` in ``default_root_dir`` at once, then rank 0 runs ``scontrol requeue``, and the
requeued job resumes from that file (lightning/pytorch/trainer/connectors/signal_connector.py). In
``GRPOModule`` one training batch is one GRPO step: a rollout, then ``mini_batches`` optimizer updates. A
checkpoint from the middle of a step holds some of its updates but counts the batch as not done, so the
resumed run skipped that step's prompts, shifted every later step and trained one step more.

``StepBoundaryRequeue`` (added to every trainer by ``mmsr.cli``) swaps Lightning's handler for one that only
notes the signal; at the end of the step the signal came in, the ranks agree (any rank got it, SLURM signals
each task) and every rank runs Lightning's own handler there: the same save and requeue, at a step boundary.
A signal that lands after a step's end (in its validation or checkpoint save) waits for the end of the next step,
so ``--signal=USR1@N`` needs N above two steps with their validation and saves. A run that trains to its end
deletes its hpc checkpoints (``on_train_end``).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import threading
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol

from mmsr.checkpoint import remove_torn_saves

HPC_CHECKPOINT = re.compile(r"hpc_ckpt_(\d+)\.ckpt")  # what Lightning's requeue saves (a file, or a distributed folder)


def hpc_checkpoints(root: str | os.PathLike) -> dict[int, Path]:
    """The hpc checkpoints in folder ``root`` by their number (none where it is no folder)."""
    if not os.path.isdir(root):
        return {}
    return {int(m[1]): Path(root, name) for name in os.listdir(root) if (m := HPC_CHECKPOINT.fullmatch(name))}


def hpc_resume_path(trainer_config: Any) -> str | None:
    """The ``hpc_ckpt_N.ckpt`` (highest N) a ``fit`` without ``--ckpt_path`` resumes from under SLURM, as Lightning
    picks it (``_CheckpointConnector._hpc_resume_path``: in ``default_root_dir``, else the working directory), so
    that a requeued job continues its run directory as ``--ckpt_path`` does; None elsewhere or if there is none.
    ``trainer_config``: the parsed ``trainer:`` section."""
    root = trainer_config.get("default_root_dir") or os.getcwd()
    if not SLURMEnvironment.detect() or not _is_local_file_protocol(root):
        return None
    # a killed save's temporary (``.hpc_ckpt_2.ckpt.a1b2c3d4.tmp``): Lightning's pick reads every digit of each name
    # holding ``hpc_ckpt_`` and would name ``hpc_ckpt_21234.ckpt``, which does not exist. The save that would
    # delete it comes after the resume.
    remove_torn_saves(root, "hpc_ckpt_*")
    found = hpc_checkpoints(root)
    return str(found[max(found)]) if found else None


class StepBoundaryRequeue(L.Callback):
    """Defers Lightning's SLURM auto-requeue (save ``hpc_ckpt_N.ckpt``, ``scontrol requeue``) to the end of the
    training batch (the GRPO step) the requeue signal arrives in. Outside SLURM, with ``auto_requeue`` off, or
    with a handler of the user's on the signal (Lightning then sets none), it does nothing."""

    def __init__(self) -> None:
        self.signum: int | None = None  # the requeue signal, while this callback's handler is installed
        self.replaced: Any = None  # Lightning's handler, put back at the end of training
        self.received = False  # the signal came since the last step's end
        self.requeued = False  # this run saved an hpc checkpoint and asked SLURM to requeue it

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        env = trainer._accelerator_connector.cluster_environment
        if not (isinstance(env, SLURMEnvironment) and env.auto_requeue and hasattr(signal, "SIGUSR1")):
            return
        signum, handler = env.requeue_signal, signal.getsignal(env.requeue_signal)
        if threading.current_thread() is not threading.main_thread() or not _lightning_requeue(trainer, handler):
            return  # Lightning registers signal handlers in the main thread only
        self.signum, self.replaced, self.received = signum, handler, False
        signal.signal(signum, self.note)

    def note(self, signum: int, frame: Any) -> None:
        """The signal handler: only remembers that the signal came (the step goes on)."""
        self.received = True

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        if self.signum is None:
            return  # not under SLURM auto-requeue: no collective per step
        # on every rank: the save is collective, and SLURM may signal only some ranks before the step ends
        if trainer.strategy.reduce_boolean_decision(self.received, all=False):
            self.received, self.requeued = False, True
            trainer._signal_connector._slurm_sigusr_handler_fn(self.signum, None)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The run trained to its end: its hpc checkpoints go, or the next run of this ``default_root_dir`` (another
        seed, another lr) would be resumed from them by Lightning and continue this run's directory. Not when the
        last step's end saved one and requeued the job: the requeued job resumes from it (and finds nothing to do)."""
        if self.signum is not None and trainer.is_global_zero and not self.requeued:
            for path in hpc_checkpoints(trainer.default_root_dir).values():
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        self.restore()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.restore()  # after an exception: Lightning has put back the handlers it found, so ours is gone

    def restore(self) -> None:
        """Put Lightning's handler back if this callback's is still the one installed."""
        if self.signum is not None and signal.getsignal(self.signum) == self.note:
            signal.signal(self.signum, self.replaced)
        self.signum, self.replaced = None, None


def _lightning_requeue(trainer: L.Trainer, handler: Any) -> bool:
    """Whether ``handler`` is the one Lightning registered for the requeue signal (its ``_HandlersCompose``
    holding this trainer's ``_slurm_sigusr_handler_fn``), not one of the user's."""
    own = trainer._signal_connector._slurm_sigusr_handler_fn
    return any(h == own for h in getattr(handler, "signal_handlers", ()))
