"""``mmsr fit``'s last line names the file or key at fault: a config file's YAML syntax error (jsonargparse said
``in "<unicode string>"``), an empty ``init_args:``, a step of 0 prompts or a group of 0 (blamed on
``model.mini_batches``), a seed out of numpy's range."""

import re

import pytest
import yaml

from mmsr.cli import lightning_cli
from tests.conftest import ROOT
from tests.test_cli_inputs import BUILT, fit  # noqa: F401 - the fixture, shared

SMOKE = str(ROOT / "configs" / "smoke.yaml")
REWARD = "mmsr.reward.MMSearchR1Reward"


def _last_parse_error(capsys, *args) -> str:
    with pytest.raises(SystemExit) as exit_:
        lightning_cli(["fit", *args, "--print_config"])
    assert exit_.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize(("text", "last"), [
    ("model:\n  init_args:\n    top_k: [5\n    kl_coef: 0.1\n",
     "4:12: YAML syntax: did not find expected ',' or ']' (while parsing a flow sequence at 3:12)"),
    ("model:\n  init_args:\n    top_k: 5\n\tkl_coef: 0.1\n",
     "4:1: YAML syntax: found a tab character that violates indentation (while scanning a plain scalar at 3:12)"),
    ("model:\n  init_args:\n    top_k 5\n    kl_coef: 0.1\n",
     "4:12: YAML syntax: mapping values are not allowed in this context"),
])  # fmt: skip
def test_a_yaml_syntax_error_names_the_file_line_and_column(text, last, tmp_path, monkeypatch, capsys):
    """The second of two ``-c`` files is broken: the last line says which, where, and what."""
    monkeypatch.chdir(ROOT)
    snippet = tmp_path / "snippet.yaml"
    snippet.write_text(text)
    assert _last_parse_error(capsys, "-c", SMOKE, "-c", str(snippet)) == f"error: {snippet}:{last}"
    assert _last_parse_error(capsys, "-c", SMOKE, f"--config={snippet}") == f"error: {snippet}:{last}"
    monkeypatch.chdir(tmp_path)  # a relative path: jsonargparse parses it from the smoke config's folder
    assert _last_parse_error(capsys, "-c", SMOKE, "-c", "snippet.yaml") == f"error: snippet.yaml:{last}"


@pytest.mark.parametrize(("override", "key"), [
    ({"reward": {"class_path": REWARD, "init_args": None}}, "model.init_args.reward.init_args"),
    ({"engine": {"class_path": "mmsr.rollout.hf_engine.HFEngine", "init_args": None}},
     "model.init_args.engine.init_args"),
])  # fmt: skip
def test_an_empty_init_args_names_its_key(override, key, tmp_path, monkeypatch, capsys):
    """``init_args:`` with nothing under it is YAML's null: jsonargparse said ``'NoneType' object has no attribute
    'keys'`` under the class_path."""
    monkeypatch.chdir(ROOT)
    snippet = tmp_path / "snippet.yaml"
    snippet.write_text(yaml.safe_dump({"model": {"init_args": override}}))
    last = _last_parse_error(capsys, "-c", SMOKE, "-c", str(snippet))
    assert last == f"error: {key} is empty: remove it or give arguments"


@pytest.mark.parametrize(("flags", "message"), [
    (("--model.init_args.num_generations", "0"), "GRPOModule: num_generations=0 (must be >= 2, the GRPO group size)"),
    (("--data.prompts_per_step", "0"), "MMSRDataModule: prompts_per_step=0 (must be >= 1)"),
    (("--seed_everything", "-1"), "seed_everything=-1: must be 0..2**32-1, or true for a random seed"),
    (("--seed_everything", str(2**32)), f"seed_everything={2**32}: must be 0..2**32-1, or true for a random seed"),
])  # fmt: skip
def test_a_count_or_seed_out_of_range_names_its_own_key(fit, flags, message):
    """Not ``model.mini_batches=1 ... lower model.mini_batches`` (a step of 0 episodes), not numpy's bounds."""
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        fit(*flags)


def test_a_seed_in_range_or_true_passes(fit):
    for seed in ("0", str(2**32 - 1), "true"):
        with pytest.raises(Exception, match=BUILT):
            fit("--seed_everything", seed)




def scaled_reward(trajectory, sample, scale: float = 1.0) -> float:
    """A reward that is a function, for the class_path below."""
    return scale


@pytest.mark.parametrize(("override", "key"), [
    ({"reward": {"class_path": "tests.test_cli_messages.scaled_reward", "init_args": {"scale": 3.0}}},
     "model.init_args.reward."),
    ({"tools": [{"class_path": REWARD}, {"class_path": "tests.test_cli_messages.scaled_reward",
                                         "init_args": {"scale": 3.0}}]}, "model.init_args.tools[1]."),
])  # fmt: skip
def test_a_function_given_init_args_is_refused_naming_file_and_key(override, key, tmp_path, monkeypatch):
    """jsonargparse passed the function and dropped ``scale`` without a word (the parsed config said only
    ``reward: tests.test_cli_messages.scaled_reward``): the run scored with ``scale=1.0``."""
    monkeypatch.chdir(ROOT)
    snippet = tmp_path / "snippet.yaml"
    snippet.write_text(yaml.safe_dump({"model": {"init_args": override}}))
    message = (f"{snippet}: {key}class_path tests.test_cli_messages.scaled_reward is a function, not a class: its "
               "init_args (scale) would be dropped; give a class whose __init__ takes them")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        lightning_cli(["fit", "-c", SMOKE, "-c", str(snippet), "--print_config"])


def test_a_function_without_init_args_is_a_reward_as_meant(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    snippet = tmp_path / "snippet.yaml"
    snippet.write_text(yaml.safe_dump({"model": {"init_args": {"reward": {
        "class_path": "tests.test_cli_messages.scaled_reward"}}}}))
    with pytest.raises(SystemExit) as exit_:
        lightning_cli(["fit", "-c", SMOKE, "-c", str(snippet), "--print_config"])
    assert exit_.value.code == 0
    assert "reward: tests.test_cli_messages.scaled_reward" in capsys.readouterr().out
