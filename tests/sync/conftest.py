"""Fixtures of the weight-sync tests: a trainer policy of its own (the tests perturb and sync it) and one gloo rank."""

import copy

import pytest
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from mmsr.models.policy import Policy


@pytest.fixture
def trainer(tiny_policy):
    return Policy(copy.deepcopy(tiny_policy.model), tiny_policy.tokenizer, tiny_policy.image_processor)


@pytest.fixture
def mesh():
    """A 1-D mesh of one in-process gloo rank: DTensors and FSDP2 without a second process."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()
