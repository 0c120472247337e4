"""Malformed sweep files: a string or mapping where a list belongs is refused rather than split into
characters or keys, scalars and YAML syntax errors end in one line naming the file (and key), a command whose
program cannot start fails that run only, and the module's example names a sweep file that exists."""

import re

import pytest

import mmsr.sweep
from mmsr.sweep import load_sweep, main
from tests.conftest import ROOT


def write(tmp_path, text: str):
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    return path


LIST = "must be a YAML list ([a, b] or one '- item' a line)"


@pytest.mark.parametrize(
    "text, error",
    [
        ("parameters: {m.engine: {values: mmsr.rollout.hf_engine.HFEngine}}", f"parameter 'm.engine': 'values' {LIST}"),
        ("parameters: {a: {values: {x: 1, y: 2}}}", f"parameter 'a': 'values' {LIST}, got dict"),
        ("parameters: {a: {values: 0.001}}", f"parameter 'a': 'values' {LIST}, got float 0.001"),
        ("parameters: {a: {values: null}}", f"parameter 'a': 'values' {LIST}, got NoneType"),
        ("parameters: {a: {values: [1, 2], probabilities: 0.5}}", f"parameter 'a': 'probabilities' {LIST}"),
        ("parameters: {a: {values: [1, 2], probabilities: '0.5 0.5'}}", f"parameter 'a': 'probabilities' {LIST}"),
        ("parameters: {a: {values: [1, 2], probabilities: [x, y]}}", "parameter 'a': 'probabilities' ['x', 'y'] must be numbers"),
        ("parameters: {a: {values: [1, 2], probabilities: [2, -1]}}", "parameter 'a': 'probabilities' [2, -1] must be numbers >= 0"),
        ("parameters: {a: {value: 1}}\ncommand: python -m mmsr fit ${args}", f"'command' {LIST}, got str 'python -m"),
        ("parameters: {a: {value: 1}}\ncommand: {a: b}", f"'command' {LIST}, got dict"),
        ("parameters: {a: {value: 1}}\ncommand: []", "'command' is empty; leave it out"),
    ],
)
def test_a_value_that_is_not_a_list_is_refused_naming_the_file_and_key(tmp_path, capsys, text, error):
    path = write(tmp_path, f"method: random\nrun_cap: 2\n{text}\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}: {error}")):
        load_sweep(path)
    with pytest.raises(SystemExit) as exit_:
        main([str(path), "--dry-run"])
    lines = capsys.readouterr()
    assert exit_.value.code == 2 and lines.out == ""  # nothing is run, not even a character's worth
    assert lines.err.splitlines()[-1].startswith(f"mmsr sweep: error: {path}: {error}")


def test_a_yaml_syntax_error_names_the_file_on_one_last_line(tmp_path, capsys):
    path = write(tmp_path, "method: grid\nparameters:\n  a:\n    values: [0.0]\nrun_cap: 2\n  bad_indent: 1\n")
    with pytest.raises(SystemExit) as exit_:
        main([str(path), "--dry-run"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "<unicode string>" not in err and "^" not in err
    assert err.splitlines() == [f"mmsr sweep: error: {path}: not valid YAML at line 6, column 13: mapping values are not allowed here"]


def test_a_program_that_cannot_start_fails_its_run_and_the_sweep_goes_on(tmp_path, capsys):
    command = "[mmsr_not_on_path_xyz, fit, '${args}']"
    path = write(tmp_path, f"method: grid\nparameters: {{a: {{values: [1, 2]}}}}\ncommand: {command}\n")
    with pytest.raises(SystemExit) as exit_:
        main([str(path)])
    out, err = capsys.readouterr()
    assert exit_.value.code == 1
    assert "[1/2] exit code 127" in out and "[2/2] exit code 127" in out  # run 2 was tried after run 1 failed
    assert "[1/2] cannot start mmsr_not_on_path_xyz: No such file or directory" in err
    assert err.splitlines()[-1] == f"mmsr sweep: 2 of 2 runs of {path} failed"


def test_the_docstring_example_names_a_sweep_file_that_exists():
    examples = re.findall(r"mmsr sweep (configs/\S+\.yaml)", mmsr.sweep.__doc__)
    assert examples and all((ROOT / e).is_file() for e in examples), examples
