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


def test_an_error_quoting_the_one_it_was_raised_from_is_shown_naming_the_file(tmp_path):
    """``raise ValueError(f"{path} ...: {e}") from e`` ended as the inner ``OSError: [Errno 22] Invalid argument`` (or
    torch's mmap complaint), naming no file; an outer error that does not quote its cause still gives way to it."""
    from mmsr.checkpoint import load_weights

    for content in (b"", b"not a checkpoint"):
        (tmp_path / "bad.ckpt").write_bytes(content)
        with pytest.raises(ValueError) as error:
            load_weights(tmp_path / "bad.ckpt")
        assert error.value.__cause__ is not None
        assert cli.cause(error.value).startswith(f"ValueError: {tmp_path / 'bad.ckpt'} is not a checkpoint"), content


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


@pytest.mark.parametrize("key", ["optimizer", "lr_scheduler"])
def test_a_config_files_optimizer_keys_are_refused_by_the_parser_too(key, tmp_path, monkeypatch, capsys):
    """From a config file jsonargparse checks the value itself and let the refusal out as a traceback."""
    monkeypatch.chdir(ROOT)
    saved = tmp_path / "config.yaml"
    saved.write_text(yaml.safe_dump({key: {"class_path": "torch.optim.SGD"}}))
    with pytest.raises(SystemExit) as exit_:
        cli.lightning_cli(["fit", "-c", str(SMOKE), "-c", str(saved), "--print_config"])
    assert exit_.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f'error: Parser key "{key}": mmsr does not take Lightning\'s {key}'), error


ENGINE = {"class_path": "mmsr.rollout.hf_engine.HFEngine"}


@pytest.mark.parametrize(("override", "last"), [
    # ``image_search_limit: int | None`` in the dataclass argument ``rollout``, itself under ``model``'s union
    ({"rollout": {"image_search_limit": "two"}},
     "model.init_args.rollout.image_search_limit: expected int | None, given two"),
    ({"rollout": {"max_round": 3}},
     "model.init_args.rollout.max_round: not an argument of rollout (an argument of mmsr.module.GRPOModule)"),
    ({"engine": {"class_path": "mmsr.rollout.hf_engine.HFEngin"}},
     "model.init_args.engine.class_path: mmsr.rollout.hf_engine.HFEngin: "
     "module 'mmsr.rollout.hf_engine' has no attribute 'HFEngin'"),
    ({"engine": {**ENGINE, "init_args": {"sed": 0}}},
     "model.init_args.engine.init_args.sed: not an argument of mmsr.rollout.hf_engine.HFEngine"),
    ({"tools": [{"class_path": "mmsr.tools.spec.Tool"}, {"class_path": "mmsr.tools.nothere.X"}]},
     "model.init_args.tools[1].class_path: mmsr.tools.nothere.X: module 'mmsr.tools' has no attribute 'nothere'"),
])  # fmt: skip
def test_a_nested_parse_error_ends_with_one_line_naming_the_key(override, last, tmp_path, monkeypatch, capsys):
    """``model`` is ``LightningModule | None``: jsonargparse's error is the union's alternatives, nested, ending
    with a dump of the dict given; mmsr adds one line naming the key as the config file writes it."""
    monkeypatch.chdir(ROOT)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"model": {"init_args": override}}))
    with pytest.raises(SystemExit) as exit_:
        cli.lightning_cli(["fit", "-c", str(SMOKE), "-c", str(bad), "--print_config"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: {last}"


def test_a_list_items_index_is_found_among_merged_items(tmp_path, monkeypatch, capsys):
    """A list item of the first config's class merges with it: jsonargparse shows it as a Namespace, not a dict."""
    monkeypatch.chdir(ROOT)
    bad = tmp_path / "bad.yaml"
    logger = {"class_path": "mmsr.callbacks.trajectory_logger.TrajectoryLogger", "init_args": {"every_n_steps": "x"}}
    bad.write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint"}, logger]}}))  # fmt: skip
    with pytest.raises(SystemExit):
        cli.lightning_cli(["fit", "-c", str(SMOKE), "-c", str(bad), "--print_config"])
    err = capsys.readouterr().err.strip().splitlines()
    assert any(line.startswith("  Given value: [Namespace(") for line in err)
    assert err[-1] == "error: trainer.callbacks[1].init_args.every_n_steps: expected int, given x"


def test_cause_names_a_parse_errors_key_not_its_innermost_message():
    """``mmsr eval`` parses a run's tools with a parser that raises (``mmsr.eval.load``): the innermost
    exception of the chain is jsonargparse's ``NSKeyError: Option 'top' is not accepted``, no key."""
    from mmsr.eval.load import build_tools

    search = {"class_path": "mmsr.tools.local.LocalTextSearch", "init_args": {"corpus": "c.jsonl"}}
    for init_args, line in [({"top": 3}, "text_search.init_args.top: not an argument of " + search["class_path"]),
                            ({"top_k": "many"}, "text_search.init_args.top_k: expected int, given many")]:  # fmt: skip
        with pytest.raises(Exception) as error:
            build_tools({"text_search": {**search, "init_args": {**search["init_args"], **init_args}}}, "x.yaml")
        assert cli.cause(error.value) == f"ArgumentError: {line}"
