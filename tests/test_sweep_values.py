"""The values a sweep file gives: range bounds PyYAML reads as strings (``1e-5``, no dot), ``run_cap`` and
``--count`` on every method, and ``null`` values, which reach ``mmsr fit`` as ``--key=None``."""

import re
import sys

import pytest

from mmsr.cli import lightning_cli
from mmsr.sweep import load_sweep, main, parameter_sets
from tests.conftest import ROOT


def write(tmp_path, text: str):
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "spec, dist, lo, hi",
    [
        ("{distribution: log_uniform_values, min: 1e-5, max: 1e-3}", "log_uniform_values", 1e-5, 1e-3),
        ("{distribution: log_uniform_values, min: 1e-4, max: 5e-3}", "log_uniform_values", 1e-4, 5e-3),
        ("{min: 1e-4, max: 0.01}", "uniform", 1e-4, 0.01),
        ("{min: 2, max: 4}", "int_uniform", 2, 4),
    ],
)
def test_range_bounds_are_numbers_whatever_yaml_made_of_them(tmp_path, spec, dist, lo, hi):
    sweep = load_sweep(write(tmp_path, f"method: random\nrun_cap: 20\nparameters:\n  model.lr: {spec}\n"))
    (param,) = sweep.parameters
    assert (param.distribution, param.min, param.max) == (dist, lo, hi)
    assert type(param.min) is type(lo) and type(param.max) is type(hi)  # int_uniform keeps its ints
    drawn = [p["model.lr"] for p in parameter_sets(sweep)]
    assert len(drawn) == 20 and all(lo <= x <= hi for x in drawn)


@pytest.mark.parametrize(
    "spec, error",
    [
        ("{min: abc, max: 1}", "parameter 'model.lr': min 'abc' is not a finite number"),
        ("{min: 0, max: .inf}", "parameter 'model.lr': max inf is not a finite number"),
        ("{min: 0, max: [1]}", "parameter 'model.lr': max [1] is not a finite number"),
        ("{distribution: int_uniform, min: 1, max: 2.5}", "parameter 'model.lr': int_uniform needs whole-number"),
    ],
)
def test_a_bound_that_is_not_a_number_is_refused_naming_the_parameter(tmp_path, spec, error):
    with pytest.raises(ValueError, match=re.escape(error)):
        load_sweep(write(tmp_path, f"method: random\nrun_cap: 2\nparameters:\n  model.lr: {spec}\n"))


GRID = "method: grid\n{cap}parameters:\n  a: {{values: [0.0, 0.001, 0.01]}}\n  b: {{values: [2, 4]}}\n"


@pytest.mark.parametrize("cap, count, runs", [(2, None, 2), (2, 1, 1), (2, 5, 2), (None, 4, 4), (None, None, 6)])
def test_run_cap_and_count_limit_a_grid(tmp_path, cap, count, runs):
    sweep = load_sweep(write(tmp_path, GRID.format(cap=f"run_cap: {cap}\n" if cap else "")))
    assert parameter_sets(sweep, count) == [{"a": a, "b": b} for a in (0.0, 0.001, 0.01) for b in (2, 4)][:runs]


def test_count_beyond_run_cap_draws_run_cap_random_runs(tmp_path):
    sweep = load_sweep(write(tmp_path, "method: random\nrun_cap: 3\nparameters:\n  a: {min: 0.0, max: 1.0}\n"))
    assert len(parameter_sets(sweep, count=10)) == 3 and len(parameter_sets(sweep, count=2)) == 2


@pytest.mark.parametrize("count", ["0", "-1"])
def test_a_count_below_one_is_a_usage_error(tmp_path, capsys, count):
    path = write(tmp_path, GRID.format(cap=""))
    with pytest.raises(SystemExit) as exit_:
        main([str(path), "--dry-run", "--count", count])
    assert exit_.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.strip().splitlines()[-1] == f"mmsr sweep: error: --count {count}: the number of runs, at least 1"


@pytest.mark.parametrize("cap", ["0", "-2", "2.5", "many"])
def test_a_run_cap_that_is_not_a_positive_whole_number_is_refused(tmp_path, cap):
    with pytest.raises(ValueError, match=re.escape(f"run_cap {cap!r}" if cap == "many" else f"run_cap {cap}")):
        load_sweep(write(tmp_path, GRID.format(cap=f"run_cap: {cap}\n")))


NULLS = "method: grid\nparameters:\n  model.clip_ratio_c: {{values: [null, 3.0]}}\ncommand: [x, {macro}]\n"


@pytest.mark.parametrize("macro", ["${args}", "${args_no_equals}", "${args_no_hyphens}", "${args_no_boolean_flags}"])
def test_a_null_value_written_as_none_is_refused_naming_the_parameter(tmp_path, macro):
    error = f"parameter 'model.clip_ratio_c': a null value is written --model.clip_ratio_c=None by {macro}"
    with pytest.raises(ValueError, match=re.escape(error)):
        load_sweep(write(tmp_path, NULLS.format(macro=f"'{macro}'")))
    with pytest.raises(ValueError, match=re.escape("--model.clip_ratio_c=None by ${args}")):  # wandb's default command
        load_sweep(write(tmp_path, "method: grid\nparameters:\n  model.clip_ratio_c: {value: null}\n"))


def test_a_null_value_passes_where_the_command_writes_json(tmp_path):
    sweep = load_sweep(write(tmp_path, NULLS.format(macro="'${args_json}'")))
    assert parameter_sets(sweep) == [{"model.clip_ratio_c": None}, {"model.clip_ratio_c": 3.0}]


def test_mmsr_fit_refuses_none_as_wandbs_agent_writes_it(monkeypatch, capsys):
    """Why a null value is refused: ``str(None)`` is not a value jsonargparse takes (``null`` is, but wandb's
    agent writes ``None``, and the offline runner writes what the agent writes)."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["mmsr"])
    with pytest.raises(SystemExit) as exit_:
        lightning_cli(["-c", "configs/smoke.yaml", "--model.clip_ratio_c=None"], parse_only=True, run=False)
    assert exit_.value.code == 2 and "clip_ratio_c" in capsys.readouterr().err
