"""Counts of ``mmsr eval`` / ``mmsr curate`` below 1 are parser errors naming the flag: ``--batch-size 0`` failed
in ``range`` only after the model loaded and ``-1`` evaluated nothing; ``--k 0`` rolled out nothing and dropped
every question."""

import pytest

from mmsr.eval import curate
from mmsr.eval.cli import parse_args

EVAL = ["--policy", "p.yaml", "--data", "d.jsonl", "--workflow", "direct"]
CURATE = ["--policy", "p.yaml", "--tools", "t.yaml", "--data", "d.jsonl", "--out", "c.parquet"]


def _parser_error(run, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        run(argv)
    assert exit_.value.code == 2  # argparse's usage error, before anything loads
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("value", ["0", "-1"])
def test_eval_refuses_a_batch_size_below_one_naming_it(value, capsys):
    last = _parser_error(parse_args, [*EVAL, "--batch-size", value], capsys)
    assert last == f"mmsr eval: error: argument --batch-size: must be at least 1, got {value}"


@pytest.mark.parametrize(("flag", "value"), [("--batch-size", "0"), ("--batch-size", "-2"), ("--k", "0"), ("--k", "-1")])
def test_curate_refuses_a_batch_size_or_k_below_one_naming_it(flag, value, capsys):
    last = _parser_error(curate.main, [*CURATE, flag, value], capsys)
    assert last == f"mmsr curate: error: argument {flag}: must be at least 1, got {value}"


def test_positive_counts_still_parse():
    assert parse_args([*EVAL, "--batch-size", "1"]).batch_size == 1


@pytest.mark.parametrize("value", ["0", "-2"])
def test_curate_refuses_a_size_below_one_naming_it(value, capsys):
    """``--size -2`` ran every rollout, then failed in ``random.sample`` naming neither the flag nor the value."""
    last = _parser_error(curate.main, [*CURATE, "--size", value], capsys)
    assert last == f"mmsr curate: error: argument --size: must be at least 1, got {value}"


@pytest.mark.parametrize("value", ["-0.1", "1.5", "nan"])
def test_curate_refuses_a_search_free_ratio_outside_0_1_naming_it(value, capsys):
    """Checked by ``select`` too, but only after every rollout ran."""
    last = _parser_error(curate.main, [*CURATE, "--search-free-ratio", value], capsys)
    assert last == f"mmsr curate: error: argument --search-free-ratio: must be in [0, 1], got {value}"


def test_curate_search_free_ratio_keeps_its_ends():
    assert (curate.share("0"), curate.share("1"), curate.share("0.32")) == (0.0, 1.0, 0.32)
