"""A tool's ``FatalToolError`` (a provider refusing its key, a replay-only miss) stops every rank of a 2-rank run
(gloo, DDP), not only the rank whose episodes called that tool: in the first step only rank 0's episodes search.
Rank 0 alone raised it, mid-rollout; rank 1 went on into the step's collectives and waited for rank 0 (NCCL: until
its timeout)."""

from __future__ import annotations

import pytest
import yaml

from mmsr.data.datamodule import WholeBatchSampler
from mmsr.data.loaders import load_samples
from mmsr.tools.base import FatalToolError, ToolRequest, ToolResult
from tests.distributed.runs import ROOT
from tests.distributed.test_judge_refused_ranks import TIMEOUT_S, fit_until
from tests.distributed.test_two_ranks import FVQA

REFUSAL = "the provider refused the key (HTTP 401)"


class RefusingSearch:
    """A text search whose provider refuses the key: every call raises."""

    async def __call__(self, request: ToolRequest) -> ToolResult:
        raise FatalToolError(REFUSAL)


def script(seed: int) -> dict[str, list[str]]:
    """Every episode searches the web, but those of rank 1's first-step prompts (2 prompts a rank, data ``seed``)."""
    samples = load_samples(FVQA / "fvqa_dev.jsonl")
    direct = {samples[i].id for i in WholeBatchSampler(2, len(samples), True, seed, 2, 1).order(0)[:2]}
    answer, search = "<reason>r</reason><answer>{}</answer>", "<reason>r</reason><text_search>q</text_search>"
    return {s.id: [answer.format(s.ground_truth)] if s.id in direct else [search, answer.format(s.ground_truth)]
            for s in samples}  # fmt: skip


def config(tmp) -> dict:
    cfg = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
    cfg["trainer"].update(max_steps=1, devices=2, strategy="ddp", default_root_dir=str(tmp), plugins=None,
                          use_distributed_sampler=False, enable_checkpointing=False, enable_progress_bar=False,
                          callbacks=None)  # fmt: skip
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp)
    init = cfg["model"]["init_args"]
    init["text_search"] = {"class_path": f"{__name__}.RefusingSearch"}
    init["engine"] = {"class_path": "mmsr.rollout.engine.ScriptedEngine",
                      "init_args": {"script": script(cfg["data"].get("seed", cfg["seed_everything"]))}}  # fmt: skip
    return cfg


@pytest.mark.slow
def test_a_tool_refused_on_one_rank_stops_every_rank(tmp_path):
    """Rank 0 raises the tool's error, rank 1 a ``FatalToolError`` naming rank 0's; neither waits for the other."""
    status, stderr = fit_until(tmp_path, config(tmp_path), TIMEOUT_S)
    assert status is not None, f"the run hung past {TIMEOUT_S} s:\n{stderr[-3000:]}"
    errors = [line for line in stderr.splitlines() if line.startswith("mmsr fit: error: ")]
    assert len(errors) == 2, stderr[-3000:]  # one a rank, each naming the refusal
    assert all(line.startswith("mmsr fit: error: FatalToolError: ") and REFUSAL in line for line in errors), errors
    assert any("rank 0's tool stopped the run" in line for line in errors), errors
    assert status != 0
