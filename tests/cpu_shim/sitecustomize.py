"""CPU-only packaging shim for the test environment: PyPI's CUDA-built torchvision next to the CPU torch.

vLLM's CPU build (and transformers' fast image processors) import torchvision. The torchvision
wheel on PyPI is built against CUDA torch: its C++ operators (``torchvision._C``: nms, roi_align,
...) cannot load next to the CPU torch, and ``torchvision/__init__`` then imports
``torchvision._meta_registrations``, which registers fake kernels for exactly those missing
operators and fails ("operator torchvision::nms does not exist"). Pre-registering that module as
empty lets torchvision import; nothing mmsr or vLLM's Qwen2.5-VL path uses needs those operators.

It is a ``sitecustomize`` so that every Python process of the tests runs it at start-up, including
the subprocesses vLLM starts to inspect a model and the ``mmsr fit`` runs of the smoke tests
(``tests/conftest.py`` puts this folder on ``PYTHONPATH``). Users on GPUs, with a matching CUDA
torch and torchvision, need none of it.
"""

import sys
import types

sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
