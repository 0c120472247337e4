"""The start-up checks of ``mmsr fit`` (and of a config ``mmsr plan`` sizes or the demo fits): settings that
conflict, inputs that are missing or are not what their key takes, each refused in one line naming the key
before the policy loads and the engine starts (minutes into a 7B run), where Lightning or the modules would
find them only once built."""

from __future__ import annotations

import importlib
import inspect
import os
from pathlib import Path

import yaml

from mmsr.checks import refuse_out_of_range
from mmsr.cli_errors import config_files
from mmsr.data.paths import missing

# Lightning's names for a checkpoint it looks up itself (``--ckpt_path last``)
LIGHTNING_CKPT_NAMES = ("last", "best", "hpc", "registry")


def check_manual_optimization(trainer, module) -> None:
    """mmsr's modules step their optimizers themselves, and Lightning refuses its automatic gradient
    accumulation and clipping for such modules: say which settings do that instead."""
    if module.automatic_optimization:  # a user's own LightningModule: Lightning's settings apply
        return
    if trainer.accumulate_grad_batches != 1:
        raise ValueError("trainer.accumulate_grad_batches: the modules already accumulate a step's gradients over "
                         "micro-batches of model.micro_batch_tokens padded tokens; for more prompts per update raise "
                         "data.prompts_per_step (GRPO: model.mini_batches updates a step, each on a share of them)")
    if trainer.gradient_clip_val is not None:
        raise ValueError("trainer.gradient_clip_val: the modules clip the gradient norm themselves; set "
                         "model.grad_clip (default 1.0)")


def add_final_checkpoint(trainer) -> None:
    """``FinalCheckpoint`` on a trainer with a ``ModelCheckpoint``: ``last.ckpt`` then holds the run's last step, not
    the last one the interval hit, and a save at the end of a cut epoch records it running (the CPU demo checkpoints
    nothing: it gets none)."""
    from mmsr.callbacks.final_checkpoint import FinalCheckpoint, checkpoints

    if checkpoints(trainer) and not any(isinstance(c, FinalCheckpoint) for c in trainer.callbacks):
        trainer.callbacks.append(FinalCheckpoint())


def check_inputs_exist(config) -> None:
    """The data files and the checkpoint a command reads exist, checked before anything is built: Lightning
    looks for them only after the policy loads (data) or even the engine starts and FSDP shards the model
    (``ckpt_path``), minutes into a 7B run. Lightning's own checkpoint names and remote paths are left to it.
    ``model.export_dir``, written at the end of training, is checked too: a file there failed the finished run."""
    from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
    from lightning.pytorch.utilities.model_registry import _is_registry

    for key in ("data.train_files", "data.val_files"):
        for i, path in enumerate(config.get(key) or []):
            if not Path(path).exists():  # a file, or a saved ``datasets`` directory
                raise missing(path, f"{key}[{i}]: data file")
    check_export_dir(config)
    ckpt = config.get("ckpt_path")
    if not ckpt or str(ckpt) in LIGHTNING_CKPT_NAMES or _is_registry(ckpt) or not _is_local_file_protocol(ckpt):
        return
    if not Path(ckpt).exists():  # a file, or a sharded checkpoint's directory
        raise missing(ckpt, "ckpt_path: checkpoint")
    check_is_checkpoint(Path(ckpt))


def check_export_dir(config) -> None:
    """``model.export_dir`` can become a directory: neither it nor a folder above it is a file (``save_policy``
    makes the directory after the last step, and a file there stopped the finished run with ``FileExistsError``)."""
    export_dir = ((config.get("model") or {}).get("init_args") or {}).get("export_dir")
    if not export_dir:
        return
    path = Path(export_dir)
    taken = next((p for p in (path, *path.parents) if p.exists() or p.is_symlink()), None)
    if taken is not None and not taken.is_dir():
        where = "" if taken == path else f" ({taken} in its path)"
        raise FileExistsError(f"model.export_dir {path}{where}: exists and is not a directory")


# The first bytes of a file ``torch.save`` wrote: a zip archive (since torch 1.6), or a pickle (the legacy format)
TORCH_SAVE_MAGIC = (b"PK\x03\x04", b"\x80")


def check_is_checkpoint(ckpt: Path) -> None:
    """``ckpt_path`` is a checkpoint: a file ``torch.save`` wrote (its first bytes), or a sharded checkpoint's
    directory (its ``meta.pt``, as Lightning tells one). A run's folder or config file failed only once the model
    was built (``IsADirectoryError``, ``UnpicklingError``), leaving a new, empty run directory behind."""
    from lightning.fabric.utilities.load import _METADATA_FILENAME

    if ckpt.is_dir():
        if not (ckpt / _METADATA_FILENAME).is_file():
            raise ValueError(f"ckpt_path {ckpt}: a directory, not a checkpoint (a sharded checkpoint's directory has "
                             f"a {_METADATA_FILENAME}); {_checkpoint_hint(ckpt)}")  # fmt: skip
        return
    with ckpt.open("rb") as file:
        head = file.read(4)
    if not head.startswith(TORCH_SAVE_MAGIC):
        raise ValueError(f"ckpt_path {ckpt}: not a checkpoint (not a file torch.save wrote); "
                         f"{_checkpoint_hint(ckpt)}")  # fmt: skip


def _checkpoint_hint(ckpt: Path) -> str:
    """What to give instead of ``ckpt``: the ``last.ckpt`` of the run folder it is or is in, if there is one."""
    folder = ckpt if ckpt.is_dir() else ckpt.parent
    for candidate in (folder / "last.ckpt", folder / "checkpoints" / "last.ckpt"):
        if candidate.exists():
            return f"give the checkpoint, e.g. {candidate}"
    return "give the checkpoint, e.g. runs/x/csv/version_0/checkpoints/last.ckpt"


def check_step_settings(config) -> None:
    """Step settings that only conflict once training runs, checked before the policy and engine are built."""
    init, data = config.model.get("init_args") or {}, config.get("data") or {}
    mini, prompts, group = init.get("mini_batches"), data.get("prompts_per_step"), init.get("num_generations")
    check_counts(config.model.get("class_path"), group, prompts)  # a step of 0 episodes: not too many mini-batches
    if None not in (mini, prompts, group) and mini > prompts * group:  # else refused at the first step
        raise ValueError(f"model.mini_batches={mini} splits each step's episodes into {mini} updates, but a step has "
                         f"data.prompts_per_step x model.num_generations = {prompts} x {group} = {prompts * group} "
                         "episodes on each rank: lower model.mini_batches or raise the others")  # fmt: skip
    if None not in (init.get("lr_schedule"), init.get("warmup_steps"), init.get("total_steps")):
        from mmsr.optim import check_schedule  # torch and Lightning: loaded by fit by now

        check_schedule(init["lr_schedule"], init["warmup_steps"], init["total_steps"])  # else refused once built
    check_schedule_length(init, config.trainer.get("max_steps"))
    check_distributed_sampler(config.trainer)


def check_counts(class_path: str | None, group: int | None, prompts: int | None) -> None:
    """A step's counts, refused in their owners' words (``GRPOModule``, ``MMSRDataModule``) before their product is."""
    from mmsr.module import GRPOModule

    if prompts is not None:
        refuse_out_of_range("MMSRDataModule", [("prompts_per_step", prompts, prompts >= 1, ">= 1")])
    if group is not None and isinstance(class_path, str) and issubclass(_imported(class_path), GRPOModule):
        refuse_out_of_range(class_path.rpartition(".")[2], [
            ("num_generations", group, group >= 2, ">= 2, the GRPO group size")])  # fmt: skip


def check_distributed_sampler(trainer) -> None:
    """A run of several processes sets ``trainer.use_distributed_sampler: false``, refused before the policy is
    built and the engine started (the data module refused it only when the first batch was asked for)."""
    from mmsr.data.datamodule import DISTRIBUTED_SAMPLER

    devices, nodes = trainer.get("devices"), trainer.get("num_nodes") or 1
    if trainer.get("use_distributed_sampler") is not False and _fewest_devices(devices) * nodes > 1:
        raise ValueError(f"trainer.devices={devices} x trainer.num_nodes={nodes}: {DISTRIBUTED_SAMPLER}")


def _fewest_devices(devices) -> int:
    """The fewest devices a node runs under Lightning's ``trainer.devices``: a count, a list of ids, ``"0,1"`` (ids),
    ``"2"``; 1 for ``"auto"``, ``-1`` (all: maybe one) and anything else left to Lightning to read or refuse."""
    if isinstance(devices, (list, tuple)):
        return len(devices)
    text = str(devices).strip()
    if "," in text:  # ids, ``"1,"`` is device 1
        return len([i for i in text.split(",") if i.strip()])
    return int(text) if text.isdigit() and int(text) > 1 else 1


def check_schedule_length(init, max_steps: int | None) -> None:
    """A cosine schedule ends where training does. It steps once a training step and holds its floor, lr 0, after
    ``total_steps``: a shorter one trains the last steps with lr 0 (refused), a longer one stops mid-decay (warned).
    ``trainer.max_steps`` counts optimizer updates, ``ppo_epochs x mini_batches`` a GRPO step."""
    total = init.get("total_steps")
    if init.get("lr_schedule") != "cosine" or total is None or not max_steps or max_steps < 0:
        return
    updates = (init.get("ppo_epochs") or 1) * (init.get("mini_batches") or 1)
    steps = -(-max_steps // updates)  # Lightning ends a step's updates before it stops
    per_step = f"{updates} a step" + (": model.ppo_epochs x model.mini_batches" if "mini_batches" in init else "")
    run = f"{steps} training steps (trainer.max_steps={max_steps} optimizer updates, {per_step})"
    if total < steps:
        raise ValueError(f"model.total_steps={total} < {run}: the cosine lr schedule is 0 from step {total} on, so the "
                         f"last {steps - total} steps would not train; set model.total_steps: {steps}")  # fmt: skip
    if total > steps:
        from lightning.pytorch.utilities import rank_zero_warn

        rank_zero_warn(f"model.total_steps={total} > {run}: the cosine lr schedule stops part way, its lr never "
                       f"decays to 0; model.total_steps: {steps} decays it over the run")  # fmt: skip


def check_tools_ready(model, config) -> None:
    """The start-up check of the model's tools (``mmsr.tools.base.check_ready``: a file a tool reads on first
    use is there), before the model loads and the engine starts. The tools are built once more for it when a
    class of theirs checks anything itself (not only forwarding to what it wraps): building one touches no
    file, but some take seconds (``LocalImageSearch`` makes its thumbnails)."""
    from mmsr.eval.load import TOOL_ARGS, build_tools
    from mmsr.tools.base import check_ready
    from mmsr.tools.spec import Tool

    init = model.get("init_args") or {}
    values = {k: v.as_dict() if hasattr(v, "as_dict") else v for k in TOOL_ARGS if (v := init.get(k)) is not None}
    checking = [c for c in map(_imported, _class_paths(values)) if "check_ready" in vars(c) and not issubclass(c, Tool)]
    if checking:
        check_ready(build_tools(values, str(config[-1]) if config else "the command line"))


def _class_paths(value) -> list[str]:
    """Every ``class_path`` in a nested config (dicts and lists)."""
    if isinstance(value, dict):
        own = [value["class_path"]] if isinstance(value.get("class_path"), str) else []
        return own + [p for v in value.values() for p in _class_paths(v)]
    return [p for v in value for p in _class_paths(v)] if isinstance(value, list) else []


def _imported(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def refuse_function_init_args(args: list[str], cwd: str) -> None:
    """No ``class_path`` in a ``-c`` file names a function and gives it ``init_args``: jsonargparse passes the
    function itself where a protocol is taken (``reward: Reward``) and drops its ``init_args`` without a word,
    so the run failed at the first step's reward, or scored with the function's defaults. Read from the files
    (relative to ``cwd``): the parsed config no longer holds them. A function without ``init_args`` is a
    callable reward or script, as meant."""
    for path in config_files(args):
        try:
            tree = yaml.safe_load((Path(cwd) / path).read_text())
        except (OSError, yaml.YAMLError):  # jsonargparse reports these itself
            continue
        for key, class_path, names in _function_entries(tree, ""):
            raise ValueError(f"{path}: {key}class_path {class_path} is a function, not a class: its init_args "
                             f"({', '.join(names)}) would be dropped; give a class whose __init__ takes them")


def _function_entries(value, key: str):
    """``(key, class_path, init_args' names)`` of every entry in a nested config whose class_path imports as a
    function and has init_args (a class_path that does not import is left to jsonargparse to name)."""
    if isinstance(value, list):
        for i, item in enumerate(value):
            yield from _function_entries(item, f"{key[:-1]}[{i}].")
        return
    if not isinstance(value, dict):
        return
    class_path, init = value.get("class_path"), value.get("init_args")
    if isinstance(class_path, str) and isinstance(init, dict) and init:
        try:
            if inspect.isroutine(_imported(class_path)):
                yield key, class_path, [str(name) for name in init]
        except (ImportError, AttributeError, ValueError):
            pass
    for name, item in value.items():
        yield from _function_entries(item, f"{key}{name}.")


# wandb's modes that log nothing to a server (``WANDB_MODE``, ``mode``): no key is needed
WANDB_LOCAL_MODES = ("offline", "dryrun", "disabled")


def check_wandb_login(trainer) -> None:
    """A ``WandbLogger`` that logs online has a wandb key (``wandb.login`` without the network round trip: a key
    from ``WANDB_API_KEY`` or ``wandb login``; at a terminal wandb asks for one, as it would have later), before
    the policy loads: wandb's ``No API key configured`` came only once the module was built (a 7B policy loaded)."""
    loggers = trainer.get("logger")
    online = [e for e in (loggers if isinstance(loggers, list) else [loggers]) if _online_wandb(e)]
    if not online or os.environ.get("WANDB_MODE") in WANDB_LOCAL_MODES or os.environ.get("WANDB_DISABLED") == "true":
        return
    if launch_rank() != 0:  # only rank 0 logs: the other ranks' nodes need no key
        return
    import wandb

    try:
        wandb.login(verify=False)
    except wandb.errors.UsageError as exc:
        raise ValueError(f"trainer.logger WandbLogger: {exc} (or export WANDB_API_KEY), or log offline: "
                         "WANDB_MODE=offline (`wandb sync` the run later)") from None


def launch_rank() -> int:
    """This process's rank as its launcher set it (torchrun's ``RANK``, ``LOCAL_RANK`` of the processes Lightning
    starts, SLURM's), as Lightning reads it; 0 where none is set (the process that starts the others)."""
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


def _online_wandb(entry) -> bool:
    """Whether a ``trainer.logger`` entry is a ``WandbLogger`` that is not set to log offline itself."""
    if not callable(getattr(entry, "get", None)) or not str(entry.get("class_path", "")).endswith(".WandbLogger"):
        return False
    init = entry.get("init_args") or {}
    return not init.get("offline") and init.get("mode") not in WANDB_LOCAL_MODES
