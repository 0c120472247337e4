"""Any error that stops one rank of a 2-rank run (gloo, DDP) stops every rank, each naming the rank it came from:
a reward that fails on rank 0 only (rank 1 went on into the update's gradient all-reduce and waited for rank 0), and
a tool's ``FatalToolError`` in rank 0's held-out episodes during Lightning's sanity check (rank 1 waited for rank 0
in the validation epoch's gather)."""

from __future__ import annotations

import pytest
import torch.distributed as dist
import yaml

from mmsr.data.loaders import load_samples
from tests.distributed.runs import ROOT
from tests.distributed.test_engines_two_ranks import FSDP2, HF
from tests.distributed.test_judge_refused_ranks import TIMEOUT_S, fit_until
from tests.distributed.test_tool_refused_ranks import REFUSAL
from tests.distributed.test_two_ranks import FVQA

BROKEN = "the reward model is down"
ANSWER, SEARCH = "<reason>r</reason><answer>{}</answer>", "<reason>r</reason><text_search>q</text_search>"


class BrokenOnRankZero:
    """A reward whose scoring fails on rank 0 only (a reward model's server that rank 0 cannot reach)."""

    def __call__(self, trajectory, sample) -> float:
        if dist.get_rank() == 0:
            raise ValueError(BROKEN)
        return 1.0


class SubmitBrokenOnRankZero:
    """A reward that starts judging as each episode ends (``submit``) and fails there on rank 0 only: mid-rollout,
    while rank 1 still decodes."""

    def __call__(self, trajectory, sample) -> float:
        return 1.0

    def submit(self, trajectory, sample) -> None:
        if dist.get_rank() == 0:
            raise ValueError(BROKEN)


class DetailsBrokenOnRankZero:
    """A reward whose score works everywhere but whose ``details`` fail on rank 0 only."""

    def __call__(self, trajectory, sample) -> float:
        return 1.0

    def details(self, trajectory, sample) -> dict[str, float]:
        if dist.get_rank() == 0:
            raise ValueError(BROKEN)
        return {"correct": 1.0}


def config(tmp, script: dict[str, list[str]], **init) -> dict:
    """The smoke config on 2 DDP ranks for one step, the engine scripted unless ``init`` (more of the module's
    arguments) names another."""
    cfg = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
    cfg["trainer"].update(max_steps=1, devices=2, strategy="ddp", default_root_dir=str(tmp), plugins=None,
                          use_distributed_sampler=False, enable_checkpointing=False, enable_progress_bar=False,
                          callbacks=None)  # fmt: skip
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp)
    engine = {"class_path": "mmsr.rollout.engine.ScriptedEngine", "init_args": {"script": script}}
    cfg["model"]["init_args"].update({"engine": engine} | init)
    return cfg


def error_lines(status: int | None, stderr: str) -> list[str]:
    assert status is not None, f"the run hung past {TIMEOUT_S} s:\n{stderr[-3000:]}"
    assert status != 0
    errors = [line for line in stderr.splitlines() if line.startswith("mmsr fit: error: ")]
    assert len(errors) == 2, stderr[-3000:]  # one a rank
    return errors


@pytest.mark.slow
@pytest.mark.parametrize("reward", ["BrokenOnRankZero", "DetailsBrokenOnRankZero"])
def test_a_reward_failing_on_one_rank_stops_every_rank(tmp_path, reward):
    """Rank 0 raises its reward's error (its score's, or its details' before the update), rank 1 a RuntimeError
    naming rank 0 and that error."""
    script = {s.id: [ANSWER.format(s.ground_truth)] for s in load_samples(FVQA / "fvqa_dev.jsonl")}
    cfg = config(tmp_path, script, reward={"class_path": f"{__name__}.{reward}"})
    errors = error_lines(*fit_until(tmp_path, cfg, TIMEOUT_S))
    assert all(BROKEN in line for line in errors), errors
    assert any(line.startswith(f"mmsr fit: error: RewardError: reward {reward}") for line in errors), errors
    assert any(line.startswith("mmsr fit: error: RuntimeError: rank 0 stopped: RewardError: ") for line in errors), errors


@pytest.mark.slow
def test_a_tool_refused_in_one_rank_s_validation_stops_every_rank(tmp_path):
    """Lightning's sanity check validates before the first step: rank 0's held-out rows (the even ones) search and
    its tool refuses, rank 1's answer; both stop at the validation epoch's end, rank 1 naming rank 0's error."""
    rows = load_samples(FVQA / "fvqa_dev.jsonl")
    script = {s.id: [SEARCH, ANSWER.format(s.ground_truth)] if i % 2 == 0 else [ANSWER.format(s.ground_truth)]
              for i, s in enumerate(rows)}  # fmt: skip
    cfg = config(tmp_path, script, text_search={"class_path": "tests.distributed.test_tool_refused_ranks.RefusingSearch"})
    cfg["data"]["val_files"] = [str(FVQA / "fvqa_dev.jsonl")]
    errors = error_lines(*fit_until(tmp_path, cfg, TIMEOUT_S))
    assert all(line.startswith("mmsr fit: error: FatalToolError: ") and REFUSAL in line for line in errors), errors
    assert any("rank 0's tool stopped the run" in line for line in errors), errors


@pytest.mark.slow
def test_an_error_mid_rollout_on_one_fsdp2_rank_with_the_hf_engine_stops_every_rank(tmp_path):
    """FSDP2 with a real ``HFEngine`` (random tiny policy, sampled episodes): rank 0's rollout raises as its first
    episode ends, rank 1 decodes on (the engine's unsharded copy: no collective) and both stop at the rollout's
    agreement, rank 1 naming rank 0's error; neither waits in an FSDP2 gather."""
    cfg = config(tmp_path, {}, reward={"class_path": f"{__name__}.SubmitBrokenOnRankZero"}, engine=HF)
    cfg["trainer"]["strategy"] = FSDP2
    errors = error_lines(*fit_until(tmp_path, cfg, TIMEOUT_S))
    assert any(line == f"mmsr fit: error: ValueError: {BROKEN}" for line in errors), errors
    assert any(line == f"mmsr fit: error: RuntimeError: rank 0 stopped: ValueError: {BROKEN}" for line in errors), errors
