"""The README's test command runs the suite on two pytest-xdist workers (``-n 2``): each test file goes to one
worker whole, the files that share the ``short_demo`` fixture go together, and a worker's torch and the
processes it starts get one intra-op thread (``tests/conftest.py``)."""

import subprocess
import sys
from types import SimpleNamespace

import pytest

from tests.conftest import (ROOT, file_scheduling, import_optional, pytest_xdist_make_scheduler, subprocess_env,
                            uses_short_demo)

import_optional("xdist", "pytest-xdist is in the dev extra: pip install -e '.[dev]'")


def test_a_file_is_one_scope_and_the_short_demo_users_are_one():
    scope = file_scheduling()._split_scope  # reads only the node id
    files = [str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")]
    users = {path for path in files if uses_short_demo(path)}
    assert users == {"tests/demo/test_memory.py", "tests/demo/test_run.py", "tests/test_install.py"}
    assert {scope(None, f"{path}::test_x[a-b]") for path in users} == {"short_demo"}
    # this file names the fixture in its text without taking it: its own scope
    assert scope(None, "tests/test_xdist_files.py::test_a") == "tests/test_xdist_files.py"
    assert scope(None, "tests/test_plan.py::test_recipes[qwen::x]") == "tests/test_plan.py"
    assert scope(None, "tests/algo/test_kl.py::TestK::test_k1") == "tests/algo/test_kl.py"


@pytest.mark.parametrize(("dist", "ours"), [("load", True), ("each", False), ("worksteal", False)])
def test_the_file_scheduler_serves_plain_n_and_leaves_other_dist_modes_to_xdist(dist, ours):
    config = SimpleNamespace(getvalue={"dist": dist, "tx": ["2*popen"]}.get)  # what `-n 2 --dist <dist>` sets
    scheduler = pytest_xdist_make_scheduler(config, None)
    if ours:
        assert isinstance(scheduler, file_scheduling()) and scheduler.numnodes == 2
    else:
        assert scheduler is None


def test_a_worker_and_its_subprocesses_get_one_thread():
    """Set by conftest when it is imported in a worker, before torch: inherited by every subprocess a test starts.
    Outside a worker nothing is set (a serial run keeps torch's default)."""
    code = "import os, tests.conftest, torch; print(os.environ.get('OMP_NUM_THREADS'), torch.get_num_threads())"
    # a fresh worker's environment: without LD_PRELOAD too, which an in-process vLLM engine sets in os.environ
    # (tcmalloc and torch's libgomp), and a libgomp loaded at start reads OMP_NUM_THREADS before conftest sets it
    dropped = ("OMP_NUM_THREADS", "PYTEST_XDIST_WORKER", "LD_PRELOAD")
    env = {k: v for k, v in subprocess_env().items() if k not in dropped}
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
