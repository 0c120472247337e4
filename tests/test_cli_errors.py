"""What ``mmsr fit`` says when it refuses: the last line names mmsr's own error, not one it replaced
(``raise ... from None``), and Lightning's ``--optimizer`` / ``--lr_scheduler``, which would replace the
modules' own optimizer and lr schedule, are refused by the parser (run configs saved with them as ``null``
still load)."""

import pytest
import yaml

import mmsr.cli as cli
from mmsr.data.loaders import load_samples
from tests.conftest import ROOT

SMOKE = ROOT / "configs" / "smoke.yaml"


def test_an_error_raised_from_none_is_the_cause_not_the_error_it_hides(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x", broken\n')
    monkeypatch.setattr(cli, "main", lambda args=None: load_samples(bad))  # raises DataError from None
    monkeypatch.setattr(cli.sys, "argv", ["mmsr", "fit", "-c", "x.yaml"])
    with pytest.raises(SystemExit):
        cli.console()
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"mmsr fit: error: DataError: {bad}: line 1, field '<line>': invalid JSON"), last


def test_an_explicit_cause_and_an_unsuppressed_context_are_still_followed():
    def chained(suppress: bool | None) -> BaseException:
        try:
            try:
                raise KeyError("inner")
            except KeyError as inner:
                if suppress is None:
                    raise ValueError("outer") from inner
                if suppress:
                    raise ValueError("outer") from None
                raise ValueError("outer")  # noqa: B904 - the implicit context is what is tested
        except ValueError as outer:
            return outer

    assert cli.cause(chained(None)) == "KeyError: 'inner'"
    assert cli.cause(chained(False)) == "KeyError: 'inner'"
    assert cli.cause(chained(True)) == "ValueError: outer"


def test_lightnings_optimizer_options_are_refused_by_the_parser(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    for flags in (["--optimizer", "torch.optim.AdamW", "--optimizer.lr", "0.01"],
                  ["--lr_scheduler", "torch.optim.lr_scheduler.StepLR"]):  # fmt: skip
        with pytest.raises(SystemExit) as exit_:  # --print_config: parsed, nothing built or run
            cli.lightning_cli(["fit", "-c", str(SMOKE), *flags, "--print_config"])
        assert exit_.value.code == 2, flags
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert error.startswith(f"error: argument {flags[0]}: mmsr does not take Lightning's {flags[0][2:]}"), error
        assert "model.lr" in error


def test_fit_help_does_not_offer_them(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.lightning_cli(["fit", "--help"])
    assert exit_.value.code == 0
    shown = capsys.readouterr().out
    assert "--trainer.max_steps" in shown
    assert "--optimizer" not in shown and "--lr_scheduler" not in shown


def test_a_run_config_saved_with_null_optimizer_keys_still_loads(tmp_path, monkeypatch, capsys):
    """Run directories written while Lightning's keys were offered hold ``optimizer: null`` and
    ``lr_scheduler: null`` (``mmsr validate -c runs/.../config.yaml`` reads them back)."""
    monkeypatch.chdir(ROOT)
    saved = tmp_path / "config.yaml"
    saved.write_text(yaml.safe_dump({"optimizer": None, "lr_scheduler": None}))
    with pytest.raises(SystemExit) as exit_:
        cli.lightning_cli(["fit", "-c", str(SMOKE), "-c", str(saved), "--print_config"])
    assert exit_.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["init_args"]["lr"] > 0 and "optimizer" not in printed and "lr_scheduler" not in printed
    saved.write_text(yaml.safe_dump({"optimizer": {"class_path": "torch.optim.SGD"}}))
    with pytest.raises(Exception, match="mmsr does not take Lightning's optimizer"):
        cli.lightning_cli(["fit", "-c", str(SMOKE), "-c", str(saved), "--print_config"])
