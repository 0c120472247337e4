"""Sweeps: configs/sweeps/*.yaml expand into `mmsr fit` commands whose dotted keys land on the right
arguments, the local runner fills wandb's command macros like wandb's agent, and a two-parameter
sweep runs end to end offline."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mmsr.cli import lightning_cli
from mmsr.report.records import read_records
from mmsr.sweep import command_for, load_sweep, main, parameter_sets
from tests.conftest import ROOT, subprocess_env

SWEEPS = sorted((ROOT / "configs" / "sweeps").glob("*.yaml"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    return path


def test_grid_is_every_combination_and_random_draws_are_seeded_and_in_range(tmp_path):
    grid = load_sweep(write(tmp_path, "method: grid\nparameters:\n  a: {values: [1, 2]}\n  b: {values: [x, y, z]}\n  c: {value: 7}\n"))
    assert parameter_sets(grid) == [{"a": a, "b": b, "c": 7} for a in (1, 2) for b in "xyz"]
    assert parameter_sets(grid, count=2) == [{"a": 1, "b": "x", "c": 7}, {"a": 1, "b": "y", "c": 7}]
    spec = """method: random
run_cap: 50
parameters:
  lr: {distribution: log_uniform_values, min: 1.0e-5, max: 1.0e-1}
  n: {min: 2, max: 4}
  clip: {min: 0.1, max: 0.3}
  kind: {values: [a, b], probabilities: [0.0, 1.0]}
"""
    rand = load_sweep(write(tmp_path, spec))
    runs = parameter_sets(rand, seed=3)
    assert len(runs) == 50 and runs == parameter_sets(rand, seed=3) != parameter_sets(rand, seed=4)
    assert all(1e-5 <= r["lr"] <= 1e-1 and r["n"] in (2, 3, 4) and 0.1 <= r["clip"] <= 0.3 and r["kind"] == "b" for r in runs)
    assert {r["n"] for r in runs} == {2, 3, 4}
    assert min(r["lr"] for r in runs) < 1e-3 < max(r["lr"] for r in runs)  # log scale: small values are drawn


@pytest.mark.parametrize(
    "text, error",
    [
        ("method: bayes\nparameters: {a: {values: [1]}}", "bayes needs the wandb server"),
        ("method: grid\nparameters: {a: {min: 0, max: 1}}", "grid search needs 'value' or 'values'"),
        ("method: random\nparameters: {a: {min: 0, max: 1, distribution: q_normal}}", "'q_normal' is not supported"),
        ("method: random\nparameters: {a: {parameters: {b: {value: 1}}}}", "name it by its dotted key"),
        ("method: random\nparameters: {a: {values: [1]}}", "runs forever: give --count or run_cap"),
        ("method: grid\nparameters: {a: {values: [1]}}\ncommand: [x, '${nope}']", "unknown command macro ${nope}"),
    ],
)
def test_bad_sweep_files_are_refused_with_the_reason(tmp_path, text, error):
    with pytest.raises(ValueError, match=re.escape(error)):
        sweep = load_sweep(write(tmp_path, text))
        command_for(sweep, parameter_sets(sweep)[0])


def test_command_macros_match_wandbs_agent(tmp_path, monkeypatch):
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    params = {"model.kl_coef": 0.001, "model.num_generations": 4, "trainer.fast": True, "trainer.slow": False, "x": "a b"}
    macros = ["args", "args_no_equals", "args_no_hyphens", "args_no_boolean_flags", "args_json"]
    monkeypatch.setenv("MMSR_TEST_VAR", "from-env")
    command = ["${env}", "${interpreter}", "${program}", "--tag=${envvar:MMSR_TEST_VAR}", *(f"${{{m}}}" for m in macros)]
    sweep = load_sweep(write(tmp_path, f"method: grid\nprogram: train.py\nparameters: {{a: {{value: 1}}}}\ncommand: {json.dumps(command)}"))
    expected = create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})
    head = ["/usr/bin/env", sys.executable, "train.py", "--tag=from-env"]
    assert command_for(sweep, params, ["--extra", "1"]) == head + [x for m in macros for x in expected[m]] + ["--extra", "1"]


@pytest.mark.parametrize("dry_run", [True, False])
def test_a_secret_from_the_environment_reaches_the_run_but_is_not_printed(tmp_path, monkeypatch, capfd, dry_run):
    monkeypatch.setenv("MMSR_TEST_SECRET", "sk-secret-123")
    script = "import sys; open(sys.argv[1], 'w').write(' '.join(sys.argv[2:4]))"  # what the run was given
    secret = ["--token=${envvar:MMSR_TEST_SECRET}", "${envvar:MMSR_TEST_SECRET}"]
    command = [sys.executable, "-c", script, str(tmp_path / "given"), *secret, "${args}"]
    path = write(tmp_path, f"method: grid\nparameters: {{a: {{value: 1}}}}\ncommand: {json.dumps(command)}")
    assert main([str(path), *(["--dry-run"] if dry_run else [])]) == 0
    printed = capfd.readouterr().out
    assert " ".join(secret) in printed and "sk-secret" not in printed
    if not dry_run:
        assert (tmp_path / "given").read_text() == "--token=sk-secret-123 sk-secret-123"


def dotted(config, key: str):
    """The value a dotted CLI key sets: ``model.kl_coef`` is ``model.init_args.kl_coef``."""
    node = config
    for part in key.split("."):
        node = node[part] if part in node else node["init_args"][part]
    return node


@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_sweep_parameters_are_mmsr_fit_keys(path, monkeypatch):
    sweep = load_sweep(path)
    cmd = command_for(sweep, parameter_sets(sweep, count=1)[0])
    assert cmd[1:5] == [sys.executable, "-m", "mmsr", "fit"] and "${" not in " ".join(cmd)
    monkeypatch.chdir(ROOT)
    cli = lightning_cli(cmd[5:], parse_only=True, run=False)
    for key, value in parameter_sets(sweep, count=1)[0].items():
        assert dotted(cli.config, key) == pytest.approx(value), key


@pytest.mark.slow
def test_two_parameter_sweep_runs_offline_end_to_end(tmp_path):
    # Run where the run directories may go; the configs' relative data paths resolve through links.
    for name in ("data", "configs"):
        (tmp_path / name).symlink_to(ROOT / name)
    # Without the WANDB_* variables an in-process wandb run of another test may have left (e.g. its
    # service address), so the sweep's runs start their own offline wandb.
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env |= {"PYTHONPATH": subprocess_env()["PYTHONPATH"], "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    env |= {v: str(tmp_path / ".wandb" / v.lower()) for v in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR")}
    cmd = [sys.executable, "-m", "mmsr", "sweep", "configs/sweeps/smoke_kl_group.yaml", "--count", "2", "--", "--trainer.max_steps", "1"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert done.stdout.count("exit code 0") == 2
    runs = sorted((tmp_path / "runs" / "smoke_wandb" / "csv").glob("version_*"))
    assert len(runs) == 2
    for run, generations in zip(runs, (2, 4)):  # the grid's first two points: kl_coef 0.0, groups of 2 then 4
        model = yaml.safe_load((run / "config.yaml").read_text())["model"]["init_args"]
        assert (model["kl_coef"], model["num_generations"]) == (0.0, generations)
        assert "reward/mean" in (run / "metrics.csv").read_text().splitlines()[0]
        records = list(read_records(run / "trajectories.jsonl"))
        assert len(records) == 2 * generations  # 2 prompts x the swept group size (max 8 logged)
    wandb_runs = sorted((tmp_path / "runs" / "smoke_wandb" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(wandb_runs) == 2
    assert all(b"sweep-smoke-kl-group-" in p.read_bytes() for p in wandb_runs)  # one WANDB_RUN_GROUP
