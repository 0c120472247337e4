"""``gather_full`` keeps the policy's generation config (two gloo ranks): the unsharded copy that FSDP2's
``export_dir`` saves was built from ``model.config`` alone, so its generation_config.json held the defaults derived
from the config (one eos id, no sampling defaults), not the trained policy's (a pretrained Qwen2.5-VL-Instruct's two
eos ids, which ``Policy.stop_token_ids`` reads, and its sampling defaults)."""

import json
import os

import torch
import torch.multiprocessing as mp

from tests.test_sync import _free_port

GENERATION = {"eos_token_id": [3, 5], "pad_token_id": 4, "repetition_penalty": 1.05, "do_sample": True, "temperature": 0.1}


def _gather(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from mmsr.parallel import gather_full, shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                             num_key_value_heads=1, tie_word_embeddings=True, eos_token_id=3)  # fmt: skip
        model = Qwen2ForCausalLM(config)
        for name, value in GENERATION.items():  # as a pretrained Instruct model's generation_config.json sets them
            setattr(model.generation_config, name, value)
        shard(model, init_device_mesh("cpu", (world,), mesh_dim_names=("data_parallel",))["data_parallel"], torch.float32)
        full = gather_full(model, keep=rank == 0)
        if rank == 0:
            assert full.generation_config is not model.generation_config  # a copy: the export does not alias training's
            full.save_pretrained(out)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    os._exit(0)  # as tests/test_sync.py: no interpreter teardown under gloo's threads


def test_the_gathered_copy_keeps_the_policys_generation_config(tmp_path):
    mp.spawn(_gather, args=(2, _free_port(), str(tmp_path / "hf")), nprocs=2)
    saved = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert {name: saved.get(name) for name in GENERATION} == GENERATION  # was eos_token_id 3 and no sampling defaults
