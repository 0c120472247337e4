"""``GRPOModule``: GRPO for multi-turn search, as a LightningModule with manual optimization.

Algorithm (MMSearch-R1 defaults; every choice is an ``__init__`` argument):
- per prompt, ``num_generations`` multi-turn episodes with image / text search tools;
- outcome reward (``reward``, default ``MMSearchR1Reward``: exact match, search penalty, format);
- group-relative advantages broadcast over the sampled tokens (``advantage_estimator``);
- PPO-clipped surrogate on sampled tokens only (tool outputs, prompts and image tokens masked);
- KL to the frozen initial policy as a loss term (``kl_coef``, ``kl_kind``; ``kl_coef=0`` drops the
  reference model); optional entropy bonus;
- ``ppo_epochs`` x ``mini_batches`` optimizer updates per step, each accumulated over micro-batches
  packed by ``micro_batch_tokens``. Old log-probs are recomputed only when more than one update
  uses the same rollouts; with one update the ratio is exactly 1 (on-policy).
- parameters and optimizer state in ``param_dtype`` (fp32 master weights), matmuls in
  ``compute_dtype`` (e.g. bf16 under ``trainer.precision: bf16-mixed``; ``mmsr.parallel``).

Where things happen (Lightning hooks): ``setup`` fixes the compute dtype and starts the engine (the
process group and this rank's device exist by then); ``configure_model`` casts the master weights,
builds the reference model and, under ``ModelParallelStrategy``, shards policy and reference with
FSDP2; before every step ``RolloutCallback`` syncs the weights into the engine (verified by a probe
every ``weight_sync.verify_every`` syncs) and rolls out; ``training_step`` rewards, computes the
advantages and updates (``mmsr.train.update``: micro-batches, loss, optimizer steps).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import asdict, replace
from typing import Any, Literal

import lightning as L
from lightning.pytorch.utilities.parsing import AttributeDict
import torch

from mmsr.algo import group_advantages
from mmsr.algo.loss import AggMode
from mmsr.callbacks.rollout import RolloutCallback
from mmsr.checkpoint import preserved_rng, rank_states, restore_rank_state
from mmsr.checks import refuse_out_of_range
from mmsr.data.sample import Sample
from mmsr.metrics import (
    forget_step_metrics,
    group_metrics,
    group_sums,
    reduced_over_ranks,
    rollout_metrics,
    rollout_timings,
    summed_over_ranks,
    ToolCounters,
    tool_metrics,
    zero_std_groups,
)
from mmsr.models.build import DType, PolicyBuilder, save_policy
from mmsr.module_checks import refuse_short_engine, stopped_elsewhere, told_other_ranks, warn_unserved_tools
from mmsr.module_rewards import RewardStage
from mmsr.module_validation import HeldOutValidation
from mmsr.optim import Schedule, adamw_with_schedule, check_schedule, optimizer_limits, reapply_configured
from mmsr.parallel import (
    cast_parameters,
    compute_dtype,
    copy_to,
    data_parallel_mesh,
    gather_full,
    memory_metrics,
    mixed_precision,
    refuse_one_device_ddp,
    shard,
    stop_together,
)
from mmsr.prompt.render import PromptBuilder
from mmsr.reference import ReferenceModel
from mmsr.reward import MMSearchR1Reward, Reward
from mmsr.reward.base import callable_reward
from mmsr.rollout.engine import Engine, SamplingParams
from mmsr.rollout.hf_engine import HFEngine
from mmsr.rollout.loop import RolloutLoop, RolloutSettings
from mmsr.rollout.trajectory import Trajectory
from mmsr.sync import WeightSync
from mmsr.tools.base import SearchTool
from mmsr.tools.budget import check_budgets
from mmsr.tools.cache import assign_run_id
from mmsr.tools.secrets import redact_checkpoint_hparams
from mmsr.tools.spec import Tool, configured, declared
from mmsr.train.batch import TrainBatch
from mmsr.train.step import StepRollout
from mmsr.train.update import Backprop, PolicyUpdate, UpdateSettings, choice_limits


class GRPOModule(RewardStage, HeldOutValidation, L.LightningModule):
    """Trains a policy to answer visual questions, searching only when it must.

    Args:
        policy: builds the policy model, tokenizer and image processor.
        engine: rollout engine (default: ``HFEngine`` on the policy itself).
        image_search, text_search: MMSearch-R1's search backends (``None``: a call gets a failure observation,
            and a fit warns at start while the tool's limit is above 0: ``warn_unserved_tools``).
        tools: tools as data (``mmsr.tools.spec.Tool`` entries, each declaring its tag, argument, limit and
            prompt); when set, only these tools (plus the two above if given) are declared to the policy.
        reward: scores a trajectory (override ``compute_rewards`` for batch-level rewards).
        prompts: the prompt templates.
        rollout: episode limits (rounds, per-tool limits, token budgets, tool timeout).
        num_generations: episodes per prompt (the GRPO group size).
        temperature, top_p, top_k: rollout sampling; the trainer scores ``logits / temperature``.
        advantage_estimator: ``grpo``, ``drgrpo`` or ``rloo``.
        kl_coef, kl_kind: KL-loss weight and estimator (0 drops the reference model).
        clip_low, clip_high: PPO clip range (clip-higher when ``clip_high > clip_low``).
        clip_ratio_c: veRL's dual-clip (``None``: off; else > 1): a token with negative advantage A
            contributes at most -A * clip_ratio_c, and no gradient past it, however far its ratio grew
            (``train/dual_clip_frac`` is the share capped). veRL's default is 3.0; MMSearch-R1 has none.
        loss_agg: how token losses are averaged.
        entropy_coef: entropy bonus weight.
        ppo_epochs, mini_batches: passes over a step's rollouts and optimizer updates per pass.
        micro_batch_tokens: padded-token budget of one forward/backward.
        share_prefix: a prompt the samples of a group share (and the start every episode shares) runs once
            per micro-batch where that saves enough tokens (``mmsr.train.batch.sampled_logprobs``): on the CPU its
            KV cache fanned out to the rows (``mmsr.train.prefix``); on a GPU, under gradient checkpointing or
            FSDP2, as packed rows (``mmsr.train.packed``: a group's episodes kept in one micro-batch, the token
            budget counted on packed rows); whole rows with flash-attention 2. The same log-probs up to float
            rounding.
        skip_zero_advantage: leave the episodes whose advantage is 0 (a group whose samples all got one
            reward: ``reward/zero_std_groups``) out of the update's passes (and out of the scoring pass
            that precedes several updates a step). With
            ``kl_coef=0`` and ``entropy_coef=0`` (required) their loss and gradients are exactly 0, so the
            update is the same, up to float rounding, for less compute; ``train/`` metrics are then means
            over the episodes run, and ``train/episodes_run`` is their share.
        lr, weight_decay, grad_clip: AdamW and gradient-norm clipping.
        lr_schedule, warmup_steps, total_steps: ``constant``, ``cosine`` (warmup then cosine to 0 at
            ``total_steps``) or ``sigmoid`` (the upstream decay around step 45).
        gradient_checkpointing: trade compute for activation memory.
        param_dtype: dtype of the parameters, gradients and AdamW state (the master weights); a policy
            loaded in bf16 is upcast. Keep float32 for RL learning rates (see ``mmsr.parallel``).
        compute_dtype: dtype of the matmuls (FSDP2 ``MixedPrecisionPolicy`` or autocast); ``None``
            follows ``trainer.precision`` (``bf16-mixed`` -> bfloat16), else ``param_dtype``.
        ref_offload: keep the reference model in host memory, on the device only while it scores
            (under FSDP2: CPU-offloaded shards).
        weight_sync: trainer -> engine sync (bucket size, how often a probe proves it landed).
        old_logprobs: the PPO ratio's denominator. ``recompute``: the trainer's log-probs before the
            step's first update (with several updates a step, a scoring forward pass over the rollouts).
            ``engine``: the log-probs the engine sampled with; no scoring pass, and the clip also bounds
            the engine/trainer mismatch; needs ``top_p=1`` and ``top_k=0`` (the engine's log-probs would
            include their truncation) and ``is_correction="none"``. With several updates a step the
            ``train/mismatch_`` metrics then include the policy's drift over the step's earlier updates.
        is_correction, is_cap: importance-sampling correction of the engine/trainer log-prob mismatch
            (per-token ratio truncated or masked at ``is_cap``); off by default; needs ``top_p=1`` and
            ``top_k=0``. The mismatch is logged every step (``train/mismatch_*``) unless ``top_p < 1`` or
            ``top_k > 0`` (``mmsr.train.update.UpdateSettings.truncated``).
        export_dir: when set, the trained policy is written there as a Hugging Face directory at the
            end of training (gathered from all ranks under FSDP2).
    """

    def __init__(
        self,
        policy: PolicyBuilder,
        engine: Engine | None = None,
        image_search: SearchTool | None = None,
        text_search: SearchTool | None = None,
        tools: list[Tool] | None = None,
        reward: Reward | None = None,
        prompts: PromptBuilder | None = None,
        rollout: RolloutSettings = RolloutSettings(),
        num_generations: int = 4,
        temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
        advantage_estimator: Literal["grpo", "drgrpo", "rloo"] = "grpo",
        kl_coef: float = 0.001, kl_kind: Literal["k1", "k2", "k3", "low_var_kl"] = "low_var_kl",
        clip_low: float = 0.2, clip_high: float = 0.2, clip_ratio_c: float | None = None,
        loss_agg: AggMode = "token-mean",
        entropy_coef: float = 0.0,
        ppo_epochs: int = 1, mini_batches: int = 1,
        micro_batch_tokens: int = 8192, share_prefix: bool = True, skip_zero_advantage: bool = False,
        lr: float = 2e-6, weight_decay: float = 0.0, grad_clip: float = 1.0,
        lr_schedule: Schedule = "constant", warmup_steps: int = 0, total_steps: int = 1000,
        gradient_checkpointing: bool = False,
        param_dtype: Literal["float32", "bfloat16"] = "float32", compute_dtype: DType | None = None,
        ref_offload: bool = False,
        weight_sync: WeightSync | None = None,
        old_logprobs: Literal["recompute", "engine"] = "recompute",
        is_correction: Literal["none", "truncate", "mask"] = "none", is_cap: float = 2.0,
        export_dir: str | None = None,
    ) -> None:  # fmt: skip
        # the values this __init__ received: a subclass's own __init__ may pass others than its arguments, which
        # save_hyperparameters records (a subclass doubling the temperature sampled at the one it was given)
        received = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__()
        tool_map = configured(tools, image_search, text_search)
        check_budgets(tool_map, rollout.tool_timeout_s)  # fail fast
        rollout.refuse_unknown_tools([spec.name for spec in declared(tool_map)])  # as the loop would, before the build
        rollout.refuse_overridden_limits(tool_map)
        refuse_short_engine(engine, rollout)
        # Loggers cannot take the frozen RolloutSettings: they get its fields as a dict.
        self.save_hyperparameters(ignore=["policy", "engine", "image_search", "text_search", "tools", "reward", "prompts",
                                          "rollout", "weight_sync"])  # fmt: skip
        self.hparams["rollout"] = asdict(rollout)
        self.init_args = AttributeDict(received)  # what the module runs with; hparams rebuild the (sub)class
        self.automatic_optimization = False
        self.sampling, update = self.checked_settings(received, rollout)  # before the (slow) build
        self.policy = policy.build()
        # from_pretrained returns a model in eval mode, where Hugging Face turns gradient checkpointing
        # off; Lightning no longer switches modes at fit start (it warned: "N modules in eval mode").
        self.model = self.policy.model.train()
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        self.param_dtype = getattr(torch, param_dtype)
        self._ref: ReferenceModel | None = None  # built by configure_model, outside the state dict
        self.engine = engine if engine is not None else HFEngine()  # started by setup
        self.reward = callable_reward(reward, "GRPOModule.reward") if reward is not None else MMSearchR1Reward()
        self.weight_sync = weight_sync if weight_sync is not None else WeightSync()
        self.loop = RolloutLoop(self.engine, self.policy, prompts or PromptBuilder(), tool_map, rollout)
        self.loop.on_episode_end = self._episode_ended
        self.policy_update = PolicyUpdate(self.policy, update)  # mmsr.train.update
        self._pending: tuple[list[Trajectory], list[Sample]] | None = None
        self.last_rollout: StepRollout | None = None  # for observers (loggers, trajectory dumps)
        self._timings: dict[str, float] = {}
        self._tool_counters = ToolCounters()  # what the tools' own counters added at each step
        self.stage: str | None = None  # the step's current stage, read live by StageProgressBar
        self._sharded = self._configured = self._engine_started = False
        self._tool_run_id: str | None = None  # the run's id in the search caches' budget (on_fit_start)

    @classmethod
    def checked_settings(cls, hp: Mapping[str, Any], rollout: RolloutSettings) -> tuple[SamplingParams, UpdateSettings]:
        """The rollouts' sampling and the update's settings of the ``__init__`` arguments ``hp`` (by name, as
        ``hparams`` holds them), refusing values out of range from the values alone: ``__init__`` calls it before
        the build, and ``mmsr plan`` on a config's ``model.init_args``, building nothing."""
        check_schedule(hp["lr_schedule"], hp["warmup_steps"], hp["total_steps"])
        # A group of one gets advantage 0 whatever its reward (every estimator), and greedy rollouts make a group's
        # episodes identical: either way the policy never moves. Validation is greedy on its own (validation_step).
        refuse_out_of_range("GRPOModule", [
            ("num_generations", hp["num_generations"], hp["num_generations"] >= 2, ">= 2, the GRPO group size"),
            ("temperature", hp["temperature"], hp["temperature"] > 0, "> 0 for training rollouts; 0 is greedy"),
            # a misspelt estimator failed at the first step, a rollout in (the update's choices: UpdateSettings)
            *choice_limits(GRPOModule.__init__, {k: hp[k] for k in ("advantage_estimator", "param_dtype")}),
            *optimizer_limits(hp["lr"], hp["weight_decay"], hp["warmup_steps"], hp["total_steps"])])  # fmt: skip
        # both refuse values out of range
        sampling = SamplingParams(hp["temperature"], hp["top_p"], hp["top_k"], rollout.max_tokens_per_turn)
        return sampling, UpdateSettings.of(hp, max_context_tokens=rollout.max_context_tokens)

    @property
    def updates_per_step(self) -> int:
        """Optimizer updates per training step: ``trainer.max_steps`` and ``global_step`` count these."""
        return self.policy_update.settings.updates_per_step

    # -- Lightning hooks ----------------------------------------------------------------------
    def configure_callbacks(self):
        return [RolloutCallback()]

    def configure_optimizers(self):
        hp = self.init_args
        return adamw_with_schedule(self.model.parameters(), hp.lr, hp.weight_decay, hp.lr_schedule, hp.warmup_steps, hp.total_steps)

    def setup(self, stage: str) -> None:
        """The process group and this rank's device exist: refuse a tensor-parallel mesh
        (``data_parallel_mesh``), fix the compute dtype, start the engine."""
        if self.device_mesh is not None:  # ModelParallelStrategy's, set before this hook
            data_parallel_mesh(self.device_mesh, "GRPOModule")
        precision = str(self.trainer.precision) if self._trainer is not None else None
        self.policy.compute_dtype = compute_dtype(self.init_args.compute_dtype, self.param_dtype, precision)
        self.start_engine()

    def on_fit_start(self) -> None:
        """Refuse plain DDP on one device for a vision-language policy before the first rollout
        (``refuse_one_device_ddp``: a step of text-only episodes failed DDP's next backward); warn of an offered
        tool that no backend serves (``warn_unserved_tools``)."""
        refuse_one_device_ddp(self.trainer.strategy.model, self.policy.vision_tower(), "GRPOModule")
        # every rank's search caches spend one budget: rank 0's new id, or the resumed run's if already restored
        self._tool_run_id = self._tool_run_id or self.trainer.strategy.broadcast(uuid.uuid4().hex)
        assign_run_id(self.loop.tools, self._tool_run_id)
        warn_unserved_tools(self.loop)

    def on_train_start(self) -> None:
        """A resumed run trains at the configured lr and weight decay, not the checkpoint's (``reapply_configured``:
        Lightning restored the optimizer and schedule after ``configure_optimizers``)."""
        hp = self.init_args
        reapply_configured(self.optimizers(use_pl_optimizer=False), self.lr_schedulers(), hp.lr, hp.weight_decay)

    def start_engine(self) -> None:
        """Bind the engine to the policy (vLLM starts here, on this rank's device), once. vLLM seeds the
        global generators when it starts: ``preserved_rng`` puts them back."""
        if not self._engine_started and hasattr(self.engine, "bind"):
            with preserved_rng():
                self.engine.bind(self.policy)
        self._engine_started = True

    def configure_model(self) -> None:
        """Master weights in ``param_dtype``, the reference model (``mmsr.reference``), and under
        ``ModelParallelStrategy`` FSDP2 ``fully_shard`` on every transformer block and the root over
        the ``data_parallel`` mesh, gathering in ``compute_dtype``. A colocated ``HFEngine`` then
        generates with an unsharded copy on this rank's device that every sync refreshes.
        Runs once, after ``setup`` and before a checkpoint is restored.
        """
        if self._configured:
            return
        self._configured = True
        device = self.trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
        compute, kl, offload = self.policy.compute_dtype or self.param_dtype, self.init_args.kl_coef > 0, self.init_args.ref_offload
        if self.device_mesh is None:
            self._ref = ReferenceModel.copy_of(self.model, compute, device, offload) if kl else None
            cast_parameters(self.model, self.param_dtype)
            return
        if isinstance(self.engine, HFEngine) and self.engine.generates_with(self.model):
            self.engine.bind(replace(self.policy, model=copy_to(self.model, compute, device)))
        mesh, architecture = data_parallel_mesh(self.device_mesh, "GRPOModule"), type(self.model)
        shard(self.model, mesh, self.param_dtype, mp_policy=mixed_precision(compute, self.param_dtype))
        if kl:
            self._ref = ReferenceModel.sharded_like(self.model, architecture, mesh, compute, device, offload)
        self._sharded = True

    def on_train_end(self) -> None:
        if not self.init_args.export_dir:
            return
        # FSDP2: every rank gathers, rank 0 writes an unsharded copy (the layout of an unsharded run's)
        rank0 = self.trainer.is_global_zero
        policy = replace(self.policy, model=gather_full(self.model, rank0)) if self._sharded else self.policy
        if rank0:
            save_policy(policy, self.init_args.export_dir)

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return batch  # list[Sample] holds PIL images; tensors are made after the rollout

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["mmsr_ranks"] = rank_states(self.engine)
        checkpoint["mmsr_rollout"] = self.loop.state_dict()
        checkpoint["mmsr_weight_sync"] = self.weight_sync.state_dict()  # the same count on every rank
        checkpoint["mmsr_tool_run_id"] = self._tool_run_id
        checkpoint["mmsr_nonfinite"] = self.policy_update.nonfinite.state_dict()
        redact_checkpoint_hparams(checkpoint)  # here, not only in LoggedConfig: weights-only saves skip callbacks

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "mmsr_rollout" in checkpoint:
            self.loop.load_state_dict(checkpoint["mmsr_rollout"])
        if "mmsr_weight_sync" in checkpoint:  # absent from older checkpoints: the count starts at 0, as it did
            self.weight_sync.load_state_dict(checkpoint["mmsr_weight_sync"])
        self.policy_update.nonfinite.load_state_dict(checkpoint.get("mmsr_nonfinite"))
        world = self.trainer.world_size if self._trainer is not None else 1
        restore_rank_state(checkpoint.get("mmsr_ranks"), self.global_rank, world, self.engine)
        if checkpoint.get("mmsr_tool_run_id"):  # the resumed run spends its search budget on (here or in on_fit_start)
            self._tool_run_id = checkpoint["mmsr_tool_run_id"]
            assign_run_id(self.loop.tools, self._tool_run_id)

    # -- the step -----------------------------------------------------------------------------
    @contextmanager
    def timed(self, stage: str):
        self.stage = stage
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stage = None
        self._timings[f"timing/{stage}"] = time.perf_counter() - start

    def sync_weights(self) -> None:
        """Wake the engine (GPU sleep mode) and load the current weights into it, provably."""
        if hasattr(self.engine, "wake"):
            self.engine.wake()
        # a step starts with its sync (RolloutCallback): what an earlier step or validation measured is not
        # this step's (a probe runs every verify_every syncs: its diff was logged again at every step after it)
        self._timings = {}
        with self.timed("sync"):
            stats = self.weight_sync(self.policy, self.engine)
        self._timings |= self.weight_sync.metrics(stats)

    def stop_every_rank(self, error: Exception | None) -> None:
        """Raise ``error`` on this rank, and on every other rank ``stopped_elsewhere``'s error naming this one (the
        lowest rank with an error): a rank that stopped alone left the others waiting in the next collective (gloo:
        "Connection closed by peer"; NCCL: its timeout). Nothing where no rank has one. A collective on several
        ranks (``stop_together``: one all_reduce), none on one process, which raises ``error`` itself."""
        told = told_other_ranks(error) if error is not None else None
        stop_together(error, self.device, stopped_elsewhere, message=told)

    def generate_rollouts(self, samples: list[Sample]) -> None:
        """The step's rollout on every rank; an error of any rank (a tool's ``FatalToolError``: a refused key, a
        replay miss) stops every rank (``stop_every_rank``, a collective): only ranks whose episodes called that
        tool raise it."""
        error = None
        with self.timed("rollout"):
            try:
                trajs = self.loop.run(samples, self.init_args.num_generations, self.sampling)
            except Exception as exc:  # not BaseException: an interrupt stops this process at once
                error = exc
        self.stop_every_rank(error)
        if hasattr(self.engine, "sleep"):  # free the engine's GPU memory for the update
            self.engine.sleep()
        self._pending = (trajs, samples)

    def on_train_batch_start(self, batch: list[Sample], batch_idx: int) -> None:
        forget_step_metrics(self.trainer)  # per-category metrics are absent on a step without the category

    def training_step(self, batch: list[Sample], batch_idx: int):
        if self._pending is None or self._pending[1] is not batch:
            raise RuntimeError("no rollouts for this batch: RolloutCallback did not run before training_step")
        trajs, samples = self._pending
        self._pending = None
        with self.timed("reward"):
            rewards, details = self.agreed_scores(trajs, samples)  # details before the update: faulty ones stop it
            group_ids = torch.tensor([t.group_id for t in trajs])
            advantages = group_advantages(rewards, group_ids, self.init_args.advantage_estimator)
        with self.timed("train"):
            train_metrics = self.update_policy(trajs, advantages)
        self.last_rollout = StepRollout(trajs, samples, rewards, advantages, details)
        metrics = rollout_metrics(trajs, samples, rewards.tolist(), details, self.loop.settings, by_group=False)
        metrics["reward/zero_std_groups"] = zero_std_groups(rewards.tolist(), group_ids.tolist())
        memory = memory_metrics(self.model, self._ref.model if self._ref is not None else None, self.device)
        metrics |= rollout_timings(self.loop.stats) | train_metrics | self._timings | memory
        # counts and ratios of tool calls and of groups over every rank's calls and episodes (a mean of per-rank
        # ratios weighed a rank's one failed call like another's nine good ones)
        tools, groups = tool_metrics(self.loop.stats, self.loop.tools, self._tool_counters), group_sums(trajs, samples, details)
        metrics = reduced_over_ranks(metrics) | tools | group_metrics(summed_over_ranks(groups))
        self.log_dict(metrics, batch_size=len(samples), prog_bar=False)
        self.log("reward", metrics["reward/mean"], prog_bar=True, logger=False, batch_size=len(samples))

    # -- the policy update (mmsr.train.update) -----------------------------------------------
    def update_policy(self, trajs: list[Trajectory], advantages: torch.Tensor) -> dict[str, float]:
        """``ppo_epochs`` x ``mini_batches`` optimizer updates (``PolicyUpdate.update``), then the LR
        schedule's step. ``advantages``: ``[N]``; returns ``train/`` metrics averaged over updates (a maximum:
        the largest), and ``train/lr``, the rate these updates used (read before the schedule moves on to the
        next step's)."""
        step = Backprop(self.model, self.optimizers(), self.manual_backward, self.device, self.trainer.world_size,
                        self.global_step)
        metrics = self.policy_update.update(trajs, advantages, self._ref, step)
        metrics["train/lr"] = self.optimizers().param_groups[0]["lr"]
        self.lr_schedulers().step()
        return metrics

    def score(self, trajs: list[Trajectory], model: torch.nn.Module) -> list[torch.Tensor]:
        """Per-trajectory log-probs ``[len_i - 1]`` under ``model`` (old policy or reference)."""
        return self.policy_update.score(trajs, model, self.device)

    def token_logprobs(self, batch: TrainBatch, model: torch.nn.Module, with_entropy: bool = False):
        """Log-probs ``[n, T-1]`` of every next token (and entropies) under ``model``."""
        return self.policy_update.token_logprobs(batch, model, with_entropy)
