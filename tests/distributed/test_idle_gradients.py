"""``drop_idle_gradients``: after a step that held an image on no rank, the vision tower's gradients are dropped, as
one process (whose text-only forwards leave the tower out) has none; a step where some rank held one keeps them."""

import datetime
import os
import socket

import torch
import torch.multiprocessing as mp

from mmsr.parallel import drop_idle_gradients

# (rank 0 used an image, rank 1 did) -> the gradients are kept
CASES = [((False, False), False), ((True, False), True), ((False, True), True)]


def _tower() -> torch.nn.Linear:
    tower = torch.nn.Linear(2, 2)
    tower(torch.zeros(1, 2)).sum().mul(0).backward()  # zero gradients, as the blank image at zero weight leaves
    return tower


def _two_ranks(rank: int, world: int, port: int) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)  # two ranks on a shared 2-core machine
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        for used, kept in CASES:
            tower = _tower()
            drop_idle_gradients(tower, used[rank], torch.device("cpu"))
            assert all((p.grad is not None) == kept for p in tower.parameters()), (used, kept)
        drop_idle_gradients(None, False, torch.device("cpu"))  # a text-only policy: no collective, nothing
        dist.barrier()
    finally:
        dist.destroy_process_group()
    os._exit(0)  # no interpreter teardown under gloo's threads


def test_the_towers_gradients_are_dropped_only_after_a_step_without_an_image_on_any_rank():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_two_ranks, args=(2, port), nprocs=2)  # spawned: a forked child can hang in torch inside the suite


def test_one_process_keeps_what_its_backward_left():
    tower = _tower()
    drop_idle_gradients(tower, False, torch.device("cpu"))
    assert all(p.grad is not None for p in tower.parameters())
