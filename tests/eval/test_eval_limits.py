"""``mmsr eval``'s episode limits and tool budgets: a Hugging Face directory was evaluated with the CPU-sized
``RolloutSettings()`` (256 tokens a turn in a 4096-token context, 30 s a tool call) where the paper samples 2048
tokens a turn within 6144, with no way to set them; and tools whose nested timeouts cannot fit the per-call cap,
which ``mmsr fit`` refuses (``check_budgets``), were evaluated, every call timing out."""

from __future__ import annotations

import pytest
import yaml

from mmsr.eval import load
from mmsr.eval.cli import load_from_args, parse_args, parser
from mmsr.rollout.loop import RolloutSettings
from mmsr.tools.budget import BudgetError
from tests.conftest import FVQA, ROOT

RECIPES = sorted((ROOT / "configs" / "mmsearch_r1").glob("*.yaml"))
WEB_TEXT = str(ROOT / "configs" / "tools" / "web_text_search.yaml")  # one attempt of its stages: 111 s
DATA = ["--data", str(FVQA / "fvqa_dev.jsonl")]


def _recipe_rollout(path) -> dict:
    return yaml.safe_load(path.read_text())["model"]["init_args"]["rollout"]


def _fields(settings: RolloutSettings, keys) -> dict:
    return {k: getattr(settings, k) for k in keys}


@pytest.fixture
def no_load(monkeypatch):
    """Every policy source loads nothing (a ``--ckpt``'s run: ``RolloutSettings()``, 30 s a tool call); the limits
    and tools are ``load_from_args``' alone."""
    loaded = lambda *args, **kwargs: load.Loaded(policy=None, engine=None)  # noqa: E731
    for name in ("load_model_dir", "load_policy_yaml", "load_checkpoint"):
        monkeypatch.setattr(load, name, loaded)


def test_a_model_dir_is_evaluated_with_the_papers_limits(tmp_path, tiny_policy):
    model_dir = tmp_path / "hf"
    tiny_policy.model.save_pretrained(model_dir)
    tiny_policy.tokenizer.save_pretrained(model_dir)
    settings = load_from_args(parse_args(["--model-dir", str(model_dir), *DATA, "--workflow", "direct"])).settings
    assert RECIPES and all(_fields(settings, _recipe_rollout(p)) == _recipe_rollout(p) for p in RECIPES)
    assert (settings.max_tokens_per_turn, settings.max_context_tokens, settings.max_rounds) == (2048, 6144, 3)
    assert (settings.image_search_limit, settings.text_search_limit) == (1, 2)
    help_text = " ".join(parser().format_help().split())
    assert "--rollout YAML" in help_text and "2048 tokens a turn within a 6144-token context" in help_text


def test_rollout_gives_the_limits_of_a_model_dir_or_a_policy(tmp_path, no_load):
    mapping = tmp_path / "limits.yaml"
    mapping.write_text(yaml.safe_dump({"max_tokens_per_turn": 512, "max_context_tokens": 3000, "tool_timeout_s": 45}))
    got = load_from_args(parse_args(["--policy", "p.yaml", "--rollout", str(mapping), "--max-rounds", "2", *DATA,
                                     "--workflow", "direct"])).settings  # fmt: skip
    assert got == RolloutSettings(max_rounds=2, max_tokens_per_turn=512, max_context_tokens=3000, tool_timeout_s=45)
    for recipe in RECIPES:  # a run config: its model.init_args.rollout
        got = load_from_args(parse_args(["--model-dir", "m", "--rollout", str(recipe), *DATA, "--workflow", "direct"]))
        assert _fields(got.settings, _recipe_rollout(recipe)) == _recipe_rollout(recipe)
    bare = tmp_path / "run.yaml"  # a run config without rollout ran with the module's default
    bare.write_text(yaml.safe_dump({"model": {"class_path": "mmsr.module.GRPOModule", "init_args": {"num_generations": 2}}}))
    assert load_from_args(parse_args(["--model-dir", "m", "--rollout", str(bare), *DATA, "--workflow", "direct"])).settings \
        == RolloutSettings()  # fmt: skip
    # without --rollout, a policy YAML (a TinyQwen2_5_VL on CPU) keeps RolloutSettings(), as before
    assert load_from_args(parse_args(["--policy", "p.yaml", *DATA, "--workflow", "direct"])).settings == RolloutSettings()


def test_a_wrong_rollout_file_names_itself_and_rollout_with_ckpt_is_refused(tmp_path, no_load, capsys):
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(yaml.safe_dump({"max_token_per_turn": 512}))
    with pytest.raises(ValueError, match=rf"{wrong}: rollout: .*max_token_per_turn"):
        load_from_args(parse_args(["--model-dir", "m", "--rollout", str(wrong), *DATA, "--workflow", "direct"]))
    wrong.write_text(yaml.safe_dump({"max_rounds": 0}))
    with pytest.raises(ValueError, match=rf"{wrong}: rollout: RolloutSettings: max_rounds=0"):
        load_from_args(parse_args(["--model-dir", "m", "--rollout", str(wrong), *DATA, "--workflow", "direct"]))
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--ckpt", "run.ckpt", "--rollout", str(wrong), *DATA, "--workflow", "direct"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--rollout is read only with --model-dir or --policy; with --ckpt it" in err


@pytest.mark.parametrize("source, cap, where", [
    (["--policy", "never-loaded.yaml"], 30, "--policy's default"),
    (["--model-dir", "never-loaded"], 60, "--rollout "),
])  # fmt: skip
def test_tools_that_cannot_fit_the_cap_are_refused_before_the_policy_loads(source, cap, where, tmp_path, monkeypatch):
    """As ``mmsr fit`` refuses them (``GRPOModule``), and ``mmsr curate`` too, which shares the arguments."""
    from mmsr.eval import curate

    monkeypatch.setenv("SERPER_API_KEY", "unused")  # the web tool is built, never called
    monkeypatch.setattr(load, "load_model_dir", lambda *a: pytest.fail("the model loaded before the budget check"))
    rollout = tmp_path / "limits.yaml"
    rollout.write_text(yaml.safe_dump({"tool_timeout_s": cap}))
    argv = [*source, *(["--rollout", str(rollout)] if cap != 30 else []), "--tools", WEB_TEXT, *DATA]
    said = rf"WebTextSearch cannot fit the per-call cap rollout.tool_timeout_s={cap} s.*mmsr eval: the cap is {where}"
    with pytest.raises(BudgetError, match=said):
        load_from_args(parse_args([*argv, "--workflow", "on-demand"]), ["on-demand"])
    with pytest.raises(BudgetError, match=said):
        curate.main([*argv, "--out", str(tmp_path / "curated.parquet")])


def test_the_papers_cap_fits_the_web_tools_and_a_ckpts_is_checked_once_loaded(monkeypatch, no_load):
    monkeypatch.setenv("SERPER_API_KEY", "unused")
    loaded = load_from_args(parse_args(["--model-dir", "m", "--tools", WEB_TEXT, *DATA]), ["on-demand"])
    assert loaded.settings.tool_timeout_s == 120 and loaded.tools["text_search"] is not None  # 111 s fits
    with pytest.raises(BudgetError, match=r"tool_timeout_s=30 s.*the cap is --ckpt's run's"):
        load_from_args(parse_args(["--ckpt", "run.ckpt", "--tools", WEB_TEXT, *DATA]), ["on-demand"])



def test_a_model_dir_mmsr_did_not_export_takes_the_recipes_image_bounds_and_an_export_its_own(tmp_path, tiny_policy):
    """``--model-dir`` ran the paper's episode limits with the directory's own image bounds: Qwen2.5-VL-7B-Instruct's
    3,136 to 12.8M pixels gave a 2400x1800 photo 5,504 tokens of the 6,144-token context, not the recipes' 1,131."""
    import json

    from PIL import Image

    from mmsr.eval.load import load_model_dir
    from mmsr.models.build import POLICY_RECORD, save_policy

    export, foreign = tmp_path / "export", tmp_path / "foreign"
    save_policy(tiny_policy, export)
    save_policy(tiny_policy, foreign)
    (foreign / POLICY_RECORD).unlink()  # as a checkpoint from the hub
    cfg = json.loads((foreign / "preprocessor_config.json").read_text())
    cfg.update(min_pixels=3136, max_pixels=12845056, size={"shortest_edge": 3136, "longest_edge": 12845056})
    (foreign / "preprocessor_config.json").write_text(json.dumps(cfg))
    photo = Image.new("RGB", (2400, 1800), "red")

    def tokens(path, *bounds):
        return load_model_dir(str(path), *bounds).policy.process_image(photo).num_tokens

    assert tokens(foreign) == tokens(foreign, 512 * 512, 1152 * 28 * 28) == 1131
    assert tokens(foreign, None, 12845056) == 5504  # a bound given: the directory's other one
    assert tokens(export) == tiny_policy.process_image(photo).num_tokens <= 16  # as trained (its 112*112 pixels)
