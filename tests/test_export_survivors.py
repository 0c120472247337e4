"""Survivors of a mutation audit of ``mmsr export``: ``--run-config`` is the config the module is rebuilt from, and
``--dtype`` offers and writes each of its dtypes."""

import copy
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import mmsr.eval.load
from mmsr.export import main


@pytest.fixture
def loaded(tiny_policy, monkeypatch):
    """``load_module`` replaced by one recording its arguments and giving a copy of the tiny policy (fp32; the
    export casts the copy, not the session's policy)."""
    calls = []

    def load_module(ckpt, run_config, leave_out):
        calls.append((ckpt, run_config, leave_out))
        return SimpleNamespace(policy=replace(tiny_policy, model=copy.deepcopy(tiny_policy.model)))

    monkeypatch.setattr(mmsr.eval.load, "load_module", load_module)
    return calls


def test_the_run_config_given_is_the_one_the_module_is_rebuilt_from(loaded, tmp_path):
    """``--run-config`` names the run's config when it is not next to the checkpoint (a copied checkpoint, a config
    edited to drop an engine): dropped, the export looked next to the checkpoint and failed, or rebuilt another run."""
    main(["--ckpt", "run/checkpoints/last.ckpt", "--out", str(tmp_path / "a"), "--run-config", "elsewhere/config.yaml"])
    main(["--ckpt", "run/checkpoints/last.ckpt", "--out", str(tmp_path / "b")])
    assert [(ckpt, config) for ckpt, config, _ in loaded] == [("run/checkpoints/last.ckpt", "elsewhere/config.yaml"),
                                                             ("run/checkpoints/last.ckpt", None)]  # fmt: skip
    assert all(leave_out == mmsr.eval.load.EPISODE_ARGS for *_, leave_out in loaded)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_each_dtype_offered_is_the_dtype_written(loaded, tmp_path, dtype):
    """An fp32 policy exported with ``--dtype`` has every weight in that dtype (vLLM serves fp16 on GPUs without
    bf16), and the command accepts each dtype its help offers."""
    out = main(["--ckpt", "last.ckpt", "--out", str(tmp_path / "hf"), "--dtype", dtype])
    weights = load_file(out / "model.safetensors")
    assert weights and {t.dtype for t in weights.values()} == {getattr(torch, dtype)}
