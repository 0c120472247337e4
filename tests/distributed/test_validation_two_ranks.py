"""Held-out evaluation on 2 FSDP2 ranks (gloo): each rank rolls out its share of ``data.val_files``, and
the logged ``val/`` metrics are the means over every rank's episodes. (The real engines validate between
sharded steps in tests/distributed/test_engines_two_ranks.py, whose FSDP2 runs validate after every step.)"""

import pytest

from mmsr.data.loaders import load_samples
from tests.distributed.test_engines_two_ranks import FSDP2, VALIDATE_EVERY_STEP, fit, validated
from tests.distributed.test_two_ranks import FVQA


def half_right() -> dict[str, list[str]]:
    """Every episode of the i-th prompt answers right when i is even: rank 0 holds the even rows of the
    held-out file (all right), rank 1 the odd ones (all wrong)."""
    out = {}
    for i, s in enumerate(load_samples(FVQA / "fvqa_dev.jsonl")):
        answer = s.ground_truth if i % 2 == 0 else "no idea"
        out |= {f"{s.id}#{k}": [f"<reason>r</reason><answer>{answer}</answer>"] for k in range(8)}
    return out


@pytest.mark.slow
def test_val_metrics_pool_both_ranks_episodes(tmp_path):
    scripted = {"class_path": "mmsr.rollout.engine.ScriptedEngine", "init_args": {"script": half_right()}}
    (row,) = validated(fit(tmp_path, 2, FSDP2, scripted, max_steps=1, extra=VALIDATE_EVERY_STEP))
    assert float(row["val/episodes"]) == 20
    assert float(row["val/reward/accuracy"]) == 0.5  # rank 0 alone: 1.0, rank 1 alone: 0.0
