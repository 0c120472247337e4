"""``ModelParallelStrategy`` at Lightning's default sizes (``data_parallel_size`` auto: the number of nodes, 1;
``tensor_parallel_size`` auto: the devices) put a node's ranks in one tensor-parallel group. mmsr does no tensor
parallelism: FSDP2 sharded over a data-parallel mesh of one rank, and each of 2 ranks trained its own copy (no
gradient reduction; their weights differed after one step). ``GRPOModule.setup`` refuses it before the engine
starts, saying what to set."""

from types import SimpleNamespace

import pytest
import torch.distributed as dist
import yaml

from mmsr.parallel import data_parallel_mesh
from tests.distributed.runs import ROOT, fit
from tests.distributed.test_two_ranks import script

SET_SIZES = "set trainer.strategy.init_args.data_parallel_size: 2 (the world size) and tensor_parallel_size: 1"


def lightning_mesh(data_parallel: int, tensor_parallel: int) -> SimpleNamespace:
    """What ``data_parallel_mesh`` reads of the mesh Lightning builds (``_setup_device_mesh``)."""
    return SimpleNamespace(mesh_dim_names=("data_parallel", "tensor_parallel"), shape=(data_parallel, tensor_parallel))


@pytest.mark.parametrize(("dp", "tp"), [(1, 2), (2, 4)])
def test_a_tensor_parallel_mesh_is_refused_naming_the_sizes_to_set(dp, tp):
    with pytest.raises(ValueError, match=f"tensor_parallel_size {tp} and data_parallel_size {dp}: .*set trainer.strategy"
                                         rf".init_args.data_parallel_size: {dp * tp} \(the world size\) and "
                                         "tensor_parallel_size: 1$"):  # fmt: skip
        data_parallel_mesh(lightning_mesh(dp, tp), "GRPOModule")


def test_a_data_parallel_mesh_gives_its_data_parallel_dimension():
    """The mesh Lightning builds on one rank (real ``DeviceMesh``, gloo)."""
    from lightning.fabric.strategies.model_parallel import _setup_device_mesh

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = _setup_device_mesh(1, 1, 1, SimpleNamespace(type="cpu"))
        assert data_parallel_mesh(mesh, "GRPOModule") == mesh["data_parallel"]
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_at_lightnings_default_sizes_are_refused_before_the_first_rollout(tmp_path):
    """2 gloo ranks, ``strategy: ModelParallelStrategy`` without sizes (~30 s): the run stops at setup."""
    cfg = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
    cfg["trainer"].update(max_steps=1, devices=2, strategy={"class_path": "lightning.pytorch.strategies.ModelParallelStrategy"},
                          default_root_dir=str(tmp_path), use_distributed_sampler=False, enable_checkpointing=False,
                          enable_progress_bar=False, plugins=None, callbacks=None)  # fmt: skip
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path)
    cfg["model"]["init_args"]["engine"] = {"class_path": "mmsr.rollout.engine.ScriptedEngine", "init_args": {"script": script()}}
    cfg["data"]["prompts_per_step"] = 2
    proc = fit(tmp_path, cfg, timeout=300)
    assert proc.returncode != 0
    assert "GRPOModule under ModelParallelStrategy with tensor_parallel_size 2 and data_parallel_size 1" in proc.stderr
    assert SET_SIZES in proc.stderr
    assert not list(tmp_path.glob("csv/version_*/metrics.csv"))  # no step was logged
