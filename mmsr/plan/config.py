"""What ``mmsr plan`` reads: the run's settings from its config files (LightningCLI, parse only: nothing
is built) and the policy's shape from the policy built on the meta device (no weights, no download).

A pretrained policy's ``config.json`` comes from ``path`` when it is a directory, else from the local
Hugging Face cache, else from ``mmsr/models/known_configs/<name>.json`` (Qwen2.5-VL-7B-Instruct and
Qwen3-VL-8B-Instruct ship there, so the 7B and 8B recipes can be planned offline).
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GiB = 2**30
# GiB of one GPU as CUDA reports it (``torch.cuda.mem_get_info()``'s total, of which vLLM's ``gpu_memory_utilization``
# is a share), by the GB a card is sold with: an H100 "80GB" gives 79.1 (nvidia-smi's 81,559 MiB is 79.6; an A100
# 80GB 79.1-79.3), an H200 "141GB" 139.7-139.8. ``mmsr plan --gpu-gb`` takes the GiB; its default is an 80 GB card.
CARD_GIB = {80: 79.1, 141: 139.7}
KNOWN_CONFIGS = Path(__file__).resolve().parents[1] / "models" / "known_configs"
QWEN_DEFAULT_MAX_PIXELS = 12845056  # Qwen2-VL image processor default (16384 tokens per image)


@dataclass(frozen=True)
class ModelShape:
    """Parameter counts of the policy and the dimensions the activation and KV-cache terms need.

    Attributes:
        params: unique parameters (tied embeddings counted once); vision_params: those of the vision tower.
        root_params: parameters outside every FSDP2 block (``_no_split_modules``): embeddings, lm_head,
            final norm, vision patch embedding and merger. The root ``fully_shard`` keeps them gathered
            from the forward to the end of the backward.
        block_params: parameters of the largest block; largest_param: elements of the largest tensor.
        layers, hidden, kv_heads, head_dim, intermediate, vocab: the language model; heads: its attention
            heads (0: hidden // head_dim); qk_norm: its layers normalize q and k per head (Qwen3-VL's ``q_norm``
            and ``k_norm``, not in Qwen2.5-VL).
        vision_layers, vision_hidden, vision_intermediate, vision_heads: the vision tower (0 layers without one).
        vision_gated_mlp: its MLP saves gate, up, act(gate) and their product (Qwen2.5-VL), not fc1 and its
            activation (Qwen3-VL); vision_deepstack: its deepstack mergers (Qwen3-VL).
        patches_per_token: vision patches merged into one LM image token (merge²); patch_pixels: pixels
            of one LM image token ((patch x merge)²), 0 without a vision tower; patch_values: values of one
            patch (channels x temporal patch x patch²).
    """

    params: int
    vision_params: int
    root_params: int
    block_params: int
    largest_param: int
    layers: int
    hidden: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    heads: int = 0
    qk_norm: bool = False
    vision_layers: int = 0
    vision_hidden: int = 0
    vision_intermediate: int = 0
    vision_heads: int = 1
    vision_gated_mlp: bool = True
    vision_deepstack: int = 0
    patches_per_token: int = 0
    patch_pixels: int = 0
    patch_values: int = 0


def parse_run_config(args: list[str]) -> dict[str, Any]:
    """The merged run config (``-c`` files in order, then dotted overrides), with every default filled.
    Nothing runs, so nothing is seeded (``seed_everything`` would reseed the caller's generators)."""
    import warnings

    from mmsr.cli import lightning_cli

    with warnings.catch_warnings():  # LightningCLI warns that it is handed args other than sys.argv's
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        config = lightning_cli([*args, "--seed_everything", "false"], run=False, parse_only=True).config
    return config.as_dict()


def import_object(path: str) -> Any:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def instantiate(entry: dict[str, Any]) -> Any:
    """A ``class_path`` / ``init_args`` entry as an object, nested entries too (only for cheap
    constructors: builders, a tokenizer scaffold)."""
    args = dict(entry.get("init_args") or {})
    args = {k: instantiate(v) if isinstance(v, dict) and "class_path" in v else v for k, v in args.items()}
    return import_object(entry["class_path"])(**args)


def pretrained_config(path: str, gguf_file: str | None = None):
    """``config.json`` of a directory, of a hub id in the local cache, or of a known model by name."""
    from transformers import AutoConfig

    if Path(path).is_dir():
        return AutoConfig.from_pretrained(path, **({"gguf_file": gguf_file} if gguf_file else {}))
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError):
        pass
    known = KNOWN_CONFIGS / f"{Path(path).name}.json"
    if not known.is_file():
        raise FileNotFoundError(f"no config for {path!r}: not a directory, not in the Hugging Face cache, and "
                                f"not one of {sorted(p.stem for p in KNOWN_CONFIGS.glob('*.json'))}")  # fmt: skip
    return AutoConfig.from_pretrained(str(known))


def policy_config(builder: Any):
    """The transformers config of a policy builder (a tiny policy trains its small tokenizer first)."""
    from mmsr.models.build import PretrainedPolicy

    if isinstance(builder, PretrainedPolicy):
        return pretrained_config(builder.path, builder.gguf_file)
    if hasattr(builder, "config") and hasattr(builder, "train_tokenizer"):  # TinyQwen2_5_VL, TinyQwen3VL
        return builder.config(builder.train_tokenizer())
    raise TypeError(f"mmsr plan knows PretrainedPolicy and the tiny builders (config + train_tokenizer), "
                    f"not {type(builder).__name__}")  # fmt: skip


def meta_model(config):
    """The model of ``config`` on the meta device: shapes only, no memory, no weights."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    auto = AutoModelForImageTextToText if hasattr(config, "vision_config") else AutoModelForCausalLM
    with torch.device("meta"):
        return auto.from_config(config)


def model_shape(model) -> ModelShape:
    """Count ``model``'s parameters (exactly) and read its dimensions from its config."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [sum(p.numel() for p in m.parameters()) for m in model.modules() if type(m).__name__ in names]
    params = list(model.parameters())  # a tied embedding / lm_head once
    total = sum(p.numel() for p in params)
    vision = sum(p.numel() for n, p in model.named_parameters() if ".visual." in f".{n}")
    text = model.config.get_text_config()
    dims = dict(layers=text.num_hidden_layers, hidden=text.hidden_size, kv_heads=text.num_key_value_heads,
                head_dim=getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
                intermediate=text.intermediate_size, vocab=text.vocab_size, heads=text.num_attention_heads,
                qk_norm=any(n.rpartition(".")[2] == "q_norm" and ".visual." not in f".{n}."
                            for n, _ in model.named_modules()))  # fmt: skip
    return ModelShape(total, vision, total - sum(blocks), max(blocks, default=0), max(p.numel() for p in params),
                      **dims, **vision_dims(getattr(model.config, "vision_config", None), model))  # fmt: skip


def vision_dims(vision, model) -> dict[str, int]:
    """The vision tower's dimensions from its config (none without one); ``model``: the tower, or a model whose
    ``model.visual`` is the tower, where its MLP is looked at (gated: a ``gate_proj``)."""
    if vision is None:
        return {}
    tower = getattr(getattr(model, "model", None), "visual", model)
    merge = vision.spatial_merge_size**2
    return dict(vision_layers=vision.depth, vision_hidden=vision.hidden_size,
                vision_intermediate=vision.intermediate_size, vision_heads=vision.num_heads,
                vision_gated_mlp=any(hasattr(m, "gate_proj") for m in tower.modules()),
                vision_deepstack=len(getattr(vision, "deepstack_visual_indexes", None) or ()), patches_per_token=merge,
                patch_pixels=vision.patch_size**2 * merge,
                patch_values=vision.in_channels * vision.temporal_patch_size * vision.patch_size**2)  # fmt: skip


@dataclass(frozen=True)
class RunSpec:
    """The settings of a run that decide its memory and token budget (read by ``run_spec``).

    Attributes:
        world_size: ranks (``trainer.devices x trainer.num_nodes``); fsdp: ``ModelParallelStrategy``.
        param_dtype: master weights, grads and AdamW state; compute_dtype: forward/backward (FSDP2 gathers
            in it; the reference model is stored in it).
        kl: a reference model exists (``kl_coef > 0``); ref_offload: it waits in host memory.
        engine: ``vllm`` or ``hf``; engine_dtype: vLLM weights dtype; tp: vLLM tensor parallel size (only 1 runs).
        sync_dtype: dtype the weights are cast to before they are gathered and streamed to the engine.
        verify_every: syncs between the sync probe's checks (0: never); probe_text: its text
            (``WeightSync.probe_text``).
        max_pixels: the policy's image resize bound; images_per_episode: images at that bound per episode
            whose vision activations count (``mmsr plan --images-per-episode``).
        attention: the policy's ``attn_implementation`` (``auto``: flash-attention 2 where flash-attn is
            installed, else ``sdpa``); packed_rows: shared prefixes train in packed rows under a dense 4-D
            mask (``share_prefix`` on a GPU, or under gradient checkpointing or FSDP2, with an attention that
            takes the mask; ``mmsr.train.batch.prefix_route``).
    """

    world_size: int
    fsdp: bool
    param_dtype: str
    compute_dtype: str
    kl: bool
    ref_offload: bool
    gradient_checkpointing: bool
    micro_batch_tokens: int
    engine: str
    engine_dtype: str
    gpu_memory_utilization: float
    tp: int
    sleep_mode: bool
    max_model_len: int
    hf_batch: int
    sync_dtype: str
    bucket_mb: float
    prompts_per_rank: int
    num_generations: int
    max_rounds: int
    max_tokens_per_turn: int
    max_context_tokens: int
    mini_batches: int
    ppo_epochs: int
    max_pixels: int
    images_per_episode: int = 1
    attention: str = "sdpa"
    packed_rows: bool = False
    verify_every: int = 0
    probe_text: str = ""


def device_count(trainer: dict[str, Any]) -> tuple[int, int]:
    """(devices per node, nodes); ``trainer.devices`` must be a number of devices or a list of ids."""
    devices, nodes = trainer.get("devices", 1), trainer.get("num_nodes", 1) or 1
    devices = len(devices) if isinstance(devices, list) else devices
    if not str(devices).isdigit():
        raise ValueError(f"trainer.devices must be a number of devices to plan a run, got {devices!r}")
    return int(devices), int(nodes)


def is_fsdp2(strategy: str | dict[str, Any]) -> bool:
    """Whether ``trainer.strategy`` is Lightning's ``ModelParallelStrategy`` (or a subclass): FSDP2."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    name = strategy["class_path"] if isinstance(strategy, dict) else str(strategy)
    if "fsdp" in name.lower() or "deepspeed" in name.lower():
        raise ValueError(f"mmsr plan knows the strategies GRPOModule runs under (auto, ddp, ModelParallelStrategy), "
                         f"not {name}")  # fmt: skip
    return isinstance(strategy, dict) and issubclass(import_object(name), ModelParallelStrategy)


def world(trainer: dict[str, Any]) -> tuple[int, bool]:
    """(world size, FSDP2?) of the trainer; FSDP2 must shard over every rank with no tensor parallelism."""
    (devices, nodes), strategy = device_count(trainer), trainer.get("strategy") or "auto"
    if not is_fsdp2(strategy):
        return devices * nodes, False
    args = strategy.get("init_args") or {}
    dp, tp = args.get("data_parallel_size", "auto"), args.get("tensor_parallel_size", "auto")
    dp, tp = (nodes if dp == "auto" else dp), (devices if tp == "auto" else tp)  # Lightning's "auto"
    if tp != 1 or dp != devices * nodes:
        raise ValueError(f"ModelParallelStrategy: data_parallel_size ({dp}) must equal the world size "
                         f"devices x num_nodes ({devices * nodes}) with tensor_parallel_size 1 (got {tp})")  # fmt: skip
    return devices * nodes, True


def dtypes(model: dict[str, Any], trainer: dict[str, Any]) -> dict[str, str]:
    """param / compute / engine / sync dtypes, null values resolved as the code does: compute as
    ``GRPOModule`` derives it (``mmsr.parallel.compute_dtype``), vLLM's weights in compute dtype (an HF
    engine computes in it too), the sync in param dtype."""
    import torch

    from mmsr.parallel import compute_dtype

    param = model.get("param_dtype") or "float32"
    compute = str(compute_dtype(model.get("compute_dtype"), getattr(torch, param), trainer.get("precision")))
    compute = compute.removeprefix("torch.")
    engine = ((model.get("engine") or {}).get("init_args") or {}).get("dtype") or compute
    sync = ((model.get("weight_sync") or {}).get("init_args") or {}).get("dtype") or param
    return dict(param_dtype=param, compute_dtype=compute, engine_dtype=engine, sync_dtype=sync)


def engine_settings(model: dict[str, Any]) -> dict[str, Any]:
    """The rollout engine's memory settings (``HFEngine`` when none is configured); vLLM's tensor parallelism is
    refused as ``VLLMEngine.llm_kwargs`` refuses it."""
    engine = model.get("engine") or {"class_path": "mmsr.rollout.hf_engine.HFEngine"}
    args = engine.get("init_args") or {}
    if (tp := args.get("tensor_parallel_size", 1)) != 1:
        raise ValueError(f"model.engine.init_args.tensor_parallel_size must be 1 (got {tp}): each rank runs its own "
                         f"engine, {engine['class_path'].rpartition('.')[2]} has no tensor parallelism")  # fmt: skip
    return dict(engine="vllm" if engine["class_path"].endswith("VLLMEngine") else "hf",
                gpu_memory_utilization=args.get("gpu_memory_utilization", 0.5), tp=tp,
                sleep_mode=bool(args.get("enable_sleep_mode", False)), max_model_len=args.get("max_model_len", 8192),
                hf_batch=args.get("max_batch_size", 64), **sync_settings(model))  # fmt: skip


def signature_defaults(cls: type) -> dict[str, Any]:
    """``cls``'s constructor arguments that have a default, with it: what a config that omits them gets."""
    return {k: p.default for k, p in inspect.signature(cls).parameters.items() if p.default is not p.empty}


def sync_settings(model: dict[str, Any]) -> dict[str, Any]:
    """The weight sync's bucket size and probe (``WeightSync``'s defaults where the config sets none)."""
    from mmsr.sync import WeightSync

    args = signature_defaults(WeightSync) | ((model.get("weight_sync") or {}).get("init_args") or {})
    return dict(bucket_mb=float(args["bucket_mb"]), verify_every=args["verify_every"], probe_text=args["probe_text"])


def engine_context(engine: dict[str, Any] | None) -> tuple[str, int | None]:
    """The configured engine's class name and ``max_model_len`` (its ``init_args``', else its class's default;
    ``None`` for an engine without one, as ``HFEngine``, the default): what ``refuse_short_engine`` reads off the
    started engine, read without starting it."""
    cls = import_object((engine or {}).get("class_path") or "mmsr.rollout.hf_engine.HFEngine")
    return cls.__name__, (signature_defaults(cls) | ((engine or {}).get("init_args") or {})).get("max_model_len")


def refuse_unstartable(module: type, model: dict[str, Any]) -> None:
    """Refuse a GRPO config ``mmsr fit`` would refuse once the module (``module``, a ``GRPOModule``) is built, by
    the same checks on ``model.init_args`` alone: ``RolloutSettings``' ranges, an engine shorter than an episode
    (``refuse_short_context``) and the module's and update's ranges (``GRPOModule.checked_settings``). Nothing is
    built: the tools' checks (budgets, ``tool_limits`` names) are left to ``mmsr fit``."""
    from mmsr.module import GRPOModule
    from mmsr.module_checks import refuse_short_context
    from mmsr.rollout.loop import RolloutSettings

    args = signature_defaults(GRPOModule) | model
    rollout = args["rollout"]
    rollout = rollout if isinstance(rollout, RolloutSettings) else RolloutSettings(**rollout)
    refuse_short_context(*engine_context(args.get("engine")), rollout)
    module.checked_settings(args, rollout)


def run_spec(config: dict[str, Any]) -> RunSpec:
    """Read a parsed run config (``parse_run_config``) into the numbers the plan needs (a GRPO run's), refusing
    one that could not start (``refuse_unstartable``)."""
    from mmsr.module import GRPOModule

    if not issubclass(module := import_object(path := config["model"]["class_path"]), GRPOModule):
        raise ValueError(f"mmsr plan sizes GRPO runs (model.class_path: mmsr.module.GRPOModule), not {path}: "
                         f"warm-start (SFTModule) configs are not planned")  # fmt: skip
    trainer, model = config["trainer"], config["model"]["init_args"]
    refuse_unstartable(module, model)
    size, fsdp = world(trainer)
    rollout, policy = model.get("rollout") or {}, model["policy"].get("init_args") or {}
    attention = policy.get("attn_implementation") or "sdpa"  # the tiny builders take transformers' default
    checkpointed = bool(model.get("gradient_checkpointing"))
    return RunSpec(
        world_size=size, fsdp=fsdp, **dtypes(model, trainer), **engine_settings(model),
        kl=model.get("kl_coef", 0.001) > 0, ref_offload=bool(model.get("ref_offload")),
        gradient_checkpointing=checkpointed, attention=attention,
        packed_rows=model.get("share_prefix", True) and attention != "flash_attention_2"
        and (fsdp or checkpointed or trainer.get("accelerator") != "cpu"),  # the KV cache route: the CPU's alone
        micro_batch_tokens=model["micro_batch_tokens"],
        prompts_per_rank=config["data"]["prompts_per_step"], num_generations=model["num_generations"],
        max_rounds=rollout.get("max_rounds", 3), max_tokens_per_turn=rollout.get("max_tokens_per_turn", 256),
        max_context_tokens=rollout.get("max_context_tokens", 4096), mini_batches=model["mini_batches"],
        ppo_epochs=model["ppo_epochs"], max_pixels=policy.get("max_pixels") or QWEN_DEFAULT_MAX_PIXELS,
    )  # fmt: skip
