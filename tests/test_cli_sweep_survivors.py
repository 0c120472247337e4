"""What the start-up checks, the error lines and the sweep runner promise, called in-process: a step of exactly one
episode per update, a GRPO group of one, a cosine schedule as long as the run, a function without init_args;
jsonargparse's nested errors read by indent, a list's item found by its class_path, a type mismatch that is not
the reason; a sweep's probabilities, ranges, envvars (as wandb's agent reads them), a run a signal killed and the
runs' group."""

import re
import sys
import warnings

import pytest
import yaml
from jsonargparse import Namespace

import mmsr.sweep as sweep_module
from mmsr.cli_checks import check_counts, check_schedule_length, check_step_settings, refuse_function_init_args
from mmsr.cli_errors import config_files, config_syntax_line, parse_error_line
from mmsr.sweep import command_for, load_sweep, main
from tests.test_sweep_values import write

GRPO = "mmsr.module.GRPOModule"


def step_config(mini: int, prompts: int, group: int) -> Namespace:
    """An ``mmsr fit`` config reduced to the keys ``check_step_settings`` reads."""
    init = Namespace(mini_batches=mini, num_generations=group)
    return Namespace(model=Namespace(class_path=GRPO, init_args=init), data=Namespace(prompts_per_step=prompts),
                     trainer=Namespace(max_steps=4, devices=1))  # fmt: skip


def test_one_episode_per_update_passes_and_fewer_is_refused():
    check_step_settings(step_config(mini=8, prompts=2, group=4))  # 8 updates of one episode each
    with pytest.raises(ValueError, match=r"model.mini_batches=9 .* 2 x 4 = 8 episodes"):
        check_step_settings(step_config(mini=9, prompts=2, group=4))


def test_a_group_of_one_is_refused_at_start_up():
    """GRPO's advantage is a reward less its group's mean: a group of one has advantage 0, nothing to learn."""
    with pytest.raises(ValueError, match=re.escape("GRPOModule: num_generations=1 (must be >= 2, the GRPO group size)")):
        check_counts(GRPO, 1, 2)
    check_counts(GRPO, 2, 1)


COSINE = {"lr_schedule": "cosine"}


def test_a_run_that_ends_part_way_through_a_step_counts_that_step():
    """5 updates of 2 a step: Lightning ends the third step's updates before it stops, 3 training steps."""
    init = {**COSINE, "mini_batches": 2, "total_steps": 2}
    with pytest.raises(ValueError, match=re.escape("model.total_steps=2 < 3 training steps (trainer.max_steps=5")):
        check_schedule_length(init, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # as long as the run: neither refused nor warned
        check_schedule_length({**init, "total_steps": 3}, 5)


def test_ppo_epochs_count_in_a_steps_updates():
    """2 epochs x 1 mini-batch: trainer.max_steps=4 is 2 training steps."""
    init = {**COSINE, "ppo_epochs": 2, "mini_batches": 1, "total_steps": 1}
    message = "model.total_steps=1 < 2 training steps (trainer.max_steps=4 optimizer updates, 2 a step: model.ppo_epochs"
    with pytest.raises(ValueError, match=re.escape(message)):
        check_schedule_length(init, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_schedule_length({**init, "total_steps": 2}, 4)


def test_a_function_given_empty_init_args_is_a_reward_as_meant(tmp_path):
    """``init_args: {}`` drops nothing: only a function given arguments is refused."""
    reward = {"class_path": "tests.test_cli_messages.scaled_reward", "init_args": {}}
    (tmp_path / "snippet.yaml").write_text(yaml.safe_dump({"model": {"init_args": {"reward": reward}}}))
    refuse_function_init_args(["-c", "snippet.yaml"], str(tmp_path))
    reward["init_args"] = {"scale": 3.0}
    (tmp_path / "snippet.yaml").write_text(yaml.safe_dump({"model": {"init_args": {"reward": reward}}}))
    with pytest.raises(ValueError, match=r"init_args \(scale\) would be dropped"):
        refuse_function_init_args(["-c", "snippet.yaml"], str(tmp_path))


# jsonargparse's nested errors as it writes them (indents, "- " alternatives), reduced to the lines read
SIBLINGS = """Parser key "rollout":
  Parser key "max_round":
    Expected a <class 'int'>. Got value: x
  Parser key "image_search_limit":
    Expected a <class 'int'>. Got value: two
"""
TYPE_MISMATCH = """Parser key "model":
  Does not validate against any of the Union subtypes
  Subtypes: [<class 'lightning.pytorch.core.module.LightningModule'>, <class 'NoneType'>]
  Errors:
    - Problem with given class_path 'mmsr.module.GRPOModule':
        Parser key "engine":
          Does not validate against any of the Union subtypes
          Subtypes: [<class 'mmsr.rollout.engine.Engine'>, <class 'NoneType'>]
          Errors:
            - Import path does not implement protocol Engine
            - Expected a <class 'NoneType'>
          Given value type: <class 'str'>
          Given value: mmsr.tools.spec.Tool
    - Expected a <class 'NoneType'>
  Given value type: <class 'dict'>
  Given value: {'init_args': {'engine': 'mmsr.tools.spec.Tool'}}
"""
LOGGER = "mmsr.callbacks.trajectory_logger.TrajectoryLogger"


def list_item_error(first: str) -> str:
    """A logger's bad argument in the list ``[{class_path: first}, {class_path: LOGGER}]``."""
    given = ", ".join(f"{{'class_path': '{c}', 'init_args': {{}}}}" for c in (first, LOGGER))
    return (f'Parser key "trainer.callbacks":\n  Does not validate against any of the Union subtypes\n  Errors:\n'
            f"    - Problem with given class_path '{LOGGER}':\n        Parser key \"every_n_steps\":\n"
            f"          Expected a <class 'int'>. Got value: x\n    - Expected a <class 'NoneType'>\n"
            f"  Given value type: <class 'list'>\n  Given value: [{given}]\n")  # fmt: skip


def test_a_key_after_its_sibling_is_not_read_as_nested_in_it():
    """Keys at one indent are siblings: the first is reported (its error is the first), not ``max_round.image_...``."""
    assert parse_error_line(SIBLINGS) == "rollout.max_round: expected int, given x"


def test_a_type_mismatch_alternative_does_not_hide_the_reason():
    """``- Expected a <class 'NoneType'>`` is the union's ``None``: the other alternative is the reason."""
    assert parse_error_line(TYPE_MISMATCH) == "model.init_args.engine: Import path does not implement protocol Engine"


@pytest.mark.parametrize(("item", "index"), [("lightning.pytorch.callbacks.ModelCheckpoint", "1"), (LOGGER, "?")])
def test_a_list_item_is_named_by_index_only_when_one_item_has_its_class_path(item, index):
    key = f"trainer.callbacks[{index}].init_args.every_n_steps"
    assert parse_error_line(list_item_error(item)) == f"{key}: expected int, given x"


def test_a_yaml_syntax_error_in_a_file_given_with_config_spelled_out_names_the_file(tmp_path):
    (tmp_path / "snippet.yaml").write_text("model:\n  init_args:\n    top_k 5\n    kl_coef: 0.1\n")
    args = ["-c", "ok.yaml", "--config", "snippet.yaml", "--trainer.max_steps", "1"]
    assert config_files(args) == ["ok.yaml", "snippet.yaml"]
    line = config_syntax_line("Problems parsing config: ...", args, str(tmp_path))
    assert line == "snippet.yaml:4:12: YAML syntax: mapping values are not allowed in this context"


RANGE = "method: random\nrun_cap: 2\n{extra}parameters:\n  model.lr: {spec}\n"


@pytest.mark.parametrize(("spec", "error"), [
    ("{values: [a, b], probabilities: [true, false]}", "'probabilities' [True, False] must be numbers >= 0"),
    ("{min: 0, max: 1, distribution: categorical}",
     "distribution 'categorical' is not supported offline (supported: uniform, int_uniform, log_uniform_values)"),
    ("{min: 0.5, max: 1, distribution: constant}",
     "distribution 'constant' is not supported offline (supported: uniform, int_uniform, log_uniform_values)"),
    ("{min: 0, max: 1, distribution: log_uniform_values}", "need 0 < min < max for log_uniform_values"),
])  # fmt: skip
def test_a_parameter_wandb_would_read_otherwise_is_refused(tmp_path, spec, error):
    """A YAML ``true`` is not a weight of 1; a range is not a list of values, and the ranges offered are those a
    range takes; a log scale starts above 0."""
    with pytest.raises(ValueError, match=f"parameter 'model.lr': {re.escape(error)}"):
        load_sweep(write(tmp_path, RANGE.format(extra="", spec=spec)))


def test_probabilities_that_sum_to_one_in_floating_point_pass(tmp_path):
    """Ten times 0.1 is 0.9999999999999999."""
    spec = f"{{values: {list(range(10))}, probabilities: {[0.1] * 10}}}"
    (param,) = load_sweep(write(tmp_path, RANGE.format(extra="", spec=spec))).parameters
    assert param.probabilities == (0.1,) * 10


def test_a_range_with_one_fractional_bound_is_uniform(tmp_path):
    (param,) = load_sweep(write(tmp_path, RANGE.format(extra="", spec="{min: 1, max: 2.5}"))).parameters
    assert (param.distribution, param.min, param.max) == ("uniform", 1, 2.5)


def test_early_terminate_is_refused_offline(tmp_path):
    extra = "early_terminate: {type: hyperband, min_iter: 3}\n"
    with pytest.raises(ValueError, match="early_terminate needs the wandb server"):
        load_sweep(write(tmp_path, RANGE.format(extra=extra, spec="{min: 0.1, max: 0.2}")))


def test_envvars_are_filled_as_wandbs_agent_fills_them(tmp_path, monkeypatch):
    """An unset variable is its name; a lowercase name is not a variable to wandb's agent: left as written."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command

    monkeypatch.setenv("MMSR_TEST_SET", "from-env")
    monkeypatch.delenv("MMSR_TEST_UNSET", raising=False)
    monkeypatch.setenv("mmsr_test_lower", "from-env-lower")
    chunks = ["--a=${envvar:MMSR_TEST_SET}", "--b=${envvar:MMSR_TEST_UNSET}", "--c=${envvar:mmsr_test_lower}"]
    sweep = load_sweep(write(tmp_path, f"method: grid\nparameters: {{a: {{value: 1}}}}\ncommand: {chunks!r}"))
    assert command_for(sweep, {"a": 1}) == create_sweep_command(list(chunks))
    assert command_for(sweep, {"a": 1}) == ["--a=from-env", "--b=MMSR_TEST_UNSET", "--c=${envvar:mmsr_test_lower}"]


def test_a_lowercase_envvar_alone_is_an_unknown_macro(tmp_path):
    """wandb's agent drops a ``${...}`` chunk it does not know without a word; the runner refuses it."""
    sweep = load_sweep(write(tmp_path, "method: grid\nparameters: {a: {value: 1}}\ncommand: [x, '${envvar:lower}']"))
    with pytest.raises(ValueError, match=re.escape("unknown command macro ${envvar:lower}")):
        command_for(sweep, {"a": 1})


def test_a_run_killed_by_a_signal_fails_the_sweep(tmp_path, capsys):
    """Its return code is minus the signal's number."""
    kill = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"]
    path = write(tmp_path, f"method: grid\nparameters: {{a: {{value: 1}}}}\ncommand: {kill!r}")
    with pytest.raises(SystemExit) as exit_:
        main([str(path)])
    assert exit_.value.code == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"mmsr sweep: 1 of 1 runs of {path} failed"


def test_every_run_shares_a_group_named_after_the_sweep(tmp_path, monkeypatch):
    """``WANDB_RUN_GROUP`` is ``sweep-<name>-<time>``, the file's ``name``; arguments after ``--`` end each command."""
    ran = []
    monkeypatch.setattr(sweep_module, "_run", lambda cmd, env, tag: ran.append((cmd, env["WANDB_RUN_GROUP"])) or 0)
    path = write(tmp_path, "name: kl-group\nmethod: grid\nparameters: {a: {values: [1, 2]}}\ncommand: [x, '${args}']")
    assert main([str(path), "--", "--trainer.max_steps", "1"]) == 0
    assert [cmd for cmd, _ in ran] == [["x", f"--a={a}", "--trainer.max_steps", "1"] for a in (1, 2)]
    assert ran[0][1] == ran[1][1] and re.fullmatch(r"sweep-kl-group-\d{8}-\d{6}", ran[0][1])
