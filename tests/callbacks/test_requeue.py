"""SLURM's requeue signal mid-step (``mmsr.callbacks.requeue``): the hpc checkpoint is saved at the end of the step,
and the requeued job (the same command, no ``--ckpt_path``) ends where an uninterrupted run does, in its run directory.

SLURM is emulated: its environment variables (Lightning then picks ``SLURMEnvironment``, auto-requeue on) and an
``scontrol`` on ``PATH`` that records its call and kills the job, as ``scontrol requeue`` does."""

import builtins
import csv
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import yaml
from lightning.fabric.plugins.environments import LightningEnvironment, SLURMEnvironment
from lightning.pytorch.trainer.connectors.signal_connector import _HandlersCompose

from mmsr.callbacks.requeue import StepBoundaryRequeue
from tests.conftest import ROOT, subprocess_env

MINI_BATCHES, STEPS = 2, 3  # optimizer updates per GRPO step, GRPO steps
SLURM = dict(SLURM_NTASKS="1", SLURM_NTASKS_PER_NODE="1", SLURM_JOB_NAME="train", SLURM_JOB_ID="123",
             SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0", SLURM_NODELIST="localhost")  # fmt: skip
# what differs between two identical runs: wall-clock times, throughput, memory, overlap
TIMING = re.compile(r"^timing/|seconds$|_per_s$|latency_s$|^memory/|^sync/|overlap")


class SignalMidStep(L.Callback):
    """Sends this process the requeue signal just before optimizer update ``update`` (``global_step == update``),
    when ``SIGNAL_MID_STEP`` is set: the update of a step that is not its first."""

    def __init__(self, update: int) -> None:
        self.update, self.sent = update, False

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not self.sent and trainer.global_step == self.update and os.environ.get("SIGNAL_MID_STEP"):
            self.sent = True
            os.kill(os.getpid(), signal.SIGUSR1)


def config(root: Path) -> Path:
    """The scripted run (tests/callbacks/scripted_run.yaml), ``STEPS`` steps of ``MINI_BATCHES`` updates, its CSV
    run directory and default_root_dir (where the hpc checkpoint goes) under ``root``, ``last.ckpt`` in root/ckpt."""
    cfg = yaml.safe_load((ROOT / "tests/callbacks/scripted_run.yaml").read_text())
    last = {"dirpath": str(root / "ckpt"), "save_top_k": 0, "save_last": True}
    cfg["trainer"].update(default_root_dir=str(root), max_steps=STEPS * MINI_BATCHES, enable_checkpointing=True)
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(root)
    cfg["trainer"]["callbacks"] += [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": last},
        {"class_path": f"{__name__}.SignalMidStep", "init_args": {"update": MINI_BATCHES + 1}},
    ]  # fmt: skip
    cfg["model"]["init_args"]["mini_batches"] = MINI_BATCHES
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.yaml").write_text(yaml.safe_dump(cfg))
    return root / "config.yaml"


def fake_scontrol(tmp: Path) -> dict[str, str]:
    """A ``bin/scontrol`` appending its arguments to ``scontrol.log`` and SIGKILLing its caller (the requeued job
    ends); returns the SLURM environment with it first on ``PATH``."""
    (tmp / "bin").mkdir()
    script = tmp / "bin" / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> {tmp / "scontrol.log"}\nkill -KILL $PPID\n')
    script.chmod(0o755)
    return dict(SLURM, PATH=f"{tmp / 'bin'}{os.pathsep}{os.environ['PATH']}")


def fit(cfg: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mmsr", "fit", "-c", str(cfg)]
    return subprocess.run(cmd, cwd=ROOT, env=subprocess_env(**env), capture_output=True, text=True)


def learning_rows(root: Path) -> list[dict[str, str]]:
    """The run directory's one ``metrics.csv`` (a resume continues its version), without the timing columns."""
    (version,) = (root / "csv").iterdir()
    with (version / "metrics.csv").open(newline="") as f:
        return [{k: v for k, v in row.items() if not TIMING.search(k)} for row in csv.DictReader(f)]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


@pytest.mark.slow
def test_a_requeue_signal_mid_step_saves_and_resumes_at_the_step_boundary(tmp_path):
    """Lightning's handler saved the hpc checkpoint where the signal landed (global_step 3 of a 2-update step), and
    the requeued job skipped the rest of that step's prompts, shifted every later step and trained a step more."""
    env = fake_scontrol(tmp_path)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    ran = fit(config(whole), env)
    assert ran.returncode == 0, ran.stderr[-3000:]
    killed = fit(config(cut), env | {"SIGNAL_MID_STEP": "1"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert (tmp_path / "scontrol.log").read_text() == "requeue 123\n"
    hpc = torch.load(cut / "hpc_ckpt_1.ckpt", map_location="cpu", weights_only=False)
    assert hpc["global_step"] == 2 * MINI_BATCHES  # the end of the step the signal came in, not update 3
    # a torn temporary of a later save killed mid-write: Lightning's own pick reads its digits (hpc_ckpt_21234.ckpt)
    (cut / ".hpc_ckpt_2.ckpt.a1b2c3d4.tmp").write_bytes(b"torn")
    requeued = fit(cut / "config.yaml", env)  # the same command: it resumes from hpc_ckpt_1.ckpt
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    assert learning_rows(cut) == learning_rows(whole)
    assert not (cut / "hpc_ckpt_1.ckpt").exists()  # the run ended: a next run of this root must not resume from it
    a, b = weights(whole / "ckpt" / "last.ckpt"), weights(cut / "ckpt" / "last.ckpt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def fake_trainer(environment, others: tuple[bool, ...] = ()) -> SimpleNamespace:
    """What the callback reads of a trainer: its cluster environment, signal connector and strategy (which records
    each collective it is asked for). ``others``: the flags the other ranks bring to ``reduce_boolean_decision``
    (none: one process, where any and all agree)."""
    calls = []

    def reduce_boolean_decision(flag: bool, all: bool) -> bool:
        calls.append(flag)
        return (builtins.all if all else any)([flag, *others])

    strategy = SimpleNamespace(reduce_boolean_decision=reduce_boolean_decision, calls=calls)
    saves = []
    connector = SimpleNamespace(_slurm_sigusr_handler_fn=lambda signum, frame: saves.append(signum), saves=saves)
    return SimpleNamespace(_accelerator_connector=SimpleNamespace(cluster_environment=environment),
                           _signal_connector=connector, strategy=strategy)  # fmt: skip


@pytest.mark.parametrize("environment", [LightningEnvironment(), SLURMEnvironment(auto_requeue=False)])
def test_outside_slurm_auto_requeue_it_registers_nothing_and_adds_no_collective(environment):
    trainer, before = fake_trainer(environment), signal.getsignal(signal.SIGUSR1)
    callback = StepBoundaryRequeue()
    callback.on_train_start(trainer, None)
    assert signal.getsignal(signal.SIGUSR1) is before
    callback.on_train_batch_end(trainer, None, None, None, 0)
    assert trainer.strategy.calls == []


def test_under_slurm_the_signal_is_acted_on_at_the_step_end_and_lightnings_handler_put_back(tmp_path):
    trainer, before = fake_trainer(SLURMEnvironment()), signal.getsignal(signal.SIGUSR1)
    lightning = _HandlersCompose([trainer._signal_connector._slurm_sigusr_handler_fn])
    signal.signal(signal.SIGUSR1, lightning)
    try:
        callback = StepBoundaryRequeue()
        callback.on_train_start(trainer, None)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert trainer._signal_connector.saves == []  # noted, not acted on mid-step
        callback.on_train_batch_end(trainer, None, None, None, 0)
        callback.on_train_batch_end(trainer, None, None, None, 1)
        assert trainer._signal_connector.saves == [signal.SIGUSR1]  # once, at the end of the step it came in
        assert trainer.strategy.calls == [True, False]
        (tmp_path / "hpc_ckpt_1.ckpt").write_text("the save at the last step's end")
        trainer.is_global_zero, trainer.default_root_dir = True, str(tmp_path)
        callback.on_train_end(trainer, None)
        assert signal.getsignal(signal.SIGUSR1) is lightning
        assert (tmp_path / "hpc_ckpt_1.ckpt").exists()  # requeued from it: the requeued job resumes from it
    finally:
        signal.signal(signal.SIGUSR1, before)


def test_a_signal_only_another_rank_got_requeues_this_rank_too():
    """SLURM may signal some ranks only: the save is collective, so a rank that got no signal still runs Lightning's
    handler at the end of the step when another rank got it (any rank, not all ranks)."""
    trainer, before = fake_trainer(SLURMEnvironment(), others=(True,)), signal.getsignal(signal.SIGUSR1)
    signal.signal(signal.SIGUSR1, _HandlersCompose([trainer._signal_connector._slurm_sigusr_handler_fn]))
    callback = StepBoundaryRequeue()
    try:
        callback.on_train_start(trainer, None)
        callback.on_train_batch_end(trainer, None, None, None, 0)
        assert trainer.strategy.calls == [False]  # this rank got no signal
        assert trainer._signal_connector.saves == [signal.SIGUSR1] and callback.requeued
    finally:
        callback.restore()
        signal.signal(signal.SIGUSR1, before)


def test_a_requeued_fit_after_a_torn_first_save_starts_over_instead_of_resuming_from_a_missing_file(tmp_path, monkeypatch):
    """The job was killed inside its first hpc save: only its temporaries are there. Lightning's own pick reads every
    digit of a name holding ``hpc_ckpt_`` (``hpc_ckpt_11234.ckpt``, which does not exist); they are deleted first."""
    from lightning.pytorch.trainer.connectors.checkpoint_connector import _CheckpointConnector

    from mmsr.callbacks.requeue import hpc_resume_path

    monkeypatch.setattr(SLURMEnvironment, "detect", staticmethod(lambda: True))
    (tmp_path / ".hpc_ckpt_1.ckpt.a1b2c3d4.tmp").write_bytes(b"torn")  # a single-file save's temporary
    (tmp_path / ".hpc_ckpt_1.ckpt.tmp-0badc0de").mkdir()  # a distributed save's
    (tmp_path / "last.ckpt").write_bytes(b"kept")
    assert hpc_resume_path({"default_root_dir": str(tmp_path)}) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    assert _CheckpointConnector._CheckpointConnector__max_ckpt_version_in_folder(tmp_path, "hpc_ckpt_") is None
