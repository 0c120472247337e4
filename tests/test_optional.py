"""Tests that need an optional part skip locally and fail where ``MMSR_REQUIRE_OPTIONAL=1`` (CI)."""

import ast
import os
import shlex
from pathlib import Path

import pytest
from _pytest.outcomes import OutcomeException

import tests.conftest as conftest


@pytest.mark.parametrize(("required", "outcome"), [(False, pytest.skip.Exception), (True, pytest.fail.Exception)])
def test_a_missing_optional_part_skips_or_fails(monkeypatch, required, outcome):
    """Any pytest outcome is caught and its kind asserted: ``pytest.raises(Failed)`` let a skip through, and a
    helper that skipped under ``MMSR_REQUIRE_OPTIONAL=1`` left this test skipped, not failed."""
    monkeypatch.setattr(conftest, "REQUIRE_OPTIONAL", required)
    with pytest.raises(OutcomeException, match="no_such_package_for_mmsr is not importable.*pip install it") as exc:
        conftest.import_optional("no_such_package_for_mmsr", "pip install it")
    assert type(exc.value) is outcome, f"{type(exc.value).__name__}, not {outcome.__name__}"
    assert conftest.import_optional("json", "stdlib").dumps([]) == "[]"


def ci_commands() -> list[list[str]]:
    """``.ci/run``'s commands, split as the shell does (comments and blank lines dropped)."""
    lines = (conftest.ROOT / ".ci" / "run").read_text().splitlines()
    return [words for words in (shlex.split(line, comments=True) for line in lines) if words]


def ci_exports() -> dict[str, str]:
    """The variables ``.ci/run`` exports before it runs the README's test command."""
    commands = ci_commands()
    tests = next(i for i, c in enumerate(commands) if c[:1] == ["bash"] and "$cmd" in c[-1])
    pairs = [w.split("=", 1) for c in commands[:tests] if c[0] == "export" for w in c[1:] if "=" in w]
    return dict(pairs)


def conftest_require_optional(monkeypatch, env: dict[str, str]) -> object:
    """``REQUIRE_OPTIONAL`` as conftest computes it (its own expression, re-evaluated) in ``env``."""
    source = Path(conftest.__file__).read_text()
    assigns = [n for n in ast.parse(source).body if isinstance(n, ast.Assign)]
    assign = next(n for n in assigns if any(getattr(t, "id", None) == "REQUIRE_OPTIONAL" for t in n.targets))
    for name in [k for k in os.environ if k.startswith("MMSR_")] + list(env):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return eval(compile(ast.Expression(assign.value), conftest.__file__, "eval"), {"os": os})


def test_ci_requires_every_optional_part(monkeypatch):
    """.ci/run exports ``MMSR_REQUIRE_OPTIONAL=1`` before the tests, and conftest reads that very variable:
    its flag is set in .ci/run's environment and not without it."""
    exports = ci_exports()
    assert exports.get("MMSR_REQUIRE_OPTIONAL") == "1", exports
    assert conftest_require_optional(monkeypatch, exports) is True
    assert conftest_require_optional(monkeypatch, {}) is False


def test_ci_checks_the_demo_claims_on_seed_0_last():
    """README: CI runs the full demo with ``mmsr demo --check`` on seed 0 after the tests (its last command)."""
    last = ci_commands()[-1]
    program = next(i for i, w in enumerate(last) if "=" not in w)  # after the VAR=value assignments
    assert Path(last[program]).name == "mmsr", last
    assert last[program + 1 :] == ["demo", "--out", "runs/demo", "--seed", "0", "--check"], last
