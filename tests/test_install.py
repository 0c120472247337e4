"""A non-editable install works: the wheel holds everything a command reads at run time, and
``mmsr demo`` from that install, started in an empty directory, runs, writes its outputs and repeats
the checkout's run of the same seed metric for metric.

How the fresh install stays apart from this checkout, without downloading anything:

- the wheel is built offline (``pip wheel --no-deps --no-build-isolation --no-index``, with this
  venv's setuptools) from a copy of the package's sources, so the build writes nothing into the
  checkout (a venv without setuptools >= 70.1, e.g. a fresh Python >= 3.12 one, builds in pip's
  isolated environment instead, fetching setuptools from the index);
- the fresh venv is made without pip (``venv --without-pip``); this test's pip installs the wheel
  into it (``pip --python FRESH/bin/python install --no-deps --no-index``), which writes the package,
  its metadata and the ``mmsr`` console script (run by the fresh interpreter) there;
- the dependencies (torch, lightning, transformers, ...: gigabytes) are not installed again: a
  ``.pth`` file in the fresh site-packages appends this venv's site-packages to ``sys.path``, after
  the fresh one, so the wheel's ``mmsr`` is found first. A plain path line in a ``.pth`` file only
  adds the directory: ``.pth`` files inside it are not run, and that is where the checkout's
  editable install registers its import hook (``__editable__.mmsr-*.pth`` installs a finder that
  maps ``mmsr`` to the checkout), so that hook never loads in the fresh interpreter;
- the command runs with only the CPU torchvision shim on ``PYTHONPATH`` (not the checkout, which
  ``tests.conftest.subprocess_env`` would add) and from an empty directory; the test checks where
  ``mmsr``, its metadata and its package data were imported from.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.conftest import CPU_SHIM, ROOT
from tests.short_demo import SHORT, learning_metrics

pytestmark = pytest.mark.slow
SOURCES = ("setup.cfg", "pyproject.toml", "README.md")  # what setup.cfg reads besides the package
WHERE = """import importlib.metadata, importlib.resources, json, sys, mmsr
print(json.dumps({"mmsr": mmsr.__file__, "dist": str(importlib.metadata.distribution("mmsr")._path),
    "configs": str(importlib.resources.files("mmsr.demo") / "configs" / "grpo.yaml"),
    "editable": [m for m in sys.modules if "editable" in m], "path": sys.path}))"""


def run(cmd: list[str], cwd: Path | None = None, env: dict | None = None, timeout: float = 120) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, f"{cmd[:4]} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def build_flags() -> list[str]:
    """Offline build flags when this venv's setuptools builds wheels by itself (bdist_wheel is part of
    setuptools since 70.1), else none: pip's isolated build fetches setuptools."""
    try:
        major, minor = (int(x) for x in importlib.metadata.version("setuptools").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return []
    return ["--no-build-isolation", "--no-index"] if (major, minor) >= (70, 1) else []


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel of this checkout's package, built from a copy of its sources."""
    root = tmp_path_factory.mktemp("wheel")
    shutil.copytree(ROOT / "mmsr", root / "src" / "mmsr", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in SOURCES:
        shutil.copy(ROOT / name, root / "src" / name)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", *build_flags(), "-w", str(root / "dist"), str(root / "src")])
    (whl,) = (root / "dist").glob("mmsr-*.whl")
    return whl


@pytest.fixture(scope="module")
def fresh_venv(wheel, tmp_path_factory) -> Path:
    """A venv holding only the installed wheel, borrowing this venv's dependencies through a .pth line."""
    venv = tmp_path_factory.mktemp("fresh") / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    site = purelib(venv)
    deps = dict.fromkeys(sysconfig.get_path(k) for k in ("purelib", "platlib"))  # this venv's, in order
    (site / "zz_test_venv_dependencies.pth").write_text("".join(f"{d}\n" for d in deps))
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)])
    return venv


def purelib(venv: Path) -> Path:
    """The venv's site-packages, as its own interpreter names it."""
    return Path(run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).strip())


def env() -> dict[str, str]:
    """This environment with only the CPU torchvision shim on PYTHONPATH (not the checkout)."""
    return dict(os.environ, PYTHONPATH=str(CPU_SHIM))


def test_the_wheel_holds_every_file_of_the_package(wheel):
    """Templates, configs, known model configs: everything under mmsr/ ships (package_data)."""
    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("mmsr/")}
    sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "mmsr").rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert sources - shipped == set()
    assert {"mmsr/demo/configs/grpo.yaml", "mmsr/report/templates/report.html", "mmsr/prompt/templates/round1.txt"} <= shipped


def test_the_fresh_venv_imports_the_wheel_not_the_checkout(fresh_venv, tmp_path):
    where = json.loads(run([str(fresh_venv / "bin" / "python"), "-c", WHERE], cwd=tmp_path, env=env()))
    site = purelib(fresh_venv)
    for key in ("mmsr", "dist", "configs"):
        assert Path(where[key]).is_relative_to(site), (key, where[key])
    assert where["editable"] == [] and str(ROOT) not in where["path"]


@pytest.fixture(scope="module")
def installed_demo(fresh_venv, tmp_path_factory) -> tuple[Path, str]:
    """The short demo (``SHORT``, seed 0 by default) run by the installed ``mmsr`` from an empty directory:
    that directory and the command's stdout."""
    cwd = tmp_path_factory.mktemp("empty")
    return cwd, run([str(fresh_venv / "bin" / "mmsr"), "demo", "--out", "out", *SHORT], cwd=cwd, env=env(), timeout=900)


def test_mmsr_demo_runs_from_an_empty_directory(installed_demo):
    """The short demo (about 30 s alone): world, warm start, GRPO, both evaluations, the report page."""
    cwd, stdout = installed_demo
    assert "| claim | met | measured |" in stdout
    out = cwd / "out"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["grpo"]["all"]["n"] == 6
    for name in ("metrics.csv", "demo.png", "report.html", "grpo/csv/held_out.jsonl", "sft/policy/model.safetensors"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in cwd.iterdir()) == ["out"]  # nothing written beside its run directory


def test_the_installed_demo_repeats_the_checkouts(installed_demo, short_demo):
    """Same seed, same world and same metrics (on one machine), from the wheel in one process and the
    checkout in another (``short_demo``): evaluations, rewards, losses, KL, search ratios."""
    (cwd, _), (checkout, _, _) = installed_demo, short_demo
    a, b = (json.loads((d / "summary.json").read_text()) for d in (checkout, cwd / "out"))
    assert (a["warm_start"], a["grpo"]) == (b["warm_start"], b["grpo"])
    first, second = learning_metrics(checkout), learning_metrics(cwd / "out")
    assert len(first) == 2 and "reward/mean" in first[0] and first == second
