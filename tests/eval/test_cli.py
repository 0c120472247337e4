"""``mmsr eval`` from a Hugging Face directory (in a fresh process: Lightning is never imported), from
a Lightning checkpoint rebuilt from its run's config.yaml, and from a policy YAML; the loaded weights
are synced into an engine that holds its own (as vLLM does); ``mmsr export`` keeps the checkpoint's
dtype."""

from __future__ import annotations  # jsonargparse matches BaseWeightsEngine to the Engine protocol's resolved hints

import json
import subprocess
import sys
from collections.abc import Iterable

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mmsr.models.build import PolicyBuilder
from mmsr.rollout.hf_engine import HFEngine
from mmsr.sync import StaleWeightsError, trainer_logprobs
from tests.conftest import FVQA, ROOT, SCAFFOLD

SEARCH = FVQA / "search"
TOOLS = {
    "image_search": {"class_path": "mmsr.tools.local.LocalImageSearch", "init_args": {"index": str(SEARCH / "image_index.jsonl"), "top_k": 2}},
    "text_search": {"class_path": "mmsr.tools.local.LocalTextSearch", "init_args": {"corpus": str(SEARCH / "corpus.jsonl"), "top_k": 2}},
}
TINY = {"class_path": "mmsr.models.build.TinyQwen2_5_VL",
        "init_args": {"tokenizer_texts": [str(FVQA / "fvqa_dev.jsonl"), str(SEARCH / "corpus.jsonl")], "scaffold": SCAFFOLD, "seed": 0}}  # fmt: skip


def test_model_dir_eval_in_a_fresh_process_without_lightning(tmp_path, tiny_policy):
    model_dir = tmp_path / "hf"
    tiny_policy.model.save_pretrained(model_dir)
    tiny_policy.tokenizer.save_pretrained(model_dir)
    (tmp_path / "tools.yaml").write_text(yaml.safe_dump(TOOLS))
    argv = ["eval", "--model-dir", str(model_dir), "--tools", str(tmp_path / "tools.yaml"), "--min-pixels", "3136",
            "--max-pixels", "12544", "--data", f"dev={FVQA / 'fvqa_dev.jsonl'}", "--limit", "2", "--workflow", "direct",
            "rag", "--max-tokens-per-turn", "4", "--out", str(tmp_path / "out")]  # fmt: skip
    code = f"import sys; from mmsr.cli import main; main({argv!r}); assert 'lightning' not in sys.modules, 'lightning imported'"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| dev | rag | all | 2 |" in proc.stdout
    rows = [json.loads(x) for x in (tmp_path / "out" / "trajectories.jsonl").read_text().splitlines()]
    assert [(r["workflow"], r["image_searches"]) for r in rows] == [("direct", 0)] * 2 + [("rag", 1)] * 2
    assert not (tmp_path / "out" / "episodes.partial.jsonl").exists()  # complete: the resumable work file went


class BaseWeightsEngine(HFEngine):
    """Like vLLM: generates and scores with its own copy of the weights, which it loads from the base
    model (``base``) when bound, so it evaluates a checkpoint only if the checkpoint is synced into it.
    ``drop_updates``: receive synced weights but keep the base ones (a broken sync)."""

    def __init__(self, base: PolicyBuilder, drop_updates: bool = False) -> None:
        super().__init__()
        self.base, self.drop_updates, self.own = base, drop_updates, None

    def bind(self, policy) -> None:
        self.own = self.own or self.base.build()
        super().bind(self.own)

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        if self.drop_updates:
            for _ in named_tensors:  # received (every bucket is gathered and sent), not loaded
                pass
            return
        super().update_weights(named_tensors)

    def score(self, input_ids, vision=()):
        return trainer_logprobs(self.own, input_ids, vision).tolist()


def _run_dir(tmp_path, **extra):
    """A run directory as ``mmsr fit`` leaves it: config.yaml, checkpoints/last.ckpt (perturbed weights);
    ``extra``: more module init args (an engine, a weight sync)."""
    init = {"policy": TINY, **TOOLS, "num_generations": 2, "kl_coef": 0.001,
            "rollout": {"max_rounds": 2, "max_tokens_per_turn": 5, "max_context_tokens": 1500}, **extra}  # fmt: skip
    return _checkpointed(tmp_path, {"class_path": "mmsr.module.GRPOModule", "init_args": init})


def _checkpointed(tmp_path, model: dict):
    """``tmp_path/run`` with the config.yaml of ``model`` (a LightningModule entry) and its checkpoint, the
    LM head moved off the built weights."""
    from lightning.pytorch import LightningModule

    from mmsr.eval.load import _parse

    config = {"seed_everything": 0, "model": model}
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(config))
    module = _parse({"model": LightningModule}, {"model": model}, tmp_path).model
    with torch.no_grad():
        module.model.lm_head.weight.add_(0.5)
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    torch.save({"state_dict": module.state_dict(), "global_step": 3}, ckpt)
    return ckpt, module


def test_checkpoint_is_rebuilt_from_the_run_config(tmp_path):
    from mmsr.eval.cli import main
    from mmsr.eval.load import load_checkpoint, load_policy_yaml

    ckpt, trained = _run_dir(tmp_path)
    loaded = load_checkpoint(ckpt)
    assert torch.equal(loaded.policy.model.lm_head.weight, trained.model.lm_head.weight)  # the trained weights
    assert loaded.settings.max_rounds == 2 and type(loaded.tools["text_search"]).__name__ == "LocalTextSearch"
    summary = main(["--ckpt", str(ckpt), "--data", str(FVQA / "fvqa_dev.jsonl"), "--limit", "1", "--out", str(tmp_path / "o")])
    assert summary["fvqa_dev"]["on-demand"]["all"]["n"] == 1
    with pytest.raises(FileNotFoundError, match="elsewhere.ckpt does not exist"):
        load_checkpoint(tmp_path / "elsewhere.ckpt")
    (tmp_path / "elsewhere.ckpt").write_bytes(ckpt.read_bytes())
    with pytest.raises(FileNotFoundError, match="no config.yaml next to"):
        load_checkpoint(tmp_path / "elsewhere.ckpt")
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump({"policy": TINY}))
    from_yaml = load_policy_yaml(tmp_path / "policy.yaml", str(ckpt))  # --policy with --weights: the module's ``model.``
    assert torch.equal(from_yaml.policy.model.lm_head.weight, trained.model.lm_head.weight)


def test_checkpoint_weights_are_synced_into_an_engine_with_its_own(tmp_path):
    from mmsr.eval.load import load_checkpoint

    engine = {"class_path": "tests.eval.test_cli.BaseWeightsEngine", "init_args": {"base": TINY}}
    ckpt, trained = _run_dir(tmp_path, engine=engine)
    loaded = load_checkpoint(ckpt)
    own = loaded.engine.own.model
    assert own is not loaded.policy.model
    base = loaded.engine.base.build().model.lm_head.weight
    assert not torch.equal(base, trained.model.lm_head.weight)  # without the sync it would evaluate the base
    for name, value in trained.model.state_dict().items():
        assert torch.equal(own.state_dict()[name], value), name
    config = yaml.safe_load((ckpt.parents[1] / "config.yaml").read_text())
    config["model"]["init_args"]["engine"]["init_args"]["drop_updates"] = True
    (tmp_path / "dropping.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(StaleWeightsError):
        load_checkpoint(ckpt, tmp_path / "dropping.yaml")
    # The probe's tolerance is the run's (weight_sync in its config): a huge one lets the stale engine pass.
    config["model"]["init_args"]["weight_sync"] = {"class_path": "mmsr.sync.WeightSync", "init_args": {"tolerance": 1e3}}
    (tmp_path / "lenient.yaml").write_text(yaml.safe_dump(config))
    assert not torch.equal(load_checkpoint(ckpt, tmp_path / "lenient.yaml").engine.own.model.lm_head.weight,
                           trained.model.lm_head.weight)  # fmt: skip


def test_export_keeps_the_checkpoint_dtype(tmp_path):
    """A bf16 checkpoint of a module that builds its policy in fp32: loaded exactly, exported in bf16
    unless ``--dtype`` asks for another."""
    from mmsr.eval.load import load_checkpoint
    from mmsr.export import main

    ckpt, trained = _run_dir(tmp_path)
    state = torch.load(ckpt, weights_only=False)
    state["state_dict"] = {k: v.to(torch.bfloat16) for k, v in state["state_dict"].items()}
    torch.save(state, ckpt)
    loaded = load_checkpoint(ckpt)
    assert loaded.policy.model.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.policy.model.lm_head.weight, state["state_dict"]["model.lm_head.weight"])
    kept = load_file(main(["--ckpt", str(ckpt), "--out", str(tmp_path / "bf16")]) / "model.safetensors")
    cast = load_file(main(["--ckpt", str(ckpt), "--out", str(tmp_path / "fp32"), "--dtype", "float32"]) / "model.safetensors")
    assert {t.dtype for t in kept.values()} == {torch.bfloat16} and {t.dtype for t in cast.values()} == {torch.float32}


def test_sft_checkpoint_is_exported_and_evaluated(tmp_path):
    """The warm start's checkpoint (``SFTModule``: no ``kl_coef``, an engine that replays its teacher) is
    rebuilt from its run config like a GRPO run's; its policy is evaluated with ``HFEngine``."""
    from mmsr.eval.cli import main as evaluate
    from mmsr.eval.load import load_checkpoint
    from mmsr.export import main as export

    init = {"policy": TINY, **TOOLS, "teacher": {"class_path": "mmsr.demo.teacher.RAGTeacher"},
            "rollout": {"max_rounds": 2, "max_tokens_per_turn": 5, "max_context_tokens": 1500}}  # fmt: skip
    ckpt, trained = _checkpointed(tmp_path, {"class_path": "mmsr.sft.SFTModule", "init_args": init})
    loaded = load_checkpoint(ckpt)
    assert type(loaded.engine) is HFEngine and loaded.settings.max_rounds == 2
    assert torch.equal(loaded.policy.model.lm_head.weight, trained.model.lm_head.weight)
    exported = load_file(export(["--ckpt", str(ckpt), "--out", str(tmp_path / "hf")]) / "model.safetensors")
    assert any(torch.equal(t, trained.model.lm_head.weight) for t in exported.values())  # the trained weights
    summary = evaluate(["--ckpt", str(ckpt), "--data", str(FVQA / "fvqa_dev.jsonl"), "--limit", "1",
                        "--out", str(tmp_path / "o")])  # fmt: skip
    assert summary["fvqa_dev"]["on-demand"]["all"]["n"] == 1


def test_policy_yaml_with_weights(tmp_path, tiny_policy):
    from mmsr.eval.load import load_policy_yaml

    state = {k: v + 1.0 if k.endswith("lm_head.weight") else v for k, v in tiny_policy.model.state_dict().items()}
    torch.save(state, tmp_path / "w.pt")
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump({"policy": TINY}))
    loaded = load_policy_yaml(tmp_path / "policy.yaml", str(tmp_path / "w.pt"))
    assert torch.equal(loaded.policy.model.lm_head.weight, tiny_policy.model.lm_head.weight + 1.0)
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"policy": TINY, "typo": 1}))
    with pytest.raises(ValueError, match="unknown keys \\['typo'\\]"):
        load_policy_yaml(tmp_path / "bad.yaml")


def test_a_workflow_that_searches_without_tools_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    """``--policy`` / ``--model-dir`` without ``--tools``: every search of on-demand and RAG failed ("no image_search
    tool is configured"), reported as a real result with exit status 0. ``direct`` needs no tools."""
    from mmsr.eval import load
    from mmsr.eval.cli import main, parse_args

    data = ["--data", str(FVQA / "fvqa_dev.jsonl"), "--out", str(tmp_path / "out")]
    for source, workflows in ((["--policy", "p.yaml"], ["rag"]), (["--model-dir", "m"], ["direct", "on-demand"])):
        with pytest.raises(SystemExit) as exit_:
            main([*source, *data, "--workflow", *workflows])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and f"--workflow {workflows[-1]} searches, and {source[0]} brings no tools" in err
        assert "give them with --tools" in err
    assert parse_args(["--policy", "p.yaml", *data, "--workflow", "direct"]).workflow == ["direct"]
    (tmp_path / "text.yaml").write_text(yaml.safe_dump({"text_search": TOOLS["text_search"]}))
    with pytest.raises(SystemExit, match=rf"--workflow rag searches with image_search and text_search, but only text_search "
                                         rf"is configured \(--tools {tmp_path / 'text.yaml'}\)"):  # fmt: skip
        main(["--policy", str(tmp_path / "no-policy.yaml"), "--tools", str(tmp_path / "text.yaml"), *data, "--workflow", "rag"])
    # a checkpoint whose run configured no tools (the policy is never needed: the refusal comes first)
    no_tools = load.Loaded(None, None, {"image_search": None, "text_search": None})
    monkeypatch.setattr(load, "load_checkpoint", lambda *a, **k: no_tools)
    with pytest.raises(SystemExit, match=r"on-demand searches with a search tool, but no tool is configured \(the tools of --ckpt"):
        main(["--ckpt", "run.ckpt", *data])


def scripted_evaluation(ckpt) -> tuple[object, list[float]]:
    """``mmsr eval --ckpt ckpt`` on two FVQA questions with a scripted engine: the first searches, then answers
    right; the second answers right with extra words (SubEM's, not EM's). The evaluator and the reward column."""
    from mmsr.data.loaders import load_samples
    from mmsr.eval.cli import build_evaluator, parse_args
    from mmsr.rollout.engine import ScriptedEngine

    argv = ["--ckpt", str(ckpt), "--data", str(FVQA / "fvqa_dev.jsonl"), "--max-tokens-per-turn", "64"]
    evaluator = build_evaluator(parse_args(argv))  # the run's turns of 5 tokens: too short for the script's
    s, r = load_samples(FVQA / "fvqa_dev.jsonl")[:2], "<reason>r</reason>"
    evaluator.engine = ScriptedEngine({s[0].id: [f"{r}<search><img></search>", f"{r}<answer>{s[0].ground_truth}</answer>"],
                                       s[1].id: [f"{r}<answer>the {s[1].ground_truth} (probably)</answer>"]},
                                      evaluator.policy.tokenizer)  # fmt: skip
    return evaluator, [rec.reward for rec in evaluator.run(s, "on-demand", "dev")]


def test_a_checkpoints_reward_column_is_scored_by_the_runs_reward(tmp_path):
    """``mmsr eval --ckpt`` scored the ``reward`` column with a default ``MMSearchR1Reward`` (EM, penalty 0.1), not
    the run's: here SubEM with penalty 0.5, so an answer with extra words scored 0.1 where training gave it 1.0. A
    judged reward is its table (the run's judge is not asked per episode); ``WeightedRewards`` keep their weights."""
    from mmsr.eval.load import load_module, scoring_reward
    from mmsr.reward import MMSearchR1Reward, WeightedRewards
    from mmsr.reward.judge import OpenAIJudge
    from mmsr.reward.judged import JudgedReward

    reward = {"class_path": "mmsr.reward.MMSearchR1Reward", "init_args": {"search_penalty": 0.5, "mode": "SubEM"}}
    ckpt, _ = _run_dir(tmp_path, reward=reward)
    evaluator, rewards = scripted_evaluation(ckpt)
    assert vars(evaluator.reward) == vars(load_module(ckpt).reward) == vars(MMSearchR1Reward(0.5, mode="SubEM"))
    assert rewards == pytest.approx([0.55, 1.0])
    judged = JudgedReward(OpenAIJudge("http://127.0.0.1:1/v1", "m"), search_penalty=0.3, fallback="SubEM")
    assert scoring_reward(judged) is judged.table and vars(judged.table) == vars(MMSearchR1Reward(0.3, mode="SubEM"))
    weighted = scoring_reward(WeightedRewards([judged, MMSearchR1Reward()], [0.5, 2.0]))
    assert weighted.rewards[0] is judged.table and weighted.weights == [0.5, 2.0]


@pytest.mark.parametrize("source, unread", [
    (["--model-dir", "m"], ["--weights", "w.pt"]), (["--ckpt", "run.ckpt"], ["--weights", "w.pt"]),
    (["--policy", "p.yaml"], ["--min-pixels", "3136"]), (["--ckpt", "run.ckpt"], ["--max-pixels", "12544"]),
    (["--model-dir", "m"], ["--run-config", "config.yaml"]),
])  # fmt: skip
def test_an_argument_the_policy_source_does_not_read_is_refused(source, unread, capsys):
    """``--weights`` with ``--model-dir`` evaluated the directory's weights, exit status 0, not a word said; the
    same for ``mmsr curate``, which shares the arguments."""
    from mmsr.eval import curate
    from mmsr.eval.cli import parse_args

    for parse in (lambda argv: parse_args([*argv, "--data", "d.jsonl", "--workflow", "direct"]),
                  lambda argv: curate.main([*argv, "--tools", "t.yaml", "--data", "d.jsonl", "--out", "o.parquet"])):  # fmt: skip
        with pytest.raises(SystemExit) as exit_:
            parse([*source, *unread])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and f"error: {unread[0]} is read only with" in err
        assert f"with {source[0]} it would be ignored" in err


def test_a_limit_below_one_and_a_workflow_given_twice_are_refused(capsys):
    """``--limit -1`` evaluated all but the last question, ``--limit 0`` wrote an empty summary, and ``--workflow
    direct direct`` ran (and counted) every episode twice."""
    from mmsr.eval.cli import parse_args

    base = ["--policy", "p.yaml", "--data", "d.jsonl"]
    for extra, said in ((["--limit", "-1"], "--limit: must be at least 1, got -1"), (["--limit", "0"], "got 0"),
                        (["--workflow", "direct", "rag", "direct"], "--workflow direct is given twice")):  # fmt: skip
        with pytest.raises(SystemExit) as exit_:
            parse_args([*base, "--tools", "t.yaml", *extra])
        assert exit_.value.code == 2 and said in capsys.readouterr().err
    assert parse_args([*base, "--limit", "1", "--workflow", "direct"]).limit == 1
