import os
import runpy
import sys
from pathlib import Path

# mmsr is not necessarily pip-installed; make `import mmsr` resolve to this checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FVQA = ROOT / "data" / "fvqa_dev_20"

# The CPU-only torchvision shim (see its docstring): run it here, before anything imports
# transformers or torchvision, and put its folder first on PYTHONPATH so that every subprocess a
# test starts (vLLM's model inspection, `mmsr fit`) runs it too as its `sitecustomize`.
CPU_SHIM = ROOT / "tests" / "cpu_shim"
runpy.run_path(str(CPU_SHIM / "sitecustomize.py"))
if str(CPU_SHIM) not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    os.environ["PYTHONPATH"] = os.pathsep.join([str(CPU_SHIM), *filter(None, [os.environ.get("PYTHONPATH")])])


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of a test's subprocess: this checkout and the CPU shim on ``PYTHONPATH``."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ["PYTHONPATH"]]), **extra)


@pytest.fixture(scope="session")
def tiny_policy():
    """A random-weight Qwen2.5-VL of the real architecture with a small BPE tokenizer (fp32)."""
    from mmsr.models.build import TinyQwen2_5_VL

    texts = [str(FVQA / "fvqa_dev.jsonl"), str(FVQA / "search" / "corpus.jsonl")]
    return TinyQwen2_5_VL(tokenizer_texts=texts, seed=0).build()


@pytest.fixture(scope="session")
def fvqa_samples():
    from mmsr.data.loaders import load_samples

    return load_samples(FVQA / "fvqa_dev.jsonl")
