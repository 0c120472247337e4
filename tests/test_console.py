"""The installed ``mmsr`` script exits 0 after a command that returns a value (a script's return
value is its exit status: returning the CLI object used to exit 1 after a successful run), and a
failed command ends with one line naming the cause."""

import subprocess
import sys
from pathlib import Path

import pytest

import mmsr.cli as cli
from tests.conftest import subprocess_env

ROOT = Path(__file__).resolve().parents[1]


def test_console_script_discards_the_result(monkeypatch):
    monkeypatch.setattr(cli, "main", lambda args=None: object())  # e.g. the LightningCLI object
    assert cli.console() is None
    assert "mmsr = mmsr.cli:console" in (ROOT / "setup.cfg").read_text()


def test_the_last_line_names_the_innermost_cause(monkeypatch, capsys):
    def fail(args=None):
        try:
            raise FileNotFoundError("corpus x.jsonl not found\nmore detail")
        except FileNotFoundError as exc:
            raise ValueError("Does not validate against any of the Union subtypes\nNamespace(...)") from exc

    monkeypatch.setattr(cli, "main", fail)
    monkeypatch.setattr(cli.sys, "argv", ["mmsr", "eval", "--data", "x"])
    with pytest.raises(SystemExit) as exit_:
        cli.console()
    assert exit_.value.code == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == "mmsr eval: error: FileNotFoundError: corpus x.jsonl not found"


def test_help_lists_every_command_and_each_answers_its_own_help(capsys):
    assert cli.main(["--help"]) is None
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    assert listed == [*cli.TRAINER_COMMANDS, *cli.COMMANDS]
    for name in cli.COMMANDS:  # each entry points at a program that exists, under its own name
        with pytest.raises(SystemExit) as exit_:
            cli.main([name, "--help"])
        assert exit_.value.code == 0
        assert capsys.readouterr().out.startswith(f"usage: mmsr {name} ")


def test_help_is_fast_and_no_command_is_a_usage_error():
    code = "import sys; from mmsr.cli import main; main(['--help']); assert 'lightning' not in sys.modules"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(), cwd=ROOT)
    assert done.returncode == 0, done.stderr
    bare = subprocess.run([sys.executable, "-m", "mmsr"], capture_output=True, text=True, env=subprocess_env(),
                          cwd=ROOT)  # fmt: skip
    assert bare.returncode == 2 and bare.stderr.startswith("usage: mmsr COMMAND") and "plan" in bare.stderr


@pytest.mark.slow
def test_fit_from_another_directory_says_where_relative_paths_resolve(tmp_path):
    """The smoke config names its data relative to the repository root; run elsewhere, the run ends
    with one line naming the missing file and the directory it was looked for in."""
    proc = subprocess.run([sys.executable, "-m", "mmsr", "fit", "-c", str(ROOT / "configs" / "smoke.yaml")],
                          cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last == (f"mmsr fit: error: FileNotFoundError: data.train_files[0]: data file data/fvqa_dev_20/fvqa_dev.jsonl "
                    f"not found (a relative path: resolved against the working directory {tmp_path})")  # fmt: skip


@pytest.mark.parametrize(("flag", "names"), [("--trainer.gradient_clip_val=1.0", "model.grad_clip"),
                                             ("--trainer.accumulate_grad_batches=2", "model.micro_batch_tokens")])
def test_lightnings_automatic_clipping_and_accumulation_point_at_the_modules_own(flag, names, tmp_path, monkeypatch):
    """Lightning refuses both for modules that step their own optimizers, without saying what to set."""
    from tests.callbacks.scripted_run import CONFIG

    monkeypatch.chdir(ROOT)
    with pytest.raises(ValueError, match=f"{flag.split('=')[0][2:]}: .*{names}"):
        cli.lightning_cli(["fit", "-c", str(CONFIG), "--trainer.default_root_dir", str(tmp_path), flag])


def test_a_checkpoint_lightning_would_look_up_is_refused_before_the_run_starts(tmp_path, monkeypatch):
    """``--ckpt_path last`` resumed training in a new run directory: mmsr reads the run directory from the
    checkpoint file before Lightning builds the loggers, and Lightning finds 'last' only after."""
    from tests.callbacks.scripted_run import CONFIG

    monkeypatch.chdir(ROOT)
    with pytest.raises(ValueError, match="--ckpt_path last: give the checkpoint file"):
        cli.lightning_cli(["fit", "-c", str(CONFIG), "--trainer.default_root_dir", str(tmp_path), "--ckpt_path", "last"])
