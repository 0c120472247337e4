"""A judge that refuses its key (401) before it ever replied stops every rank of a 2-rank run (gloo, DDP), not
only the rank that asked it: in the first step only rank 0's episodes answer, so rank 1 asks the judge nothing.
Rank 0 alone raised ``JudgeRefused``; rank 1 went on into the step's gradient all-reduce, where it waited for rank 0
(NCCL: until its timeout; gloo: until rank 0's exit closed the connection, "Connection closed by peer")."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mmsr.data.datamodule import WholeBatchSampler
from mmsr.data.loaders import load_samples
from mmsr.reward.judge import JudgeRefused
from mmsr.reward.judged import JudgedReward
from tests.conftest import subprocess_env
from tests.distributed.runs import ROOT
from tests.distributed.test_two_ranks import FVQA
from tests.reward.test_judge_keys import ANSWERED, KEY_ENV, KeyedOpenAI, _judge
from tests.reward.test_mmsearch_r1 import _sample, _trajectory

TIMEOUT_S = 120  # a run that hangs fails here (a fit of one step takes ~40 s on 2 busy CPU cores)


def script(seed: int) -> dict[str, list[str]]:
    """Every episode answers, but those of rank 1's first-step prompts (2 prompts a rank, data ``seed``)."""
    samples = load_samples(FVQA / "fvqa_dev.jsonl")
    silent = {samples[i].id for i in WholeBatchSampler(2, len(samples), True, seed, 2, 1).order(0)[:2]}
    return {s.id: ["zzz"] if s.id in silent else [f"<reason>r</reason><answer>{s.ground_truth}</answer>"]
            for s in samples}  # fmt: skip


def config(tmp: Path, port: int) -> dict:
    cfg = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
    cfg["trainer"].update(max_steps=1, devices=2, strategy="ddp", default_root_dir=str(tmp), plugins=None,
                          use_distributed_sampler=False, enable_checkpointing=False, enable_progress_bar=False,
                          callbacks=None)  # fmt: skip
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp)
    judge = {"class_path": "mmsr.reward.judge.OpenAIJudge",
             "init_args": {"base_url": f"http://127.0.0.1:{port}/v1", "model": "judge", "api_key_env": KEY_ENV,
                           "retries": 0, "timeout_s": 10}}  # fmt: skip
    init = cfg["model"]["init_args"]
    init["reward"] = {"class_path": "mmsr.reward.judged.JudgedReward", "init_args": {"judge": judge}}
    init["engine"] = {"class_path": "mmsr.rollout.engine.ScriptedEngine",
                      "init_args": {"script": script(cfg["data"].get("seed", cfg["seed_everything"]))}}  # fmt: skip
    return cfg


def fit_until(tmp: Path, cfg: dict, timeout: float) -> tuple[int | None, str]:
    """``mmsr fit`` on ``cfg``, one process a rank as torchrun starts them (each in a session of its own), as on a
    cluster: (the worst exit status, stderr of every rank), the status None when a rank ran past ``timeout`` (every
    rank then killed). Not Lightning's own launcher: its first process SIGKILLs the others when it fails, so whether
    they said why raced with that kill (and on a cluster nothing kills them: they waited in NCCL)."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "config.yaml").write_text(yaml.safe_dump(cfg))
    world = {"TORCHELASTIC_RUN_ID": "test", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "0",
             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}  # fmt: skip
    procs, files = [], [open(tmp / f"stderr{rank}.txt", "w+") for rank in range(2)]
    try:
        for rank, err in enumerate(files):
            env = subprocess_env() | world | {"RANK": str(rank), "LOCAL_RANK": str(rank), KEY_ENV: "sk-wrong-0123456789abcdef"}
            procs.append(subprocess.Popen([sys.executable, "-m", "mmsr", "fit", "-c", str(tmp / "config.yaml")],
                                          cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True))  # fmt: skip
        status = _wait_all(procs, timeout)
        texts = []
        for err in files:
            err.seek(0)
            texts.append(err.read())
        return status, "".join(texts)
    finally:
        for proc in procs:
            _kill_group(proc.pid)
            proc.wait()
        for err in files:
            err.close()


def _wait_all(procs: list[subprocess.Popen], timeout: float) -> int | None:
    """The worst exit status of ``procs``, None if one is still running after ``timeout`` seconds in all."""
    deadline = time.monotonic() + timeout
    try:
        return max(abs(proc.wait(timeout=max(0.0, deadline - time.monotonic()))) for proc in procs)
    except subprocess.TimeoutExpired:
        return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:  # every rank has exited
        pass


def test_a_refused_submit_waits_for_the_batch(monkeypatch):
    """A refusal that came in while the rollout goes on is raised by ``batch`` (the step's rewards, where the ranks
    agree to stop), not by the next episode's ``submit``, mid-rollout, on that rank alone."""
    monkeypatch.setenv(KEY_ENV, "sk-wrong-0123456789abcdef")
    with KeyedOpenAI() as server:
        reward = JudgedReward(_judge(server, retries=0))
        reward.submit(ANSWERED, _sample())
        (refused,) = reward._pending.values()
        assert isinstance(refused.exception(timeout=10), JudgeRefused)
        # the next episode's end harvests the verdicts that came in, and raises nothing
        reward.submit(_trajectory("<reason>r</reason><answer>Paris</answer>"), _sample())
        with pytest.raises(JudgeRefused, match="HTTP 401"):
            reward.batch([ANSWERED], [_sample()])


@pytest.mark.slow
def test_a_judge_refused_on_one_rank_stops_every_rank(tmp_path):
    """Rank 0 raises its error (the reward's, naming the judge's refusal), rank 1 a ``JudgeRefused`` naming rank 0's;
    neither waits for the other. One step of the smoke config (~40 s on 2 CPU cores)."""
    with KeyedOpenAI() as server:
        status, stderr = fit_until(tmp_path, config(tmp_path, server.port), TIMEOUT_S)
        asked = len(server.bodies)
    assert status is not None, f"the run hung past {TIMEOUT_S} s:\n{stderr[-3000:]}"
    assert asked >= 1  # rank 0 asked, and was refused
    errors = [line for line in stderr.splitlines() if line.startswith("mmsr fit: error: ")]
    assert len(errors) == 2, stderr[-3000:]  # one a rank, each naming the refusal
    assert all("JudgeRefused: " in line and "HTTP 401" in line and KEY_ENV in line for line in errors), errors
    assert any("rank 0's judge" in line for line in errors), errors  # rank 1 says whose judge refused
    assert status != 0
