"""``SFTModule``, the warm start (the package docstring, ``mmsr.sft``, says what it trains)."""

from __future__ import annotations

import copy
from dataclasses import asdict, replace
from typing import Literal, Protocol

import lightning as L
from lightning.pytorch.utilities.parsing import AttributeDict
import torch

from mmsr.checkpoint import rank_states, restore_rank_state
from mmsr.checks import refuse_out_of_range
from mmsr.data.sample import Sample
from mmsr.models.build import PolicyBuilder, save_policy
from mmsr.metrics import forget_step_metrics
from mmsr.optim import (NonfiniteGuard, Schedule, adamw_with_schedule, check_schedule, optimizer_limits,
                        reapply_configured)
from mmsr.parallel import all_reduce, cast_parameters, compute_dtype, drop_idle_gradients, refuse_one_device_ddp
from mmsr.prompt.render import PromptBuilder
from mmsr.rollout.engine import GenerationRequest, SamplingParams, ScriptedEngine
from mmsr.rollout.loop import RolloutLoop, RolloutSettings
from mmsr.rollout.trajectory import Trajectory
from mmsr.tools.base import SearchTool
from mmsr.tools.secrets import redact_checkpoint_hparams
from mmsr.tools.spec import Tool, configured
from mmsr.sft.episodes import EpisodeAccounts
from mmsr.sft.lm import encode_texts, ids_nll, reading_passes
from mmsr.train.batch import collate, pack_by_tokens, rank_micro_batches, sampled_logprobs
from mmsr.train.update import choice_limits


class Teacher(Protocol):
    """Writes the assistant turns of one scripted episode for a sample (e.g. ``mmsr.demo.teacher.RAGTeacher``).

    A teacher that draws at random also has ``state_dict()`` and ``load_state_dict(state)``: checkpoints keep
    each rank's, so a resumed warm start writes the turns an uninterrupted one would.
    """

    def turns(self, sample: Sample) -> list[str]: ...  # at least one turn; anything else is refused, naming the row


class TextBatches(Protocol):
    """Texts for next-token prediction, the same batch for the same step (e.g.
    ``mmsr.demo.reading.ReadingCorpus``)."""

    def batch(self, step: int) -> list[str]: ...


class SFTModule(L.LightningModule):
    """Warm-starts a policy by imitating ``teacher`` episodes; with ``data.val_files``, logs the token-mean
    NLL of the teacher's turns on the held-out prompts (``val/sft_loss``, ``trainer.val_check_interval``).

    Args:
        policy: builds the policy to train.
        teacher: writes the scripted turns.
        image_search, text_search, tools, prompts, rollout: as in ``GRPOModule`` (the same episode machinery).
        lr, weight_decay, grad_clip, lr_schedule, warmup_steps, total_steps: optimization.
        micro_batch_tokens: padded-token budget of one forward/backward.
        share_prefix: the start the micro-batch's episodes share runs once (as ``GRPOModule``'s).
        reading, reading_steps: the first ``reading_steps`` optimizer steps train next-token prediction
            on ``reading``'s batches instead of teacher episodes (same optimizer).
        param_dtype: dtype of the parameters, gradients and AdamW state (the master weights), as
            ``GRPOModule``'s: a policy loaded in bf16 is upcast at setup. Keep float32 for small learning
            rates (see ``mmsr.parallel``).
        export_dir: when set, the trained policy is written there as a Hugging Face directory at the
            end of training (``PretrainedPolicy(path=export_dir)`` loads it for GRPO).
    """

    def __init__(self, policy: PolicyBuilder, teacher: Teacher, image_search: SearchTool | None = None,
                 text_search: SearchTool | None = None, tools: list[Tool] | None = None,
                 prompts: PromptBuilder | None = None,
                 rollout: RolloutSettings = RolloutSettings(), lr: float = 1e-3, weight_decay: float = 0.0,
                 grad_clip: float = 1.0, lr_schedule: Schedule = "constant", warmup_steps: int = 0,
                 total_steps: int = 1000, micro_batch_tokens: int = 8192, export_dir: str | None = None,
                 reading: TextBatches | None = None, reading_steps: int = 0, share_prefix: bool = True,
                 param_dtype: Literal["float32", "bfloat16"] = "float32") -> None:  # fmt: skip
        received = {k: v for k, v in locals().items() if k not in ("self", "__class__")}  # as GRPOModule's
        super().__init__()
        check_schedule(lr_schedule, warmup_steps, total_steps)
        # as in GRPOModule: clip_grad_norm_ with max_norm < 0 flips every gradient (the loss climbs), 0 zeroes it
        refuse_out_of_range("SFTModule", [
            *optimizer_limits(lr, weight_decay, warmup_steps, total_steps),
            ("grad_clip", grad_clip, grad_clip > 0, "> 0, the cap on the gradient norm; .inf: no clipping"),
            ("micro_batch_tokens", micro_batch_tokens, micro_batch_tokens >= 1, ">= 1"),
            ("reading_steps", reading_steps, reading_steps >= 0, ">= 0"),
            *choice_limits(SFTModule.__init__, dict(param_dtype=param_dtype))])  # fmt: skip
        # Loggers cannot take the frozen RolloutSettings (a CSV logger raised): they get its fields as a dict.
        self.save_hyperparameters(ignore=["policy", "teacher", "image_search", "text_search", "tools", "prompts", "reading",
                                          "rollout"])  # fmt: skip
        self.hparams["rollout"] = asdict(rollout)
        self.init_args = AttributeDict(received)  # what the module runs with; hparams rebuild the (sub)class
        if reading_steps and reading is None:
            raise ValueError("reading_steps > 0 needs a reading corpus")
        self.reading = reading
        self.automatic_optimization = False
        self.nonfinite = NonfiniteGuard("SFTModule", "the data (an outlier text or teacher turn)")
        rollout.refuse_overridden_limits(configured(tools, image_search, text_search))  # before the build
        self.policy = policy.build()
        # from_pretrained returns a model in eval mode, where Hugging Face turns gradient checkpointing
        # off; Lightning no longer switches modes at fit start (it warned: "N modules in eval mode").
        self.model = self.policy.model.train()
        self.param_dtype = getattr(torch, param_dtype)
        self.teacher = teacher
        self.engine = ScriptedEngine(self._script, record=False)
        self.engine.bind(self.policy)
        self.loop = RolloutLoop(self.engine, self.policy, prompts or PromptBuilder(),
                                configured(tools, image_search, text_search), rollout)  # fmt: skip
        self._turns: dict[str, list[str]] = {}
        self.accounts = EpisodeAccounts(self.loop)  # warns once a cause, per rank
        self._val_turns: dict[str, list[str]] = {}  # the held-out prompts' turns, drawn once
        # a copy before any training draw: the held-out turns do not depend on when validation first runs,
        # nor on a resume (which restores the training teacher's draws, not this copy's)
        self._val_teacher = copy.deepcopy(teacher)
        self._val_trajs: list[Trajectory] = []

    def _script(self, request: GenerationRequest) -> str:
        turns = self._turns[request.key.rsplit("#", 1)[0]]
        return turns[min(request.turn, len(turns) - 1)]

    def configure_optimizers(self):
        hp = self.init_args
        return adamw_with_schedule(self.model.parameters(), hp.lr, hp.weight_decay, hp.lr_schedule, hp.warmup_steps, hp.total_steps)

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return batch

    def on_train_batch_start(self, batch: list[Sample], batch_idx: int) -> None:
        forget_step_metrics(self.trainer)  # an imitation step's row has no reading loss, and vice versa

    def training_step(self, batch: list[Sample], batch_idx: int) -> None:
        if self.global_step < self.init_args.reading_steps:
            return self._reading_step()
        written = {s.id: self._written(self.teacher, s) for s in batch}
        trajs = self._episodes(batch, written)
        opt = self.optimizers()
        opt.zero_grad()
        loss, total = self._imitate(trajs)
        metrics = {"sft/loss": loss, "sft/tokens": total, **self._step(opt, used_images=any(t.vision for t in trajs)),
                   **self.accounts.counts(trajs, written, self.device)}  # fmt: skip
        self.log_dict(metrics, batch_size=len(batch))
        self.log("loss", loss, prog_bar=True, logger=False, batch_size=len(batch))

    def _written(self, teacher: Teacher, sample: Sample) -> list[str]:
        """``teacher``'s turns for ``sample``, written from the sample's text as the prompt shows it (``Encoder.plain``):
        an answer or question from the data set that spells ``<|im_end|>`` or ``<|image_pad|>`` must be trained on as
        text, not as a special token among the targets. The teacher's own tags stay as it writes them."""
        plain = self.loop.encoder.plain
        extra = {k: plain(v) if isinstance(v, str) else v for k, v in sample.extra.items()}
        turns = teacher.turns(replace(sample, image=sample.stored_image, question=plain(sample.question),
                                      ground_truth=plain(sample.ground_truth), extra=extra,
                                      candidate_answers=tuple(map(plain, sample.candidate_answers))))  # fmt: skip
        refuse_bad_turns(turns, sample.id, teacher)
        return list(turns)

    def _episodes(self, samples: list[Sample], turns: dict[str, list[str]]) -> list[Trajectory]:
        """One episode per sample with the teacher's ``turns`` (by sample id), through the real loop and tools."""
        self._turns = turns
        return self.loop.run(samples, 1, SamplingParams(max_tokens=self.loop.settings.max_tokens_per_turn))

    def on_validation_epoch_start(self) -> None:
        self._val_trajs = []

    def validation_step(self, batch: list[Sample], batch_idx: int) -> None:
        """The teacher's episodes on held-out prompts, scored when the epoch ends (``on_validation_epoch_end``).

        Their turns are drawn once, by a copy of the teacher as configured: every validation scores the same
        targets (a curve of one quantity), and the training teacher's draws stay as without validation.
        """
        for s in batch:
            if s.id not in self._val_turns:
                self._val_turns[s.id] = self._written(self._val_teacher, s)
        runs = self.loop.runs  # training's episodes keep their keys whether or not validation ran
        self._val_trajs += self._episodes(batch, {s.id: self._val_turns[s.id] for s in batch})
        self.loop.runs = runs

    def on_validation_epoch_end(self) -> None:
        """``val/sft_loss``: the token-mean NLL of the teacher's turns over every rank's held-out episodes, as
        one process computes it (``val/sft_tokens``: their count). Forward passes only, outside DDP's wrapper:
        ranks may hold different numbers of episodes."""
        nll = 0.0
        trajs, budget = self._val_trajs, self.init_args.micro_batch_tokens
        with torch.no_grad():
            for micro in pack_by_tokens([len(t) for t in trajs], budget):
                nll += float(self._teacher_nll(trajs, micro))
        total = all_reduce(sum(t.num_sampled_tokens for t in trajs), "sum", self.device)
        nll = all_reduce(nll, "sum", self.device)
        self._val_trajs = []
        if total:  # the same values on every rank
            self.log_dict({"val/sft_loss": nll / total, "val/sft_tokens": total}, batch_size=1, sync_dist=True)

    def _imitate(self, trajs: list[Trajectory]) -> tuple[float, float]:
        """Backward passes of the token-mean NLL of the teacher's turns over every rank's tokens; returns that
        loss and the token count. DDP averages the ranks' gradients, so a rank's share is scaled by the world
        size, and every rank runs as many passes (``None``: a zero-weight rerun) or the all-reduces hang."""
        world = self.trainer.world_size
        total = all_reduce(sum(t.num_sampled_tokens for t in trajs), "sum", self.device)
        loss_sum = 0.0
        for micro in rank_micro_batches([len(t) for t in trajs], self.init_args.micro_batch_tokens, self.device):
            loss = self._teacher_nll(trajs, micro or [0]) / max(total, 1) * (world if micro else 0)
            self.manual_backward(loss)
            loss_sum += float(loss.detach())
        return all_reduce(loss_sum, "sum", self.device) / world, total

    def _teacher_nll(self, trajs: list[Trajectory], micro: list[int]) -> torch.Tensor:
        """The summed NLL (a scalar) of the teacher's tokens in micro-batch ``trajs[micro]``."""
        mb = collate([trajs[i] for i in micro], micro, self.policy, self.device)
        # [n, T-1], the LM head only where the teacher wrote
        logp, _ = sampled_logprobs(self.policy, mb, self.model, share_prefix=self.init_args.share_prefix)
        return -(logp * mb.loss_mask).sum()

    def _reading_step(self) -> None:
        """One step of next-token prediction on the step's texts, split over the ranks (rank r reads texts r,
        r + world, ...): the token mean over all of them, as one process computes it. A rank's texts run in one
        pass when their padded tokens fit ``micro_batch_tokens``, else in micro-batches (``reading_passes``). Every
        rank runs as many passes, or DDP's all-reduce hangs: a rank left without a text, or with fewer passes,
        reruns its first text at zero weight."""
        texts, world = self.reading.batch(self.global_step), self.trainer.world_size
        mine = texts[self.global_rank :: world]
        rows = mine or texts[:1]
        ids = encode_texts(self.policy, rows)
        lengths = [len(i) for i in ids]
        passes: list[list[int] | None] = reading_passes(lengths, self.init_args.micro_batch_tokens)
        passes += [None] * (int(all_reduce(len(passes), "max", self.device)) - len(passes))
        # ids_nll's count: a text of n tokens has n - 1 targets; known before the first pass divides by it
        total = all_reduce(float(sum(max(n - 1, 0) for n in lengths)) if mine else 0.0, "sum", self.device)
        opt = self.optimizers()
        opt.zero_grad()
        loss_sum = 0.0
        for micro in passes:
            nll, _ = ids_nll(self.policy, [ids[i] for i in micro or [0]], self.device)
            loss = nll / max(total, 1.0) * (world if mine and micro else 0)  # DDP averages the ranks' gradients
            self.manual_backward(loss)
            loss_sum += float(loss.detach())
        stepped = self._step(opt, used_images=False)
        loss = all_reduce(loss_sum, "sum", self.device) / world
        self.log_dict({"reading/loss": loss, **stepped}, batch_size=len(texts))
        self.log("loss", loss, prog_bar=True, logger=False, batch_size=len(texts))

    def _step(self, opt, used_images: bool) -> dict[str, float]:
        """Clip, step the optimizer (unless the gradient norm is not finite: ``NonfiniteGuard``) and the schedule;
        returns ``train/grad_norm`` (pre-clip) and ``train/nonfinite_grad_steps`` (1: the update was skipped). The
        vision tower's gradients are dropped when no rank's step held an image (``drop_idle_gradients``)."""
        drop_idle_gradients(self.policy.vision_tower(), used_images, self.device)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.init_args.grad_clip))
        skipped = self.nonfinite.step(opt, grad_norm, self.global_step)
        self.lr_schedulers().step()
        return {"train/grad_norm": grad_norm, "train/nonfinite_grad_steps": float(skipped)}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # each rank's teacher drew for its own prompts; without its state a resumed warm start redrew from the
        # seed (another direct-answer choice per row), unlike GRPO's resume
        checkpoint["mmsr_ranks"] = rank_states(self.teacher)
        checkpoint["mmsr_nonfinite"] = self.nonfinite.state_dict()
        redact_checkpoint_hparams(checkpoint)  # here, not only in LoggedConfig: weights-only saves skip callbacks

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        world = self.trainer.world_size if self._trainer is not None else 1
        restore_rank_state(checkpoint.get("mmsr_ranks"), self.global_rank, world, self.teacher)
        self.nonfinite.load_state_dict(checkpoint.get("mmsr_nonfinite"))

    def setup(self, stage: str) -> None:
        """Refuse a ``-true`` precision before Lightning casts the policy or a batch, fix the compute dtype (as
        ``GRPOModule.setup``) and put the master weights in ``param_dtype`` before the optimizer is built (here, not in
        ``configure_model``: the warm start does not shard, and ``ModelParallelStrategy`` refuses a module without
        that hook). ``Policy.autocast`` then runs every forward in it, ``val/sft_loss``'s too: Lightning's mixed
        precision autocasts the training step only, and ``on_validation_epoch_end`` ran bf16-mixed in fp32."""
        self.policy.compute_dtype = compute_dtype(None, self.param_dtype, str(self.trainer.precision))
        cast_parameters(self.model, self.param_dtype)

    def on_fit_start(self) -> None:
        # DDP's reducer expects a gradient for every parameter unless told otherwise. On several ranks a text-only
        # forward (a reading step, a row without an image) runs the vision tower at zero weight, so plain DDP gets
        # them all (and skips find_unused's graph walk every backward); DDP on one device leaves the tower out.
        refuse_one_device_ddp(self.trainer.strategy.model, self.policy.vision_tower(), "SFTModule")

    def on_train_start(self) -> None:
        """A resumed warm start trains at the configured lr and weight decay, not the checkpoint's (as GRPO's)."""
        hp = self.init_args
        reapply_configured(self.optimizers(use_pl_optimizer=False), self.lr_schedulers(), hp.lr, hp.weight_decay)

    def on_train_end(self) -> None:
        if self.init_args.export_dir and self.trainer.is_global_zero:
            save_policy(self.policy, self.init_args.export_dir)


def refuse_bad_turns(turns: object, row: str, teacher: Teacher) -> None:
    """Refuse what ``teacher.turns`` returned for row ``row`` unless it is a non-empty list (or tuple) of str: a str
    trained as one turn a character (``_script`` indexes it), and an empty list failed the first step with a bare
    IndexError."""
    if not isinstance(turns, list | tuple) or not all(isinstance(t, str) for t in turns):
        inner = next((type(t).__name__ for t in turns if not isinstance(t, str)), "") if isinstance(turns, list | tuple) else ""
        got = f"a list holding a {inner}" if inner else f"a {type(turns).__name__}"
        raise TypeError(f"{type(teacher).__name__}.turns returned {got} for row {row!r}: a teacher returns a list of str, "
                        "the episode's assistant turns in order")  # fmt: skip
    if not turns:
        raise ValueError(f"{type(teacher).__name__}.turns returned an empty list for row {row!r}: a teacher writes "
                         "at least one assistant turn")  # fmt: skip

