"""Never lose work: kill -9 a training run, resume from its last complete checkpoint, and the next
batches and updates equal an uninterrupted run's, logged into the same run directory; a crash during a
save leaves no torn checkpoint."""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from mmsr.checkpoint import AtomicCheckpointIO
from mmsr.report.cli import write_report
from tests.conftest import subprocess_env

ROOT = Path(__file__).resolve().parents[1]
STEPS = 5


def config(tmp: Path) -> Path:
    """The smoke config, checkpointing every step and keeping them all."""
    cfg = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
    cfg["trainer"].update(max_steps=STEPS, default_root_dir=str(tmp), enable_progress_bar=False)
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp)
    cfg["trainer"]["callbacks"] = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(tmp / "ckpt"), "every_n_train_steps": 1, "save_top_k": -1, "filename": "{step}"}},
        {"class_path": "mmsr.callbacks.trajectory_logger.TrajectoryLogger", "init_args": {"every_n_steps": 1, "max_trajectories": 8}},
    ]  # fmt: skip
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def fit(cfg: Path, *extra: str, wait: bool = True):
    cmd = [sys.executable, "-m", "mmsr", "fit", "-c", str(cfg), *extra]
    env = subprocess_env()
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]


def run_dir(run: Path) -> Path:
    """The run's one CSV version directory (a resume continues it, it does not add a version)."""
    (version,) = (run / "csv").iterdir()
    return version


def per_step(run: Path) -> dict[int, list]:
    """step -> the sampled trajectories (sample id, turn texts, reward) of the run directory."""
    out: dict[int, list] = {}
    for line in (run_dir(run) / "trajectories.jsonl").read_text().splitlines():
        r = json.loads(line)
        out.setdefault(r["step"], []).append((r["sample_id"], [t["text"] for t in r["turns"]], r["reward"]))
    return out


def metrics(run: Path) -> list[dict[str, str]]:
    """The rows of ``metrics.csv`` without the wall-clock columns (timings, rates)."""
    timing = re.compile(r"^timing/|seconds$|_per_s$|latency_s$")
    with (run_dir(run) / "metrics.csv").open(newline="") as f:
        return [{k: v for k, v in row.items() if not timing.search(k)} for row in csv.DictReader(f)]


@pytest.mark.slow
def test_kill_and_resume_equals_uninterrupted(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    fit(config(a))
    proc = fit(config(b), wait=False)
    deadline = time.time() + 600
    while not (b / "ckpt" / "step=2.ckpt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # kill -9, wherever it is (possibly inside a save)
    proc.wait()
    done = sorted(int(p.stem.split("=")[1]) for p in (b / "ckpt").glob("step=*.ckpt"))
    assert done and done[-1] < STEPS, "the run finished before it could be killed"
    fit(config(b), "--ckpt_path", str(b / "ckpt" / f"step={done[-1]}.ckpt"))
    steps_a, steps_b = per_step(a), per_step(b)
    assert list(steps_b) == list(range(STEPS)) and all(len(v) == 8 for v in steps_b.values())  # each step once
    assert steps_a == steps_b  # same batches, same samples drawn, before and after the kill
    assert [r["step"] for r in metrics(b)] == [str(s) for s in range(STEPS)]  # each step once, in order
    assert metrics(a) == metrics(b)
    page = write_report(run_dir(b)).read_text()
    assert re.findall(r'<h2 class="step">Step (\d+)</h2>', page) == [str(s) for s in range(STEPS)]
    final_a = torch.load(a / "ckpt" / f"step={STEPS}.ckpt", map_location="cpu", weights_only=False)
    final_b = torch.load(b / "ckpt" / f"step={STEPS}.ckpt", map_location="cpu", weights_only=False)
    for k, v in final_a["state_dict"].items():
        torch.testing.assert_close(final_b["state_dict"][k], v, msg=k)
    assert final_a["optimizer_states"][0]["state"][0]["step"] == final_b["optimizer_states"][0]["state"][0]["step"]


def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)

    def torn(obj, f, *a, **k):
        f.write(b"partial bytes")
        raise KeyboardInterrupt  # the process dies mid-write

    monkeypatch.setattr(torch, "save", torn)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=False) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary left behind


def test_an_atomic_checkpoint_has_the_permissions_a_plain_save_gets(tmp_path):
    """mkstemp makes the temporary 0600 and the rename kept it: other users' eval or export jobs on a shared
    cluster could not read the checkpoint. It now follows the umask, as Lightning's own save does."""
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    old = os.umask(0o022)
    try:
        AtomicCheckpointIO().save_checkpoint({"step": 1}, tmp_path / "atomic.ckpt")
        TorchCheckpointIO().save_checkpoint({"step": 1}, tmp_path / "plain.ckpt")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == {"atomic.ckpt": 0o644, "plain.ckpt": 0o644}
