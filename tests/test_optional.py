"""Tests that need an optional part skip locally and fail where ``MMSR_REQUIRE_OPTIONAL=1`` (CI)."""

import pytest

import tests.conftest as conftest


@pytest.mark.parametrize(("required", "outcome"), [(False, pytest.skip.Exception), (True, pytest.fail.Exception)])
def test_a_missing_optional_part_skips_or_fails(monkeypatch, required, outcome):
    monkeypatch.setattr(conftest, "REQUIRE_OPTIONAL", required)
    with pytest.raises(outcome, match="no_such_package_for_mmsr is not importable.*pip install it"):
        conftest.import_optional("no_such_package_for_mmsr", "pip install it")
    assert conftest.import_optional("json", "stdlib").dumps([]) == "[]"


def test_ci_requires_every_optional_part():
    ci = (conftest.ROOT / ".ci" / "run").read_text()
    assert "MMSR_REQUIRE_OPTIONAL=1" in ci
