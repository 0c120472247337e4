"""``mmsr export`` writes no tool, so it builds the run's module without its engine, tools, reward and reading
corpus: a run whose search index, corpus or reading files are not on the exporting machine is exported (it failed
with "image search index ... not found")."""

import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import FVQA
from tests.eval.test_cli import TINY, _checkpointed


def _files(tmp_path):
    """A copy of the FVQA search data (index, corpus, the images the index names), which the test deletes."""
    shutil.copytree(FVQA, tmp_path / "fvqa")
    index, corpus = (tmp_path / "fvqa" / "search" / name for name in ("image_index.jsonl", "corpus.jsonl"))
    tools = {
        "image_search": {"class_path": "mmsr.tools.local.LocalImageSearch", "init_args": {"index": str(index), "top_k": 2}},
        "text_search": {"class_path": "mmsr.tools.local.LocalTextSearch", "init_args": {"corpus": str(corpus), "top_k": 2}},
    }
    return tools, corpus


def _grpo(tools, corpus):
    return {"class_path": "mmsr.module.GRPOModule", "init_args": {"policy": TINY, **tools, "num_generations": 2}}


def _sft(tools, corpus):
    reading = {"class_path": "mmsr.demo.reading.ReadingCorpus", "init_args": {"files": [str(corpus)]}}
    teacher = {"class_path": "mmsr.demo.teacher.RAGTeacher"}
    return {"class_path": "mmsr.sft.SFTModule",
            "init_args": {"policy": TINY, "teacher": teacher, **tools, "reading": reading, "reading_steps": 1}}  # fmt: skip


@pytest.mark.parametrize("module", [_grpo, _sft], ids=["grpo", "sft"])
def test_a_run_whose_tool_files_are_gone_is_exported(tmp_path, module):
    from mmsr.export import main as export

    tools, corpus = _files(tmp_path)
    ckpt, trained = _checkpointed(tmp_path, module(tools, corpus))
    shutil.rmtree(tmp_path / "fvqa")  # the index, corpus and reading files are not on this machine
    exported = load_file(export(["--ckpt", str(ckpt), "--out", str(tmp_path / "hf")]) / "model.safetensors")
    assert any(torch.equal(t, trained.model.lm_head.weight) for t in exported.values())  # the trained weights


def test_an_eval_with_its_own_tools_does_not_build_the_runs(tmp_path):
    """``mmsr eval --ckpt X --tools T`` built the run's tools first (then put T in their place), so it failed where
    the run's index was gone; the run's tools are now left out when ``--tools`` gives them."""
    import yaml

    from mmsr.eval.cli import load_from_args, parse_args
    from tests.eval.test_cli import TOOLS

    tools, corpus = _files(tmp_path)
    ckpt, trained = _checkpointed(tmp_path, _grpo(tools, corpus))
    shutil.rmtree(tmp_path / "fvqa")
    (tmp_path / "tools.yaml").write_text(yaml.safe_dump(TOOLS))
    args = parse_args(["--ckpt", str(ckpt), "--tools", str(tmp_path / "tools.yaml"), "--data", str(FVQA / "fvqa_dev.jsonl")])
    loaded = load_from_args(args, ["on-demand"])
    assert str(loaded.tools["image_search"].index).startswith(str(FVQA))  # --tools', not the run's
    assert torch.equal(loaded.policy.model.lm_head.weight, trained.model.lm_head.weight)


def test_a_run_with_a_limit_of_a_tool_it_is_rebuilt_without_is_exported_and_evaluated(tmp_path):
    """A run's ``rollout.tool_limits: {crop: 2}``: rebuilt without its tools (export, ``eval --tools``), the module
    refused a limit of a tool it did not have; the evaluation keeps the limits of the tools it loads."""
    import yaml

    from mmsr.eval.cli import load_from_args, parse_args
    from mmsr.export import main as export
    from tests.eval.test_cli import TOOLS

    tools, corpus = _files(tmp_path)
    crop = [{"class_path": "mmsr.tools.crop.Crop"}]
    run = {"class_path": "mmsr.module.GRPOModule", "init_args": {
        "policy": TINY, "tools": crop, **tools, "num_generations": 2, "rollout": {"tool_limits": {"crop": 2, "text_search": 1}}}}
    ckpt, trained = _checkpointed(tmp_path, run)
    exported = load_file(export(["--ckpt", str(ckpt), "--out", str(tmp_path / "hf")]) / "model.safetensors")
    assert any(torch.equal(t, trained.model.lm_head.weight) for t in exported.values())
    (tmp_path / "tools.yaml").write_text(yaml.safe_dump(TOOLS))
    args = parse_args(["--ckpt", str(ckpt), "--tools", str(tmp_path / "tools.yaml"), "--data", str(FVQA / "fvqa_dev.jsonl")])
    assert load_from_args(args, ["on-demand"]).settings.tool_limits == {"text_search": 1}
