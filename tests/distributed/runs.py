"""What the multi-rank tests share: running ``mmsr fit`` on a config in a subprocess, and comparing the
final weights a 2-rank run and a 1-rank run export."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import subprocess_env

ROOT = Path(__file__).resolve().parents[2]


def fit(tmp: Path, cfg: dict, extra: list[str] = (), env: dict[str, str] | None = None,
        timeout: float = 900) -> subprocess.CompletedProcess:  # fmt: skip
    """``mmsr fit -c tmp/config.yaml`` (``cfg`` written there) from the repository root; the process, whatever
    its exit status."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "config.yaml").write_text(yaml.safe_dump(cfg))
    return subprocess.run([sys.executable, "-m", "mmsr", "fit", "-c", str(tmp / "config.yaml"), *extra], cwd=ROOT,
                          env=env or subprocess_env(), capture_output=True, text=True, timeout=timeout)  # fmt: skip


def fitted(tmp: Path, cfg: dict, **kwargs) -> Path:
    """``fit`` that must succeed (the end of its stderr otherwise); returns ``tmp``."""
    proc = fit(tmp, cfg, **kwargs)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return tmp


def assert_same_weights(one: Path, two: Path) -> None:
    """The two runs' exports (``hf/model.safetensors``) hold the same tensors to float noise."""
    a, b = load_file(one / "hf" / "model.safetensors"), load_file(two / "hf" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=2e-5, rtol=1e-4, msg=k)
