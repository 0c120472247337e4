"""A resumed run probes its weight syncs at the steps an uninterrupted one does (tests/callbacks/scripted_run.py, real
runs in-process). ``WeightSync`` checks after its 1st, (k+1)th, (2k+1)th ... sync by its count of syncs, which a
checkpoint did not keep: resumed, it counted from 0 again, probed at its first step and at another k-step phase, and
``sync/probe_diff`` (and the engine's draws the probe makes) moved to other steps than the uninterrupted run's."""

import csv
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from mmsr.rollout.engine import GenerationOutput, GenerationRequest, SamplingParams, ScriptedEngine
from mmsr.rollout.hf_engine import HFEngine
from mmsr.sync import trainer_logprobs
from mmsr.sync.probe import PROBE_KEY
from tests.callbacks.scripted_run import turn_text
from tests.callbacks.test_resume_logging import fit

STEPS, RESUME_AT, VERIFY_EVERY = 4, 2, 3


class ScoringEngine(ScriptedEngine):
    """The scripted run's episodes, and a colocated ``HFEngine`` for the probe: it scores (as vLLM does), so
    ``WeightSync`` probes it, and agrees with the trainer exactly. Its sampler state is the checkpoint's."""

    def __init__(self) -> None:
        super().__init__(turn_text)
        self.hf = HFEngine()

    def bind(self, policy) -> None:
        super().bind(policy)
        self.hf.bind(policy)

    def generate(self, requests: Sequence[GenerationRequest], sampling: SamplingParams) -> list[GenerationOutput]:
        probe = [r.key == PROBE_KEY for r in requests]
        return self.hf.generate(requests, sampling) if all(probe) else super().generate(requests, sampling)

    def score(self, input_ids, vision=()):
        return trainer_logprobs(self.hf.policy, input_ids, vision).tolist()

    def state_dict(self) -> dict:
        return self.hf.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.hf.load_state_dict(state)


ENGINE = ["--model.engine", json.dumps({"class_path": f"{__name__}.ScoringEngine"}),
          "--model.weight_sync", json.dumps({"class_path": "mmsr.sync.WeightSync", "init_args": {"verify_every": VERIFY_EVERY}})]  # fmt: skip


def probed_steps(root: Path) -> list[int]:
    """The steps whose ``metrics.csv`` row has ``sync/probe_diff``."""
    with (root / "csv" / "version_0" / "metrics.csv").open(newline="") as f:
        return [int(row["step"]) for row in csv.DictReader(f) if row.get("sync/probe_diff")]


def test_a_resumed_run_counts_syncs_and_probes_as_an_uninterrupted_one(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    uninterrupted = fit(a, STEPS, [], *ENGINE).model
    fit(b, RESUME_AT, [], *ENGINE)
    resumed = fit(b, STEPS, [], *ENGINE, resume=f"step={RESUME_AT}.ckpt").model
    # syncs 1 and 4 (steps 0 and 3) are probed; counted from 0 again at step 2, the resumed run probed 0 and 2
    assert probed_steps(a) == probed_steps(b) == [0, 3]
    assert uninterrupted.weight_sync.syncs == resumed.weight_sync.syncs == STEPS
    for step in (3, STEPS):  # the checkpoints the resumed run saved
        saved_a, saved_b = (torch.load(r / "ckpt" / f"step={step}.ckpt", weights_only=True) for r in (a, b))
        assert saved_a["mmsr_weight_sync"] == saved_b["mmsr_weight_sync"] == {"syncs": step}
        # a probe is two engine calls (its warm-up, its greedy continuation): at step 3, 2 calls where a probe at 2 made 4
        assert saved_a["mmsr_ranks"][0]["engine"] == saved_b["mmsr_ranks"][0]["engine"]
