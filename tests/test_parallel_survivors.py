"""Pins behaviours of ``mmsr.parallel`` (precision and FSDP2 wiring) that a mutation audit found no test held: each
test here fails on its mutant (named in its docstring) and states what a user would lose to it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from mmsr.parallel import compute_dtype, copy_to, memory_metrics
from mmsr.plan.config import dtypes
from tests.test_module import make_module

# TinyQwen2_5_VL's defaults (``make_module``'s policy): 2 decoder layers and 1 vision block, each its own FSDP2 unit
BLOCKS = ["model.language_model.layers.0", "model.language_model.layers.1", "model.visual.blocks.0"]


@pytest.mark.parametrize("precision", ["32-true", "32", 32, None], ids=["32-true", "str_32", "int_32", "none"])
def test_bf16_weights_on_purpose_compute_in_bf16_under_32_true(precision):
    """``param_dtype: bfloat16`` under ``32-true`` is the documented way to train bf16 weights on purpose: with no
    mixed precision the matmuls run in the parameters' dtype. Mutant: the default compute dtype fp32 (not the
    parameters'), which ``compute_dtype`` then refused as wider than the bf16 parameters, so setup (and ``mmsr
    plan``) stopped every such run."""
    assert compute_dtype(None, torch.bfloat16, precision) == torch.bfloat16
    assert dtypes({"param_dtype": "bfloat16"}, {"precision": precision})["compute_dtype"] == "bfloat16"


@pytest.mark.parametrize("precision", [64, "64"], ids=["int_64", "str_64"])
def test_lightnings_short_name_64_is_refused_as_64_true(precision):
    """A config read by ``mmsr plan`` keeps Lightning's short name (``precision: 64``, an int once parsed), which
    Lightning itself runs as ``64-true``: it casts the policy to float64 and fails the first step on the frozen
    samples. Mutant: the ``"64"`` alias dropped, so the plan sized an fp32 run that could never start."""
    refused = "trainer.precision '64-true' casts the policy to float64 .*use '32-true' or 'bf16-mixed'"
    with pytest.raises(ValueError, match=refused):
        compute_dtype(None, torch.float32, precision)
    with pytest.raises(ValueError, match=refused):
        dtypes({}, {"precision": precision})


def test_memory_metrics_count_a_bf16_reference_at_half_an_fp32_policy():
    """``memory/reference_mb`` is what the reference stored in the compute dtype saves (``mmsr.reference``): a bf16
    reference of an fp32 policy holds 2 bytes a parameter to its 4. Mutants: ``local_bytes`` assuming 4 bytes a
    parameter, and ``memory/reference_mb`` reading the policy: either way the log said 1 MB, as if the reference
    had not been halved. One process: ``memory_metrics`` reduces over no ranks."""
    policy = torch.nn.Linear(512, 512, bias=False)  # 512 x 512 = 262,144 fp32 parameters: 1 MiB
    reference = copy_to(policy, torch.bfloat16, "cpu")
    assert memory_metrics(policy, reference, torch.device("cpu")) == {"memory/policy_mb": 1.0,
                                                                      "memory/reference_mb": 0.5}  # fmt: skip


@pytest.fixture
def lightning_mesh():
    """The mesh ``ModelParallelStrategy`` builds on one rank (real ``DeviceMesh``, one in-process gloo rank, as
    ``tests/distributed/test_tensor_parallel_refused.py``)."""
    from lightning.fabric.strategies.model_parallel import _setup_device_mesh

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield _setup_device_mesh(1, 1, 1, SimpleNamespace(type="cpu"))
    finally:
        dist.destroy_process_group()


def fsdp_units(model: torch.nn.Module) -> dict[str, SimpleNamespace]:
    """Each FSDP2 unit of ``model`` by module name (``""``: the root): its gather / reduce dtypes and offload policy."""
    from torch.distributed.fsdp import FSDPModule

    units = {}
    for name, module in model.named_modules():
        if isinstance(module, FSDPModule):
            group = module._get_fsdp_state()._fsdp_param_group
            units[name] = SimpleNamespace(gather=group.mp_policy.param_dtype, reduce=group.mp_policy.reduce_dtype,
                                          offload=type(group.offload_policy).__name__)  # fmt: skip
    return units


def test_fsdp2_shards_every_block_with_the_policys_precision_and_the_references_offload(lightning_mesh):
    """``GRPOModule.configure_model`` under ``ModelParallelStrategy`` (fp32 masters, bf16 compute, an offloaded
    reference): every transformer block is its own FSDP2 unit, gathered in bf16 with gradients reduced in fp32, and
    every block of the reference waits in host memory. Mutants: no per-block units (``block_types`` empty: a rank
    gathered the whole 7B policy at once), and blocks sharded without the root's ``fsdp_kwargs`` (they gathered fp32,
    twice the memory and traffic, and the reference's blocks stayed on the GPU under ``ref_offload``)."""
    module = make_module(kl_coef=0.001, ref_offload=True, compute_dtype="bfloat16")
    module._device_mesh = lightning_mesh  # what ModelParallelStrategy sets before ``setup``
    module.setup("fit")
    module.configure_model()
    policy, reference = fsdp_units(module.model), fsdp_units(module._ref.model)
    assert sorted(policy) == sorted(reference) == ["", *BLOCKS]
    assert {n: (u.gather, u.reduce, u.offload) for n, u in policy.items()} == \
        dict.fromkeys(policy, (torch.bfloat16, torch.float32, "OffloadPolicy"))  # fmt: skip
    # the reference is stored in bf16, so nothing is cast when it gathers
    assert {n: (u.gather, u.offload) for n, u in reference.items()} == \
        dict.fromkeys(reference, (None, "CPUOffloadPolicy"))  # fmt: skip
