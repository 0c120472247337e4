"""Where the weights live: precision and FSDP2 sharding of the policy, the reference model and the
HF engine's copy (``GRPOModule.configure_model`` calls these).

The paper's regime is fp32 master weights with bf16 compute: AdamW at lr 2e-6 moves a bf16 weight
of magnitude ~1e-2 by less than half its rounding step, so updates applied to bf16 parameters are
mostly lost (measured: 3.8% of bf16 weights changed after 10 updates vs 99.9% in fp32). So the
parameters and optimizer state stay in ``param_dtype`` and only the matmuls run in
``compute_dtype``: under FSDP2 through ``MixedPrecisionPolicy`` (shards gathered in bf16, gradients
reduced in fp32), on one device through ``torch.autocast`` (``Policy.autocast``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch.distributed.tensor import DTensor

from mmsr.checkpoint import adopt_dtypes, gather_per_rank
from mmsr.models.policy import runs_beside_other_ranks

PRECISION_COMPUTE = {"bf16-mixed": torch.bfloat16}
# Lightning's short names (``trainer.precision`` reads them normalized; a config read by ``mmsr plan`` may not)
PRECISION_ALIASES = {"16": "16-mixed", "bf16": "bf16-mixed", "32": "32-true", "64": "64-true"}


def lightning_precision(trainer_precision: str | int | None) -> str | None:
    """``trainer.precision`` as Lightning names it once it has normalized it (``16`` -> ``16-mixed``)."""
    if trainer_precision is None:
        return None
    return PRECISION_ALIASES.get(str(trainer_precision), str(trainer_precision))


def compute_dtype(requested: str | None, param_dtype: torch.dtype, trainer_precision: str | int | None) -> torch.dtype:
    """The matmul dtype: the module's ``compute_dtype`` if set, else Lightning's mixed precision
    (``bf16-mixed`` -> bf16), else the parameters' dtype. ``16-mixed`` / ``bf16-true`` / ``16-true`` /
    ``64-true`` are refused (``refuse_true_precision``), and so are fp16 matmuls over wider parameters
    (``refuse_fp16_compute``) and a dtype wider than the parameters' or than the trainer's mixed precision
    (``GRPOModule.setup`` calls this before the engine starts, ``mmsr plan`` before it sizes)."""
    trainer_precision = lightning_precision(trainer_precision)
    refuse_true_precision(trainer_precision, param_dtype)
    compute = getattr(torch, requested) if requested else PRECISION_COMPUTE.get(str(trainer_precision), param_dtype)
    # Autocast only lowers precision: torch turns an fp32 autocast over bf16 weights off with a warning, so the
    # matmuls ran in bf16 while FSDP2 gathered fp32. ``Policy.autocast`` refused it, but at the first forward only.
    if compute.itemsize > param_dtype.itemsize:
        wide, params = (str(d).removeprefix("torch.") for d in (compute, param_dtype))
        source = f"model.compute_dtype {requested!r}" if requested else f"trainer.precision {trainer_precision!r}"
        raise ValueError(f"{source} is wider than model.param_dtype {params!r}: autocast only lowers "
                         f"precision (the matmuls would run in {params}); for {wide} matmuls set model.param_dtype: "
                         f"{wide}")  # fmt: skip
    refuse_wider_than_mixed(requested, compute, trainer_precision)
    refuse_fp16_compute(requested, compute, param_dtype)
    return compute


def refuse_fp16_compute(requested: str | None, compute: torch.dtype, param_dtype: torch.dtype) -> None:
    """Refuse ``model.compute_dtype: float16`` over wider parameters: an fp16 autocast (FSDP2: an fp16
    ``MixedPrecisionPolicy``) with no loss scaling, so small gradients underflow to 0 in the fp16 backward. Lightning's
    ``16-mixed`` scales the loss for that, and is refused too (``refuse_loss_scaling``)."""
    if compute == torch.float16 and param_dtype != torch.float16:
        raise ValueError(f"model.compute_dtype {requested!r} runs the matmuls in float16 with no loss scaling (small "
                         "gradients underflow to 0): use trainer.precision 'bf16-mixed' (fp32 master weights, bf16 "
                         "matmuls, model.compute_dtype: bfloat16 or unset) or '32-true'")  # fmt: skip


def refuse_wider_than_mixed(requested: str | None, compute: torch.dtype, trainer_precision: str | None) -> None:
    """Refuse a ``model.compute_dtype`` wider than ``trainer.precision``'s mixed dtype (float32 under bf16-mixed).

    Lightning's mixed-precision plugin autocasts every ``training_step`` to bf16, and an fp32 ``Policy.autocast``
    is no autocast at all (the parameters are fp32): the update's matmuls ran in bf16 (the LM head's logits came
    out bf16) while FSDP2 gathered the shards in fp32, paying fp32's memory and traffic for bf16 matmuls.
    """
    mixed = PRECISION_COMPUTE.get(str(trainer_precision))
    if requested and mixed is not None and compute.itemsize > mixed.itemsize:
        low = str(mixed).removeprefix("torch.")
        raise ValueError(f"model.compute_dtype {requested!r} is wider than trainer.precision {trainer_precision!r}, "
                         f"which autocasts every training step to {low} (the matmuls would run in {low}): for "
                         f"{requested} matmuls set trainer.precision: 32-true")  # fmt: skip


def refuse_true_precision(trainer_precision: str | None, param_dtype: torch.dtype = torch.float32) -> None:
    """Refuse Lightning's ``bf16-true`` / ``16-true`` / ``64-true`` before the first step, saying what
    to use instead.

    With fp32 master weights the half ones would cast them (AdamW updates at RL learning rates are lost
    to bf16 rounding). Whatever the weights, Lightning's ``-true`` plugins also convert every batch (a
    step's batch is frozen ``Sample`` records, which it cannot rebuild: the first step failed with
    Lightning's "frozen dataclass" error) and make their dtype the default of every tensor a step
    creates (rewards, advantages, loss normalizers). Low-precision weights on purpose are the policy's
    own dtype (``param_dtype: bfloat16`` of ``GRPOModule`` or ``SFTModule``) under ``32-true``. ``16-mixed``
    is refused too (``refuse_loss_scaling``).
    """
    trainer_precision = lightning_precision(trainer_precision)
    refuse_loss_scaling(trainer_precision)
    if trainer_precision == "64-true":
        raise ValueError("trainer.precision '64-true' casts the policy to float64 and converts every batch (frozen "
                         "Sample records it cannot rebuild): use '32-true' or 'bf16-mixed'")  # fmt: skip
    if trainer_precision not in ("bf16-true", "16-true"):
        return
    why = ("casts the master weights, and AdamW updates at RL learning rates are lost to bf16 rounding"
           if param_dtype == torch.float32 else
           "converts every batch (frozen Sample records it cannot rebuild) and makes the low precision the "
           "default dtype of every tensor a step creates (rewards, advantages)")  # fmt: skip
    raise ValueError(f"trainer.precision {trainer_precision!r} {why}: use 'bf16-mixed' (fp32 master weights, "
                     "bf16 matmuls), or to train bf16 weights on purpose model.param_dtype: bfloat16 "
                     "under trainer.precision '32-true'")


def refuse_loss_scaling(trainer_precision: str | int | None) -> None:
    """Refuse Lightning's ``16-mixed`` (fp16 autocast with a ``GradScaler``) before the first rollout.

    Under manual optimization Lightning scales the loss in ``manual_backward`` and unscales the gradients only
    inside ``optimizer.step()``, after ``PolicyUpdate`` / ``SFTModule`` have clipped them: the clip saw gradients
    ~65,536x too large, so every update was ~65,000x too small and ``train/grad_norm`` was the scaled norm.
    Unscaling before the clip fails too: the scaler refuses a second ``unscale_`` before its ``step``.
    """
    if lightning_precision(trainer_precision) == "16-mixed":
        raise ValueError(f"trainer.precision {trainer_precision!r} scales the loss and unscales the gradients only "
                         "inside optimizer.step(), after mmsr clips them (updates ~65,000x too small): use "
                         "'bf16-mixed' (fp32 master weights, bf16 matmuls, no loss scaling) or '32-true'")  # fmt: skip


def data_parallel_mesh(device_mesh, module: str):
    """The ``data_parallel`` dimension of ``ModelParallelStrategy``'s ``device_mesh``, over which FSDP2 shards the
    policy; a mesh with a ``tensor_parallel`` dimension of size > 1 is refused (``module``: the caller, named).

    mmsr does no tensor parallelism, and Lightning's default sizes (``data_parallel_size`` auto: the number of
    nodes; ``tensor_parallel_size`` auto: the devices per node) put one node's ranks in a tensor-parallel group:
    FSDP2 then sharded over a data-parallel mesh of one rank, and each rank trained its own unsharded copy with
    no gradient reduction (2 ranks ended one step with different weights). ``mmsr plan`` refuses such a config.
    """
    sizes = dict(zip(device_mesh.mesh_dim_names, device_mesh.shape))
    if sizes.get("tensor_parallel", 1) != 1:
        world = sizes["tensor_parallel"] * sizes.get("data_parallel", 1)
        raise ValueError(f"{module} under ModelParallelStrategy with tensor_parallel_size {sizes['tensor_parallel']} "
                         f"and data_parallel_size {sizes.get('data_parallel', 1)}: mmsr shards over data-parallel ranks "
                         f"only (each rank would train its own copy, no gradients reduced); set "
                         f"trainer.strategy.init_args.data_parallel_size: {world} (the world size) and "
                         f"tensor_parallel_size: 1")  # fmt: skip
    return device_mesh["data_parallel"]


def cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``model`` with its parameters in ``dtype`` (in place: the same ``Parameter`` objects); buffers keep theirs.
    ``Module.to(bf16)`` would round the rotary ``inv_freq`` tables too, and positions drift (cos off by 0.15 at
    position 1,000). A no-op for parameters already in ``dtype``."""
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return model


def block_types(model: torch.nn.Module) -> set[str]:
    """Class names of the model's transformer blocks (``_no_split_modules``): the FSDP2 units."""
    return set(getattr(model, "_no_split_modules", None) or [])


def shard(model: torch.nn.Module, mesh, dtype: torch.dtype | None = None, **fsdp_kwargs) -> torch.nn.Module:
    """``fully_shard`` every transformer block, then the root, over ``mesh``.

    Each block is cast to ``dtype`` right before it is sharded (the shards move to the mesh's device),
    so host memory never holds the whole model in ``dtype``: a 7B policy loaded in bf16 becomes fp32
    master shards with one fp32 block at a time in host memory.

    The root reshards after its forward too (FSDP2 keeps the root gathered for the backward by
    default): forwards without a backward (reference and old log-probs, the sync probe) would
    otherwise leave the embeddings and LM head (~1.1B parameters of a 7B model) gathered on every rank.
    """
    from torch.distributed.fsdp import fully_shard

    blocks = block_types(model)
    for module in list(model.modules()):
        if type(module).__name__ in blocks:
            if dtype is not None:
                module.to(dtype)
            fully_shard(module, mesh=mesh, **fsdp_kwargs)
    if dtype is not None:  # what is left at the root: embeddings, LM head, final norm, vision merger
        for p in model.parameters():
            if not isinstance(p, DTensor):
                p.data = p.data.to(dtype)
    fully_shard(model, mesh=mesh, reshard_after_forward=True, **fsdp_kwargs)
    return model


def mixed_precision(compute: torch.dtype, param: torch.dtype):
    """FSDP2's policy: gather shards in ``compute`` and reduce gradients in fp32 (if they differ)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if compute == param:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)


def local_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters this rank holds (its shards under FSDP2)."""
    local = (p.to_local() if isinstance(p, DTensor) else p for p in model.parameters())
    return sum(t.numel() * t.element_size() for t in local)


def copy_to(model: torch.nn.Module, dtype: torch.dtype, device: torch.device | str) -> torch.nn.Module:
    """A frozen, unsharded copy of ``model`` with its parameters in ``dtype`` on ``device`` (eval mode, no
    grads). Buffers keep their dtype, as in ``model``: ``Module.to(bf16)`` would round the rotary ``inv_freq``
    tables too, and the copy's positions would drift from the model's (cos off by 0.15 at position 1,000)."""
    return cast_parameters(copy.deepcopy(model), dtype).to(device).eval().requires_grad_(False)


def gather_full(model: torch.nn.Module, keep: bool) -> torch.nn.Module | None:
    """An unsharded copy of the FSDP2-sharded ``model`` holding its full weights and its generation config, on
    the ranks that ``keep`` it (rank 0), ``None`` elsewhere. A collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not keep:
        return None
    unsharded = type(model)(model.config)  # built in the default dtype: given the trainer's, as a 1-rank run saves
    adopt_dtypes(unsharded, full)
    unsharded.load_state_dict(full)
    # a model built from its config gets generation defaults derived from it; the policy's own (a pretrained
    # model's eos id list, which ``Policy.stop_token_ids`` reads, its sampling defaults) would be lost on export
    if getattr(model, "generation_config", None) is not None:
        unsharded.generation_config = copy.deepcopy(model.generation_config)
    return unsharded


def all_reduce(value: float, op: Literal["sum", "max"], device: torch.device) -> float:
    """``value`` summed or maxed over ranks (itself outside distributed runs)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return float(value)
    t = torch.tensor(float(value), device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return float(t)


def all_reduce_sums(values: Sequence[float], device: torch.device) -> list[float]:
    """Each of ``values`` summed over ranks, in one collective (``all_reduce``'s one a value costs a round trip
    each); themselves outside distributed runs."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)  # [len(values)]
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def first_error(message: Any | None, device: torch.device) -> tuple[int, Any] | None:
    """``(rank, message)`` of the lowest rank with a ``message`` (what it stops on: a picklable object, e.g. the
    error's text), None where no rank has one: a rank that stops alone leaves the others waiting in the step's next
    collective (NCCL: until its timeout). A collective on several ranks (every rank calls it at the same point): one
    all_reduce of one number, and the messages gathered only when a rank has one. This rank's own outside
    distributed runs."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None if message is None else (0, message)
    if not all_reduce(float(message is not None), "max", device):
        return None
    messages = gather_per_rank(message)
    return next((rank, m) for rank, m in enumerate(messages) if m is not None)


def stop_together(error: Exception | None, device: torch.device, other: Callable[[int, Any], Exception],
                  message: Any) -> None:  # fmt: skip
    """Raise ``error`` on its rank, and on every other rank ``other(rank, message)`` of the lowest rank that has
    one (``first_error``; ``message``: what the others are told of this rank's ``error``, ignored without one): an
    error that would stop one rank alone leaves the others waiting in the next collective. Nothing where no rank
    has one. A collective on several ranks, as ``first_error``."""
    first = first_error(message if error is not None else None, device)
    if error is not None:
        raise error
    if first is not None:
        raise other(*first)


def drop_idle_gradients(module: torch.nn.Module | None, used: bool, device: torch.device) -> None:
    """Set ``module``'s gradients to None after a step that used it on no rank (``used``: this rank's micro-batches
    held an image). On several ranks a text-only forward runs the vision tower at zero weight (``idle_vision_tower``)
    and leaves zero gradients where one process leaves none; AdamW moves a parameter whose gradient is zero (its step
    count and bias correction, weight decay), so N ranks updated otherwise than one process (the warm start's
    reading steps). A collective on several ranks: every rank calls it once an optimizer step."""
    import torch.distributed as dist

    if module is None or not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    if not all_reduce(float(used), "max", device):
        for p in module.parameters():
            p.grad = None


def refuse_one_device_ddp(wrapped: torch.nn.Module, tower: torch.nn.Module | None, module: str) -> None:
    """Refuse plain DDP (no ``find_unused_parameters``) on one device for a policy with a vision ``tower``, before the
    first step. ``wrapped``: the strategy's model (the DDP wrapper under DDP).

    A micro-batch without an image (a text-only row, a warm-start reading step) gives the tower no gradient. On
    several ranks it runs at zero weight (``idle_vision_tower``), so DDP gets every gradient; alone it is left out, as
    one process leaves it, and DDP failed the next backward with Lightning's "parameters that were not used in
    producing the loss", naming neither the rows nor the tower (GRPO: after its first rollout). Called from
    ``on_fit_start``, where the wrapper exists and no rollout has run."""
    if tower is None or runs_beside_other_ranks() or getattr(wrapped, "find_unused_parameters", True):
        return
    raise ValueError(f"{module} under trainer.strategy ddp on one device: a micro-batch without an image (a text-only "
                     "row, a reading step) leaves the vision tower without gradients, which plain DDP fails on (on "
                     "several ranks the tower runs at zero weight); set trainer.strategy: auto or "
                     "ddp_find_unused_parameters_true")  # fmt: skip


def memory_metrics(model: torch.nn.Module, reference: torch.nn.Module | None, device: torch.device) -> dict[str, float]:
    """``memory/``, the largest over ranks: MB of policy and reference weights a rank holds (its
    shards under FSDP2), and on CUDA the step's peak allocated GB (compare with ``mmsr plan``)."""
    out = {"memory/policy_mb": local_bytes(model) / 2**20}
    if reference is not None:
        out["memory/reference_mb"] = local_bytes(reference) / 2**20
    if torch.cuda.is_available() and device.type == "cuda":
        out["memory/cuda_peak_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
    return {k: all_reduce(v, "max", device) for k, v in out.items()}
