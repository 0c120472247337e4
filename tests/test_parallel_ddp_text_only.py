"""Episodes without an image (rows with no question image, as text-only data has) under plain DDP (no
``find_unused_parameters``), GRPO and the warm start. On 2 gloo ranks every text-only forward runs the vision tower at
zero weight (``idle_vision_tower``), so DDP gets every gradient, and the tower's zeros are dropped
(``drop_idle_gradients``): it stays as built while the language model trains. On one device the tower is left out,
and DDP failed the next backward with Lightning's "parameters that were not used in producing the loss" (GRPO after
its first rollout, the warm start after its first step): both refuse it before the first step, naming what to set."""

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from mmsr.data.loaders import load_samples
from tests.conftest import FVQA, SCAFFOLD
from tests.distributed.runs import fit

R = "<reason>r</reason>"
POLICY = {"class_path": "mmsr.models.build.TinyQwen2_5_VL", "init_args": {
    "tokenizer_texts": [str(FVQA / "fvqa_dev.jsonl")], "scaffold": SCAFFOLD, "hidden_size": 32, "num_layers": 1,
    "vision_depth": 1, "seed": 0}}  # fmt: skip
REFUSED = "under trainer.strategy ddp on one device: a micro-batch without an image"


def script() -> dict[str, list[str]]:
    """Episode k of each prompt: right, wrong, a text search then right, garbage (rewards differ; no tool image)."""
    out = {}
    for s in load_samples(FVQA / "fvqa_dev.jsonl"):
        right = f"{R}<answer>{s.ground_truth}</answer>"
        turns = [[right], [f"{R}<answer>no idea</answer>"], [f"{R}<text_search>who</text_search>", right], ["zzz"]]
        out |= {f"{s.id}#{k}": t for k, t in enumerate(turns)}
    return out


def text_only(tmp: Path) -> str:
    """The FVQA dev rows with no image (``tmp/train.jsonl``)."""
    rows = [json.loads(line) | {"image": None} for line in (FVQA / "fvqa_dev.jsonl").read_text().splitlines()]
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(tmp / "train.jsonl")


def config(kind: str, tmp: Path, devices: int) -> dict:
    """``kind`` (grpo or sft) for 2 steps under plain ``ddp`` on ``devices`` CPU processes, exporting to ``tmp/hf``."""
    trainer = {"accelerator": "cpu", "devices": devices, "strategy": "ddp", "max_steps": 2, "logger": False,
               "enable_model_summary": False, "enable_checkpointing": False, "enable_progress_bar": False,
               "use_distributed_sampler": False, "default_root_dir": str(tmp)}  # fmt: skip
    data = {"train_files": [text_only(tmp)], "prompts_per_step": 2, "shuffle": False}
    if kind == "grpo":
        model = {"class_path": "mmsr.module.GRPOModule", "init_args": {
            "policy": POLICY, "engine": {"class_path": "mmsr.rollout.engine.ScriptedEngine", "init_args": {"script": script()}},
            "text_search": {"class_path": "mmsr.tools.local.LocalTextSearch", "init_args": {
                "corpus": str(FVQA / "search" / "corpus.jsonl"), "top_k": 2, "max_chars": 100}},
            "rollout": {"max_tokens_per_turn": 64, "max_context_tokens": 1024}, "num_generations": 4, "kl_coef": 0.0,
            "lr": 1e-3, "micro_batch_tokens": 512, "export_dir": str(tmp / "hf")}}  # fmt: skip
    else:
        model = {"class_path": "mmsr.sft.SFTModule", "init_args": {
            "policy": POLICY, "teacher": {"class_path": "tests.distributed.test_sft_two_ranks.LongFor",
                                          "init_args": {"long_ids": []}},
            "rollout": {"max_tokens_per_turn": 256, "max_context_tokens": 1024}, "micro_batch_tokens": 256,
            "lr": 1e-3, "export_dir": str(tmp / "hf")}}  # fmt: skip
    return {"seed_everything": 0, "trainer": trainer, "model": model, "data": data}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    """The weights ``POLICY`` builds, as an untrained export holds them."""
    from mmsr.demo.tokenizer import Scaffold
    from mmsr.models.build import TinyQwen2_5_VL, save_policy

    init = {k: v for k, v in POLICY["init_args"].items() if k != "scaffold"}
    path = save_policy(TinyQwen2_5_VL(**init, scaffold=Scaffold()).build(), tmp_path_factory.mktemp("built"))
    return load_file(path / "model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["grpo", "sft"])
def test_text_only_episodes_train_under_plain_ddp_on_two_ranks(kind, tmp_path, built):
    """Two steps: DDP's next backward would fail if the first had left a parameter without its gradient."""
    proc = fit(tmp_path, config(kind, tmp_path, 2), timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    trained = load_file(tmp_path / "hf" / "model.safetensors")
    tower = [k for k in trained if "visual" in k]
    assert tower and all((trained[k] == built[k]).all() for k in tower)  # no image on any rank: the tower as built
    assert any(not (trained[k] == built[k]).all() for k in trained if k not in tower)  # the language model trained


@pytest.mark.slow
@pytest.mark.parametrize("kind, module", [("grpo", "GRPOModule"), ("sft", "SFTModule")])
def test_plain_ddp_on_one_device_is_refused_before_the_first_step(kind, module, tmp_path):
    proc = fit(tmp_path, config(kind, tmp_path, 1), timeout=600)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0 and f"{module} {REFUSED}" in last
    assert last.endswith("set trainer.strategy: auto or ddp_find_unused_parameters_true")
    assert "training_step" not in proc.stderr  # stopped before any step (Lightning's error came from one)
