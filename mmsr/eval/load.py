"""What ``mmsr eval`` / ``mmsr curate`` evaluate: a policy with its engine, tools and episode limits.

Three sources:
- a Lightning checkpoint of ``GRPOModule`` or ``SFTModule`` (the warm start), a single file or a
  ``ModelParallelStrategy`` distributed checkpoint directory (``mmsr.checkpoint.load_weights``): the
  module is rebuilt from the run's ``config.yaml`` (LightningCLI writes it to the log directory; looked
  up next to the checkpoint and one level up) with the reference model left out, then the checkpoint's
  weights are loaded, in the checkpoint's dtype; an ``SFTModule``'s policy generates with ``HFEngine``.
  Only this path and ``--weights`` import Lightning. Checkpoint files are unpickled: load only your own.
- a Hugging Face model directory (``PretrainedPolicy``), generated with ``HFEngine``;
- a YAML with a policy ``class_path`` entry (e.g. ``TinyQwen2_5_VL``), optionally with weights.
Every source ends by binding the engine to the policy and syncing the policy's weights into it with a
probe check (``WeightSync(verify_every=1)``): an engine that holds its own weights (vLLM starts from
the base model) evaluates the loaded weights, or ``StaleWeightsError`` says it does not.
Tools come from a YAML with ``image_search`` / ``text_search`` ``class_path`` entries; with a
checkpoint and no tools file, the run's own tools are used. Episode limits (``episode_limits``): a checkpoint's
are its run's; a Hugging Face directory is evaluated with the paper's (``MMSEARCH_R1_ROLLOUT``) and a policy YAML
with a run config's default (``RolloutSettings()``), unless a ``--rollout`` file gives them (``load_rollout``); the
tools must fit their per-call cap, as ``mmsr fit`` checks (``check_tool_budgets``). A GRPO checkpoint also brings
the run's reward, which scores the ``reward`` column (``scoring_reward``: an LLM-judged one grades by its fallback matching;
a module overriding ``compute_rewards`` scores it with that override, ``RunRewards``); the other sources, and the
warm start's ``SFTModule`` (no reward), are scored by ``MMSearchR1Reward()``.
"""

from __future__ import annotations

import copy
from argparse import ArgumentError
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import yaml

from mmsr.models.policy import Policy
from mmsr.prompt.render import PromptBuilder
from mmsr.reward.base import Reward, WeightedRewards
from mmsr.rollout.engine import Engine
from mmsr.rollout.loop import RolloutSettings
from mmsr.sync import WeightSync
from mmsr.tools.base import SearchTool
from mmsr.tools.budget import BudgetError, check_budgets
from mmsr.tools.spec import Tool, configured

if TYPE_CHECKING:
    from lightning.pytorch import LightningModule

    from mmsr.data.sample import Sample
    from mmsr.module import GRPOModule
    from mmsr.rollout.trajectory import Trajectory


@dataclass
class Loaded:
    policy: Policy
    engine: Engine
    tools: dict[str, SearchTool | None] = field(default_factory=dict)
    settings: RolloutSettings = RolloutSettings()
    prompts: PromptBuilder | None = None
    reward: Reward | RunRewards | None = None  # the run's (``scoring_reward``, ``run_rewards``); None: the evaluator's


def _parse(arguments: dict[str, object], values: dict, where: Path):
    """Instantiate ``class_path`` entries of ``values`` with jsonargparse, typed by ``arguments``."""
    parser, parsed = _parsed(arguments, values, where)
    return parser.instantiate(parsed)


def _parsed(arguments: dict[str, object], values: dict, where: Path):
    """The parser typed by ``arguments`` and ``values`` parsed (classes resolved, defaults filled), not
    instantiated."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    for name, kind in arguments.items():
        parser.add_argument(f"--{name}", type=kind, default=None)
    unknown = set(values) - set(arguments)
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; expected {sorted(arguments)}")
    return parser, parser.parse_object(values)


def _read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config {path} does not exist")
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    return data


TOOL_ARGS = {"image_search": SearchTool | None, "text_search": SearchTool | None, "tools": list[Tool] | None}


def build_tools(values: dict, where: str | Path) -> dict[str, SearchTool | None]:
    """The tools of ``image_search`` / ``text_search`` entries (``class_path`` + ``init_args``) and a ``tools``
    list of ``Tool`` entries, as the module builds them (``mmsr.tools.spec.configured``)."""
    built = _parse(TOOL_ARGS, values, Path(where))
    return configured(built.tools, built.image_search, built.text_search)


def load_tools(path: str | Path) -> dict[str, SearchTool | None]:
    """The tools of a YAML file's ``image_search`` / ``text_search`` / ``tools`` entries (``build_tools``), at its
    top level or under ``model.init_args`` (a ``configs/tools/`` snippet merged over run configs: its other
    ``init_args`` are the run's, not the tools')."""
    values = _read_yaml(path)
    if set(values) == {"model"} and isinstance(values["model"], dict):
        init = values["model"].get("init_args") or {}
        values = {k: v for k, v in init.items() if k in TOOL_ARGS} if isinstance(init, dict) else init
    return build_tools(values, path)


def _synced(policy: Policy, engine: Engine, weight_sync: WeightSync | None = None) -> Engine:
    """Bind ``engine`` to ``policy`` and load the policy's weights into it, checked with the probe:
    ``weight_sync`` (the run's: its tolerance, buckets, dtype; the defaults otherwise) verifying now. First, where
    flash-attn cannot run the policy as loaded, its attention becomes sdpa (``runnable_attention``)."""
    runnable_attention(policy)
    if hasattr(engine, "bind"):
        engine.bind(policy)
    if hasattr(engine, "wake"):
        engine.wake()
    sync = copy.copy(weight_sync) if weight_sync is not None else WeightSync()
    sync.verify_every, sync.syncs = 1, 0
    sync(policy, engine)
    return engine


def runnable_attention(policy: Policy) -> None:
    """Switch the policy's flash-attention to sdpa (the model's config and each sub-config using it: a Qwen-VL's
    vision tower has its own) unless flash-attn can run it: CUDA parameters computing in fp16/bf16. Every evaluation
    source leaves the model where it was loaded, on the CPU, in its weights' dtype: a GPU recipe's builder picks
    flash-attention 2 for its bf16 weights, the checkpoint's fp32 master weights then replace them, and the probe's
    first forward failed in flash-attn. The same attention, another kernel."""
    from transformers.utils.generic import is_flash_attention_requested

    param = next(policy.model.parameters())
    if param.is_cuda and (policy.compute_dtype or param.dtype) in (torch.float16, torch.bfloat16):
        return
    config = policy.model.config
    configs = {"": config} | {key: getattr(config, key, None) for key in config.sub_configs}
    flash = {key: "sdpa" for key, sub in configs.items() if sub is not None and is_flash_attention_requested(sub)}
    if flash:  # only those: an explicit eager one stays
        policy.model.set_attn_implementation(flash)


# The paper's episode limits, as every ``configs/mmsearch_r1/`` recipe resolves them (its evaluation runs training's loop and
# limits): 3 rounds, 1 image / 2 text searches, 2048 tokens a turn within a 6144-token context, 120 s a tool call.
MMSEARCH_R1_ROLLOUT = RolloutSettings(max_rounds=3, image_search_limit=1, text_search_limit=2, max_tokens_per_turn=2048,
                                      max_context_tokens=6144, tool_concurrency=64, tool_timeout_s=120.0)  # fmt: skip


def episode_limits(rollout: str | Path | None, model_dir: bool) -> RolloutSettings:
    """The limits of a ``--model-dir`` / ``--policy`` evaluation: ``rollout``'s file (``load_rollout``), else the paper's
    for a Hugging Face directory (a real model: the CPU-sized 256 tokens a turn cut its answers short) and a run
    config's default, ``RolloutSettings()``, for a policy YAML (a ``TinyQwen2_5_VL`` on CPU)."""
    if rollout is not None:
        return load_rollout(rollout)
    return MMSEARCH_R1_ROLLOUT if model_dir else RolloutSettings()


def load_rollout(path: str | Path) -> RolloutSettings:
    """The ``RolloutSettings`` of a YAML file: a mapping of its fields, or a run config of ``mmsr fit`` (a ``model``
    section), whose ``model.init_args.rollout`` is used (none: the module's default, as the run had)."""
    data = _read_yaml(path)
    if "model" in data:
        model = data["model"]
        init = (model.get("init_args") or {}) if isinstance(model, dict) and "class_path" in model else model
        if not isinstance(init, dict):
            raise ValueError(f"{path}: 'model' is not a mapping (expected a run config or RolloutSettings fields)")
        data = init.get("rollout") or {}
    try:
        return _parse({"rollout": RolloutSettings}, {"rollout": data}, Path(path)).rollout
    except (ValueError, ArgumentError) as exc:  # jsonargparse's does not name the file
        raise ValueError(f"{path}: rollout: {exc}") from None


def check_tool_budgets(tools: dict[str, SearchTool | None], cap_s: float, hint: str) -> None:
    """``mmsr fit``'s start-up check (``check_budgets``) of an evaluation's tools: a tool whose one attempt of each
    nested stage cannot fit the per-call cap ``cap_s`` times out on every call, and each search would be scored as a
    failed one. ``BudgetError`` names the tool, then ``hint`` (where the cap came from)."""
    try:
        check_budgets(tools, cap_s)
    except BudgetError as exc:
        raise BudgetError(f"{exc} {hint}") from None


# The recipes' question-image bounds (upstream's evaluation resized every image into them first): 512*512 pixels
# up to 1,152 tokens, 672*672*2 pixels of Qwen2.5-VL's 28-pixel tokens (32-pixel ones for Qwen3-VL's 16-pixel patches).
RECIPE_MIN_PIXELS, RECIPE_IMAGE_TOKENS = 512 * 512, 1152


def load_model_dir(path: str, min_pixels: int | None = None, max_pixels: int | None = None) -> Loaded:
    """A Hugging Face directory's policy; without ``min_pixels`` and ``max_pixels``, a directory mmsr did not export
    resizes question images to the recipes' bounds (``recipe_pixels``), as its episode limits are the paper's."""
    from mmsr.models.build import PretrainedPolicy
    from mmsr.rollout.hf_engine import HFEngine

    builder = PretrainedPolicy(path, min_pixels=min_pixels, max_pixels=max_pixels)
    if min_pixels is None and max_pixels is None:
        builder = PretrainedPolicy(path, **recipe_pixels(builder))
    policy = builder.build()
    return Loaded(policy, _synced(policy, HFEngine(seed=0)))


def recipe_pixels(builder) -> dict[str, int]:
    """``RECIPE_MIN_PIXELS`` up to ``RECIPE_IMAGE_TOKENS`` tokens of ``builder``'s (a ``PretrainedPolicy``) patch and
    merge sizes, for a vision model mmsr did not export (Qwen2.5-VL-7B-Instruct's processor allows 3,136 to 12.8M
    pixels: a 2400x1800 photo took 5,504 tokens of the 6,144-token context instead of 1,131); ``{}`` for an mmsr
    export (its ``mmsr_policy.json``: its processor holds the bounds it was trained with) and a text-only model."""
    from mmsr.models.build import POLICY_RECORD

    _, cfg = builder.processor_config()
    if not cfg or builder.checkpoint_json(POLICY_RECORD):
        return {}
    side = cfg.get("patch_size", 14) * cfg.get("merge_size", 2)
    return {"min_pixels": RECIPE_MIN_PIXELS, "max_pixels": RECIPE_IMAGE_TOKENS * side * side}


def load_policy_yaml(path: str | Path, weights: str | None = None) -> Loaded:
    """A YAML ``policy:`` entry (or a bare ``class_path`` entry); ``weights``: a checkpoint (file or
    distributed directory) of ``GRPOModule`` or ``SFTModule``, or a state-dict file of the policy's model."""
    from mmsr.models.build import PolicyBuilder
    from mmsr.rollout.hf_engine import HFEngine

    data = _read_yaml(path)
    policy = _parse({"policy": PolicyBuilder}, data if "policy" in data else {"policy": data}, Path(path)).policy.build()
    if weights:
        from mmsr.checkpoint import adopt_dtypes, load_weights

        state = load_weights(weights)
        keys = policy.model.state_dict().keys()
        inner = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
        if len(keys & inner.keys()) > len(keys & state.keys()):  # a module checkpoint: the policy is ``model``
            state = inner
        adopt_dtypes(policy.model, state)
        policy.model.load_state_dict(state)
    return Loaded(policy, _synced(policy, HFEngine(seed=0)))


def find_run_config(ckpt: Path) -> Path:
    """``config.yaml`` next to the checkpoint (file or directory) or one level up: a run's checkpoints
    are in ``<log dir>/checkpoints/`` unless ``ModelCheckpoint(dirpath=...)`` put them elsewhere."""
    ckpt = Path(ckpt).resolve()
    for candidate in (ckpt.parent / "config.yaml", ckpt.parent.parent / "config.yaml"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"no config.yaml next to {ckpt} or one level up; pass the run's config with --run-config "
        "(LightningCLI writes it to the run's log directory)"
    )


# What only the run's episodes use: ``mmsr export`` builds the module without them (their files, an index or a
# corpus, need not be on the exporting machine), with None (the module's default) in their place.
EPISODE_ARGS = {"engine": None, "image_search": None, "text_search": None, "tools": None, "reward": None,
                "reading": None, "reading_steps": 0}  # fmt: skip


def load_module(ckpt: str | Path, run_config: str | Path | None = None,
                leave_out: Collection[str] = ()) -> LightningModule:  # fmt: skip
    """The run's module (``GRPOModule``, ``SFTModule`` or a subclass; no reference model) rebuilt from its
    config, with the checkpoint's weights in the checkpoint's dtypes; its engine is not synced. ``leave_out``:
    the ``EPISODE_ARGS`` it is built without (``mmsr export``: all of them; ``mmsr eval --tools``: the run's
    tools, ``RUN_TOOLS``)."""
    from lightning.pytorch import LightningModule  # only on this path

    import mmsr.module  # noqa: F401  a short class_path ("GRPOModule") names only an imported subclass
    from mmsr.checkpoint import adopt_dtypes, load_weights

    weights = load_weights(ckpt)  # first: a wrong path fails before the module is built
    config_path = Path(run_config) if run_config else find_run_config(Path(ckpt))
    model_cfg = _read_yaml(config_path).get("model")
    if not isinstance(model_cfg, dict):
        raise ValueError(f"{config_path}: no 'model' section (is it a LightningCLI config of mmsr fit?)")
    if "class_path" not in model_cfg:  # the module's init args at the top level
        model_cfg = {"class_path": "mmsr.module.GRPOModule", "init_args": model_cfg}
    parser, parsed = _parsed({"model": LightningModule}, {"model": model_cfg}, config_path)
    if "kl_coef" in parsed.model.init_args:  # GRPO's: 0 leaves the reference model out; SFT has none
        parsed.model.init_args.kl_coef = 0.0
    for name in [n for n in leave_out if n in parsed.model.init_args]:
        parsed.model.init_args[name] = EPISODE_ARGS[name]
    limits = _set_aside_tool_limits(parsed.model.init_args, leave_out)
    module = parser.instantiate(parsed).model
    if limits:  # kept for an evaluation's own tools (``mmsr.eval.workflows.limits_for`` keeps those it loads)
        module.loop.settings = replace(module.loop.settings, tool_limits=limits)
    if not hasattr(module, "policy"):
        raise ValueError(f"{config_path}: model {parsed.model.class_path} has no policy to load "
                         "(expected mmsr.module.GRPOModule or mmsr.sft.SFTModule)")  # fmt: skip
    adopt_dtypes(module, weights)
    module.load_state_dict(weights)
    return module


RUN_TOOLS = ("image_search", "text_search", "tools")


def _set_aside_tool_limits(init_args, leave_out: Collection[str]) -> dict[str, int]:
    """The run's ``rollout.tool_limits``, emptied in ``init_args`` when its tools are left out: the module refuses a
    limit of a tool it was not built with (a run's ``crop: 2`` without its ``tools``)."""
    rollout = init_args.get("rollout") if hasattr(init_args, "get") else None
    limits = dict(getattr(rollout, "tool_limits", None) or {})
    if limits and any(name in RUN_TOOLS for name in leave_out):
        rollout.tool_limits = {}
        return limits
    return {}


def load_checkpoint(ckpt: str | Path, run_config: str | Path | None = None, run_tools: bool = True) -> Loaded:
    """The checkpoint's policy (``load_module``) with the run's engine (``HFEngine`` for an ``SFTModule`` run),
    synced to it, tools and limits; ``run_tools=False`` (``mmsr eval --tools``): without the run's tools, which
    are not built (their index or corpus need not be on this machine)."""
    from mmsr.module import GRPOModule
    from mmsr.rollout.hf_engine import HFEngine

    module = load_module(ckpt, run_config, leave_out=() if run_tools else RUN_TOOLS)
    loop = module.loop
    # SFTModule's engine replays its teacher's turns: the warm-started policy generates with HFEngine.
    engine = module.engine if isinstance(module, GRPOModule) else HFEngine(seed=0)
    engine = _synced(module.policy, engine, getattr(module, "weight_sync", None))
    reward = run_rewards(module) if isinstance(module, GRPOModule) else None
    return Loaded(module.policy, engine, dict(loop.tools), loop.settings, loop.prompts, reward)


@dataclass(frozen=True)
class RunRewards:
    """A run module's ``compute_rewards`` override (the README's batch-level reward) scoring the ``reward`` column:
    over one evaluation batch's episodes, one per question, as over a training step's (``mmsr.eval.run.
    BatchRewards``); the module's ``reward``, which an override may call, is the scoring one."""

    module: GRPOModule

    def episode_rewards(self, trajectories: Sequence[Trajectory], samples: Sequence[Sample]) -> list[float]:
        return self.module.checked_rewards(trajectories, samples).tolist()


def run_rewards(module: GRPOModule) -> Reward | RunRewards:
    """What scores a GRPO run's episodes in ``mmsr eval``: its module's ``compute_rewards`` where a subclass overrides
    it (the ``reward`` alone had scored the column of a batch-level reward), else its ``scoring_reward``."""
    from mmsr.module import GRPOModule

    module.reward = scoring_reward(module.reward)  # an override calling the base's scores by it, too
    overridden = type(module).compute_rewards is not GRPOModule.compute_rewards
    return RunRewards(module) if overridden else module.reward


def scoring_reward(reward: Reward) -> Reward:
    """A run's reward as ``mmsr eval`` scores episodes with it: itself, but a ``JudgedReward`` (also one of a
    ``WeightedRewards``) is its table, the run's penalty, format weight and ``fallback`` matching. The judge is the
    evaluation's own (``--judge-url``, the ``judge`` column): the run's would be asked, and paid, per episode
    without being asked for, and an endpoint not reachable from the evaluation waits out its retries each time."""
    from mmsr.reward.judged import JudgedReward

    if isinstance(reward, JudgedReward):
        return reward.table
    if isinstance(reward, WeightedRewards):
        return WeightedRewards([scoring_reward(r) for r in reward.rewards], reward.weights)
    return reward
