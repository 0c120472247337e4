"""The README's test command runs the suite on two pytest-xdist workers (``-n 2``): each test file goes to one
worker whole, the files that share the ``short_demo`` fixture go together, and a worker's torch and the
processes it starts get one intra-op thread (``tests/conftest.py``)."""

import ast
import subprocess
import sys

import pytest

from tests.conftest import ROOT, file_scheduling, subprocess_env

pytest.importorskip("xdist", reason="pytest-xdist is in the dev extra")


def short_demo_users() -> set[str]:
    """The test files with a test function that asks for ``short_demo`` (read from their syntax trees)."""
    users = set()
    for path in (ROOT / "tests").rglob("test_*.py"):
        tree = ast.parse(path.read_text())
        funcs = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name.startswith("test")]
        if any(a.arg == "short_demo" for f in funcs for a in f.args.args):
            users.add(str(path.relative_to(ROOT)))
    return users


def test_a_file_is_one_scope_and_the_short_demo_users_are_one():
    scope = file_scheduling()._split_scope  # reads only the node id
    users = short_demo_users()
    assert {"tests/demo/test_memory.py", "tests/test_install.py"} <= users
    assert {scope(None, f"{path}::test_x[a-b]") for path in users} == {"short_demo"}
    assert scope(None, "tests/test_plan.py::test_recipes[qwen::x]") == "tests/test_plan.py"
    assert scope(None, "tests/algo/test_kl.py::TestK::test_k1") == "tests/algo/test_kl.py"


def test_a_worker_and_its_subprocesses_get_one_thread():
    """Set by conftest when it is imported in a worker, before torch: inherited by every subprocess a test starts.
    Outside a worker nothing is set (a serial run keeps torch's default)."""
    code = "import os, tests.conftest, torch; print(os.environ.get('OMP_NUM_THREADS'), torch.get_num_threads())"
    env = {k: v for k, v in subprocess_env().items() if k not in ("OMP_NUM_THREADS", "PYTEST_XDIST_WORKER")}
    worker = subprocess.run([sys.executable, "-c", code], env=env | {"PYTEST_XDIST_WORKER": "gw1"}, cwd=ROOT,
                            capture_output=True, text=True, check=True)  # fmt: skip
    assert worker.stdout.split() == ["1", "1"], worker.stderr[-2000:]
    alone = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    assert alone.stdout.split()[0] == "None", alone.stdout


def test_the_readme_test_command_runs_two_workers():
    readme = (ROOT / "README.md").read_text()
    command = readme.split("<!-- test-command -->", 1)[1].split("```", 2)[1]
    assert command.rstrip().endswith("-m pytest -q -n 2"), command
    assert "pytest-xdist==" in (ROOT / "setup.cfg").read_text()
