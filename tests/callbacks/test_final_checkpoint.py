"""``last.ckpt`` holds a run's last step when the checkpoint interval does not divide ``max_steps`` (Lightning kept
the last interval's: a 100-step recipe saving every 40 steps ended with ``last.ckpt`` at step 80)."""

import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel

from mmsr.callbacks.final_checkpoint import FinalCheckpoint
from tests.conftest import subprocess_env

ROOT = Path(__file__).resolve().parents[2]


class SavedSteps(L.Callback):
    """The step of every checkpoint saved, in order."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self.steps.append(trainer.global_step)


def fit(tmp_path: Path, max_steps: int, **checkpoint) -> list[int]:
    """A tiny fit of ``max_steps`` with ``ModelCheckpoint(every_n_train_steps=2, **checkpoint)``: the saves' steps."""
    saved = SavedSteps()
    callbacks = [ModelCheckpoint(tmp_path, every_n_train_steps=2, **checkpoint), FinalCheckpoint(), saved]
    trainer = L.Trainer(max_steps=max_steps, callbacks=callbacks, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, accelerator="cpu")  # fmt: skip
    trainer.fit(BoringModel())
    return saved.steps


def step_of(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=False)["global_step"]


def test_the_last_step_is_saved_in_last_ckpt(tmp_path):
    assert fit(tmp_path, 3, save_last=True) == [2, 2, 3]  # step 2: its checkpoint and last; step 3: last
    assert step_of(tmp_path / "last.ckpt") == 3
    assert step_of(tmp_path / "epoch=0-step=2.ckpt") == 2  # the interval's checkpoint stays as it was


def test_an_interval_that_divides_max_steps_saves_nothing_more(tmp_path):
    assert fit(tmp_path, 4, save_last=True) == [2, 2, 4, 4]
    assert step_of(tmp_path / "last.ckpt") == 4


def test_a_linked_last_points_to_the_last_steps_checkpoint(tmp_path):
    assert fit(tmp_path, 3, save_last="link") == [2, 3]  # each interval's file, last.ckpt a link to it
    last = tmp_path / "last.ckpt"
    assert last.is_symlink() and last.resolve().name == "epoch=0-step=3.ckpt" and step_of(last) == 3


@pytest.mark.parametrize(("interval", "resume"), [({"every_n_train_steps": 2, "save_last": True}, "last.ckpt"),
                                                  ({"save_last": True}, "last.ckpt"), ({}, "epoch=0-step=3.ckpt")],
                         ids=["steps", "epoch_end", "epoch_end_without_last"])  # fmt: skip
def test_a_run_resumed_from_a_cut_epochs_last_ckpt_trains_that_epochs_rest(tmp_path, interval, resume):
    """Lightning counts the epoch ``max_steps`` cut short done before ``on_train_end`` (processed before the
    ``on_train_epoch_end`` save, the default interval's): saved so, the resumed run began the next epoch, and under
    ``max_epochs`` 2 epochs of 4 batches it trained 7 steps, not 8."""
    def trainer(max_steps: int) -> L.Trainer:
        callbacks = [ModelCheckpoint(tmp_path, **interval), FinalCheckpoint()]
        return L.Trainer(max_epochs=2, max_steps=max_steps, limit_train_batches=4, callbacks=callbacks, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, accelerator="cpu")  # fmt: skip

    trainer(3).fit(BoringModel())
    saved = torch.load(tmp_path / resume, map_location="cpu", weights_only=False)
    assert (saved["global_step"], saved["epoch"]) == (3, 0)
    resumed = trainer(-1)
    resumed.fit(BoringModel(), ckpt_path=tmp_path / resume)
    assert (resumed.global_step, resumed.current_epoch) == (8, 2)


def test_without_save_last_nothing_more_is_saved(tmp_path):
    assert fit(tmp_path, 3) == [2]
    assert not (tmp_path / "last.ckpt").exists()


@pytest.mark.slow
def test_mmsr_fit_saves_its_last_step_in_last_ckpt(tmp_path):
    """A real ``mmsr fit`` of the smoke config (checkpoint every 2 steps, ``save_last``) for 3 steps: ``mmsr fit``
    adds ``FinalCheckpoint`` itself, the config names none."""
    cmd = [sys.executable, "-m", "mmsr", "fit", "-c", "configs/smoke.yaml", "--trainer.max_steps", "3",
           "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (checkpoints,) = tmp_path.glob("csv/version_*/checkpoints")
    assert step_of(checkpoints / "last.ckpt") == 3
    assert step_of(checkpoints / "epoch=0-step=2.ckpt") == 2


def test_mmsr_fit_adds_it_beside_any_model_checkpoint():
    """Its ``on_save_checkpoint`` mends a cut epoch's save of a ``ModelCheckpoint`` without ``save_last`` too."""
    from mmsr.cli_checks import add_final_checkpoint

    for checkpointing, added in ((ModelCheckpoint(), True), (ModelCheckpoint(save_last=True), True), (None, False)):
        trainer = L.Trainer(callbacks=[checkpointing] if checkpointing else [], enable_checkpointing=bool(checkpointing),
                            logger=False, accelerator="cpu")  # fmt: skip
        add_final_checkpoint(trainer)
        assert any(isinstance(c, FinalCheckpoint) for c in trainer.callbacks) == added


def test_a_run_resumed_from_an_earlier_interval_checkpoint_keeps_saving_its_last_step_in_last_ckpt(tmp_path):
    """The interval's checkpoint is saved before ``last.ckpt``, so it records no last file: resumed from it,
    Lightning found ``last.ckpt`` taken and wrote the run's last step to ``last-v1.ckpt``, ``last.ckpt`` left at
    the old step."""
    fit(tmp_path, 4, save_last=True, save_top_k=-1)
    saved = SavedSteps()
    callbacks = [ModelCheckpoint(tmp_path, every_n_train_steps=2, save_last=True, save_top_k=-1), FinalCheckpoint(), saved]
    trainer = L.Trainer(max_steps=7, callbacks=callbacks, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, accelerator="cpu")  # fmt: skip
    trainer.fit(BoringModel(), ckpt_path=tmp_path / "epoch=0-step=2.ckpt")
    assert saved.steps == [4, 4, 6, 6, 7] and step_of(tmp_path / "last.ckpt") == 7
    assert not list(tmp_path.glob("last-v*.ckpt"))


def test_a_run_resumed_from_another_folders_checkpoint_leaves_this_folders_last_ckpt_alone(tmp_path):
    """Another run's ``last.ckpt`` in the folder a resumed run saves to is not the resumed run's: Lightning's
    ``last-v1.ckpt`` takes its last step, as without ``FinalCheckpoint``."""
    fit(tmp_path / "a", 4, save_last=True, save_top_k=-1)
    fit(tmp_path / "b", 3, save_last=True)  # another run's last.ckpt at step 3
    callbacks = [ModelCheckpoint(tmp_path / "b", every_n_train_steps=2, save_last=True), FinalCheckpoint()]
    trainer = L.Trainer(max_steps=5, callbacks=callbacks, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, accelerator="cpu")  # fmt: skip
    trainer.fit(BoringModel(), ckpt_path=tmp_path / "a" / "epoch=0-step=2.ckpt")
    assert step_of(tmp_path / "b" / "last.ckpt") == 3 and step_of(tmp_path / "b" / "last-v1.ckpt") == 5
