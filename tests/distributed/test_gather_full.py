"""``gather_full``: the unsharded copy of an FSDP2-sharded model that ``export_dir`` saves keeps the trainer's
dtype and values (two gloo ranks)."""

import os

import torch
import torch.multiprocessing as mp

from tests.test_sync import _free_port


def _gather(rank: int, world: int, port: int) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from mmsr.parallel import gather_full, shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                             num_key_value_heads=1, tie_word_embeddings=True)  # fmt: skip
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        shard(model, init_device_mesh("cpu", (world,), mesh_dim_names=("data_parallel",))["data_parallel"], torch.bfloat16)
        full = gather_full(model, keep=rank == 0)
        if rank == 0:  # a bf16 run exports bf16, as its 1-rank run saves (it came out fp32)
            state = full.state_dict()
            assert {t.dtype for t in state.values()} == {torch.bfloat16}, {t.dtype for t in state.values()}
            assert all(torch.equal(state[k], before[k]) for k in before)
        else:
            assert full is None
        dist.barrier()
    finally:
        dist.destroy_process_group()
    os._exit(0)  # as tests/test_sync.py: no interpreter teardown under gloo's threads


def test_the_gathered_copy_of_a_bf16_model_is_bf16():
    mp.spawn(_gather, args=(2, _free_port()), nprocs=2)
