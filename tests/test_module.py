"""GRPOModule: one real training step on a tiny Qwen2.5-VL with scripted rollouts."""

import copy
import csv
import re
from dataclasses import replace
from typing import get_args

import lightning as L
import pytest
import torch

from mmsr.algo.loss import AggMode
from mmsr.demo.tokenizer import Scaffold
from mmsr.models.build import TinyQwen2_5_VL
from mmsr.module import GRPOModule
from mmsr.rollout.engine import ScriptedEngine
from mmsr.rollout.loop import RolloutSettings
from tests.conftest import FVQA
from tests.rollout.test_loop import FakeImageSearch, IMG

RIGHT = "<reason>a</reason><answer>musketeers</answer>"
WRONG = "<reason>b</reason><answer>pirates</answer>"


def script(request):
    """Episode k of every prompt: k=0 right, k=1 wrong, k=2 search then right, k=3 garbage."""
    k = int(request.key.rsplit("#", 1)[1])
    return [[RIGHT], [WRONG], [IMG, RIGHT], ["zzz qqq"]][k][min(request.turn, 1 if k == 2 else 0)]


def make_module(**kw) -> GRPOModule:
    texts = [str(FVQA / "fvqa_dev.jsonl")]
    args = dict(policy=TinyQwen2_5_VL(tokenizer_texts=texts, scaffold=Scaffold(), seed=0), engine=ScriptedEngine(script),
                image_search=FakeImageSearch(), num_generations=4, lr=1e-3, kl_coef=0.0,
                rollout=RolloutSettings(max_tokens_per_turn=64))  # fmt: skip
    return GRPOModule(**(args | kw))


class Gradients(L.Callback):
    """The (clipped) gradients each optimizer step applies, by parameter name (the module frees them
    after the step)."""

    def __init__(self):
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.steps.append({n: p.grad.clone() for n, p in pl_module.model.named_parameters() if p.grad is not None})


def fit_one_step(module, samples, max_steps=1, callbacks=()):
    loader = torch.utils.data.DataLoader(samples, batch_size=len(samples), collate_fn=list)
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks))  # fmt: skip
    trainer.fit(module, loader)
    return trainer


def assert_same_gradients(a: Gradients, b: Gradients) -> None:
    (ga,), (gb,) = a.steps, b.steps
    assert ga.keys() == gb.keys() and len(ga) > 10
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name], atol=1e-7, rtol=1e-4, msg=name)


@pytest.fixture(scope="module")
def sample(fvqa_samples):
    return [s for s in fvqa_samples if s.ground_truth == "musketeers"][0]


def sampled_logprob(module, traj):
    (lp,) = module.score([traj], module.model)
    mask = torch.tensor(traj.loss_mask[1:], dtype=torch.bool)
    return lp[mask].sum().item()


def test_step_raises_rewarded_and_lowers_punished_trajectories(sample):
    module = make_module()
    module.start_engine()  # Lightning's setup hook does this in a run
    trajs = module.loop.run([sample], 4, module.sampling)
    rewards = module.compute_rewards(trajs, [sample])
    assert rewards.tolist() == pytest.approx([1.0, 0.1, 0.91, 0.0])
    before = [sampled_logprob(module, t) for t in trajs]
    fit_one_step(module, [sample])
    after = [sampled_logprob(module, t) for t in trajs]
    change = torch.tensor(after) - torch.tensor(before)
    adv = module.last_rollout.advantages
    assert adv[0] > 0 and adv[2] > 0 and adv[1] < 0 and adv[3] < 0
    assert (adv * change).sum() > 0  # the GRPO surrogate went up
    assert change[0] > change[1] and change[0] > change[3]  # the right answer gained on the wrong ones
    assert change[3] < 0  # the garbage episode (no shared tokens with the rewarded ones) lost
    metrics = module.trainer.callback_metrics
    assert metrics["reward/mean"] == pytest.approx(sum([1.0, 0.1, 0.91, 0.0]) / 4)
    assert metrics["reward/accuracy"] == pytest.approx(0.5)
    assert metrics["rollout/search_ratio/image"] == pytest.approx(0.25)
    assert metrics["train/grad_norm"] > 0 and metrics["train/clip_frac"] == 0  # on-policy: ratio 1


@pytest.mark.parametrize("agg", get_args(AggMode))
def test_micro_batching_does_not_change_the_update(sample, agg):
    """Under every loss_agg (Dr. GRPO's normaliser is max_context_tokens, not a micro-batch's padded length)."""
    a, b = make_module(micro_batch_tokens=1, loss_agg=agg), make_module(micro_batch_tokens=100_000, loss_agg=agg)
    b.model.load_state_dict(a.model.state_dict())
    grads_a, grads_b = Gradients(), Gradients()
    fit_one_step(a, [sample], callbacks=[grads_a])
    fit_one_step(b, [sample], callbacks=[grads_b])
    # Adam hides a uniform gradient scale, so compare the accumulated (clipped) gradients themselves.
    assert_same_gradients(grads_a, grads_b)
    assert all(p.grad is None for p in a.model.parameters())  # freed after the step


def test_multiple_updates_use_old_logprobs_and_kl_reference(sample):
    module = make_module(ppo_epochs=2, mini_batches=2, kl_coef=0.1, clip_low=0.01, clip_high=0.01, ref_offload=True)
    initial = copy.deepcopy(module.model.state_dict())
    fit_one_step(module, [sample], max_steps=4)  # 4 optimizer updates = one training step
    metrics = module.trainer.callback_metrics
    assert metrics["train/kl"] > 0 and metrics["train/clip_frac"] > 0  # later updates are off-policy
    ref = module._ref.model
    assert all(p.device.type == "cpu" for p in ref.parameters())  # offloaded between uses
    assert not any(m.training for m in ref.modules())  # after fit too: its log-probs are the KL's fixed target
    for k, v in ref.state_dict().items():  # the reference is the initial policy and never trains
        assert torch.equal(v, initial[k])
    assert any(not torch.equal(v, initial[k]) for k, v in module.model.state_dict().items())
    assert not any("_ref" in k or "reference" in k for k in module.state_dict())


def test_training_step_without_rollouts_fails_loudly(sample):
    module = make_module()
    with pytest.raises(RuntimeError, match="RolloutCallback did not run"):
        module.training_step([sample], 0)


def test_configure_callbacks_returns_rollout_callback():
    from mmsr.callbacks.rollout import RolloutCallback

    assert any(isinstance(c, RolloutCallback) for c in make_module().configure_callbacks())


def test_gradient_checkpointing_gives_the_same_update(sample):
    a, b = make_module(), make_module(gradient_checkpointing=True)
    b.model.load_state_dict(a.model.state_dict())
    grads_a, grads_b = Gradients(), Gradients()
    fit_one_step(a, [sample], callbacks=[grads_a])
    fit_one_step(b, [sample], callbacks=[grads_b])
    assert b.model.is_gradient_checkpointing
    assert_same_gradients(grads_a, grads_b)


class SeedingEngine(ScriptedEngine):
    """Binds like vLLM does: it seeds the process's global generators when it starts."""

    binds = 0

    def bind(self, policy):
        SeedingEngine.binds += 1
        torch.manual_seed(1234)
        super().bind(policy)


def test_the_engine_starts_in_setup_and_leaves_the_rng_alone(sample):
    SeedingEngine.binds = 0
    module = make_module(engine=SeedingEngine(script))
    assert SeedingEngine.binds == 0  # nothing starts in __init__ (before Lightning set up devices)
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    module.start_engine()
    module.start_engine()  # once
    assert SeedingEngine.binds == 1 and torch.equal(torch.rand(3), expected)
    fresh = make_module(engine=SeedingEngine(script))
    fit_one_step(fresh, [sample])  # Lightning's setup hook starts it
    assert SeedingEngine.binds == 2


def test_a_step_row_holds_only_the_metrics_its_step_measured(fvqa_samples, tmp_path):
    """Per-category metrics exist only for the categories in a step's batch: the second step has no
    ``text_search`` question, so its row has no ``reward/accuracy/text_search`` (Lightning would repeat the
    first step's value until the epoch ends)."""
    samples = [replace(s, category=c) for s, c in zip(fvqa_samples, ("text_search", "search_free", "image_search", "search_free"))]
    trainer = L.Trainer(max_steps=2, accelerator="cpu", log_every_n_steps=1, enable_checkpointing=False,
                        logger=L.pytorch.loggers.CSVLogger(tmp_path, name="", version=""),
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(make_module(), torch.utils.data.DataLoader(samples, batch_size=2, collate_fn=list))
    first, second = csv.DictReader((tmp_path / "metrics.csv").open())
    assert (first["step"], second["step"], first["epoch"], second["epoch"]) == ("0", "1", "0", "0")
    assert first["reward/accuracy/text_search"] and not first["reward/accuracy/image_search"]
    assert second["reward/accuracy/image_search"] and not second["reward/accuracy/text_search"]
    assert first["reward/mean"] and second["reward/mean"]


class UsedRates(L.Callback):
    """The learning rate of every optimizer step, as the optimizer applies it."""

    def __init__(self):
        self.rates: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.rates.append(optimizer.param_groups[0]["lr"])


def test_the_logged_learning_rate_is_the_one_the_step_used(sample, tmp_path):
    """With a warmup, the rate moves every step: each row's ``train/lr`` is its own step's (the schedule steps
    after the update; reading it afterwards logged the next step's rate)."""
    used = UsedRates()
    trainer = L.Trainer(max_steps=3, accelerator="cpu", log_every_n_steps=1, enable_checkpointing=False,
                        logger=L.pytorch.loggers.CSVLogger(tmp_path, name="", version=""), callbacks=[used],
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    module = make_module(lr_schedule="cosine", warmup_steps=4, total_steps=10)
    trainer.fit(module, torch.utils.data.DataLoader([sample] * 3, batch_size=1, collate_fn=list))
    logged = [float(r["train/lr"]) for r in csv.DictReader((tmp_path / "metrics.csv").open())]
    assert used.rates == pytest.approx([1e-3 / 4, 2e-3 / 4, 3e-3 / 4])  # linear warmup over 4 steps
    assert logged == pytest.approx(used.rates)


def test_the_schedule_steps_once_per_training_step_not_per_update(sample):
    """``mmsr.algo.schedule``: a step's ``ppo_epochs`` updates share one rate; ``trainer.max_steps`` counts updates."""
    used = UsedRates()
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False, callbacks=[used],
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    module = make_module(lr_schedule="cosine", warmup_steps=4, total_steps=10, ppo_epochs=2)
    trainer.fit(module, torch.utils.data.DataLoader([sample] * 2, batch_size=1, collate_fn=list))
    assert used.rates == pytest.approx([1e-3 / 4, 1e-3 / 4, 2e-3 / 4, 2e-3 / 4])  # 2 training steps of 2 updates


class Unbuildable:
    def build(self):
        raise AssertionError("the policy was built before the settings were checked")


def test_sampling_settings_out_of_range_are_refused_before_the_policy_is_built():
    with pytest.raises(ValueError, match=r"top_p=0"):
        make_module(policy=Unbuildable(), top_p=0.0)


@pytest.mark.parametrize(("setting", "named"), [
    ({"num_generations": 1}, "num_generations=1 (must be >= 2"),  # a group of one: advantage 0, whatever the reward
    ({"num_generations": 0}, "num_generations=0"),
    ({"temperature": 0.0}, "temperature=0.0 (must be > 0"),  # greedy: a group's episodes are identical
    ({"lr": 0.0}, "lr=0.0"), ({"lr": -1e-3}, "lr=-0.001"), ({"weight_decay": -0.1}, "weight_decay=-0.1"),
    ({"warmup_steps": -1}, "warmup_steps=-1"), ({"total_steps": 0}, "total_steps=0"),
    ({"ppo_epochs": 0}, "ppo_epochs=0 (must be >= 1"),  # no update: global_step never reached max_steps
    ({"mini_batches": 0}, "mini_batches=0"), ({"micro_batch_tokens": 0}, "micro_batch_tokens=0"),
    ({"grad_clip": -1.0}, "grad_clip=-1.0 (must be > 0"),  # every gradient flipped: the loss climbed
    ({"grad_clip": 0.0}, "grad_clip=0.0"), ({"kl_coef": -0.001}, "kl_coef=-0.001"),
    ({"clip_low": -1.0}, "clip_low=-1.0"), ({"clip_high": -1.0}, "clip_high=-1.0")])  # fmt: skip
def test_settings_that_stall_or_reverse_training_are_refused_before_the_policy_is_built(setting, named):
    with pytest.raises(ValueError, match=re.escape(named)):
        make_module(policy=Unbuildable(), **setting)


@pytest.mark.parametrize(("setting", "named"), [
    ({"advantage_estimator": "GRPO"}, "GRPOModule: advantage_estimator='GRPO' (must be one of 'grpo', 'drgrpo', 'rloo')"),
    ({"param_dtype": "float16"}, "GRPOModule: param_dtype='float16' (must be one of 'float32', 'bfloat16')"),
    ({"old_logprobs": "recomputed", "ppo_epochs": 2}, "UpdateSettings: old_logprobs='recomputed' (must be one of"),
    ({"loss_agg": "token_mean"}, "UpdateSettings: loss_agg='token_mean' (must be one of 'token-mean',")])  # fmt: skip
def test_a_misspelt_choice_is_refused_before_the_policy_is_built(setting, named):
    """A misspelt estimator or loss mode failed at the first update, after a rollout; old_logprobs='recomputed' never
    failed: it scored no old policy, so every PPO ratio was 1 and nothing was clipped."""
    with pytest.raises(ValueError, match=re.escape(named)):
        make_module(policy=Unbuildable(), **setting)


def test_a_tool_limit_naming_no_configured_tool_is_refused_before_the_policy_is_built():
    """The loop refuses it too, but it is built after the policy: a 7B checkpoint loaded first."""
    with pytest.raises(ValueError, match=r"tool_limits names 'imge_search', not a configured tool"):
        make_module(policy=Unbuildable(), rollout=RolloutSettings(tool_limits={"imge_search": 1}))


def test_an_overridden_tool_entry_limit_is_refused_before_the_policy_is_built():
    from mmsr.tools.spec import TextSearchTool

    with pytest.raises(ValueError, match=r"the text_search entry of tools sets limit: 10, and rollout.text_search_limit: 2"):
        make_module(policy=Unbuildable(), tools=[TextSearchTool(limit=10)], rollout=RolloutSettings(text_search_limit=2))


class HotterModule(GRPOModule):
    """A subclass that samples at twice the temperature it is given (save_hyperparameters records its argument)."""

    def __init__(self, temperature: float = 1.0, **kwargs):
        super().__init__(temperature=temperature * 2, **kwargs)


def test_a_subclass_samples_at_the_temperature_it_passes_on_not_the_one_it_was_given():
    args = dict(policy=TinyQwen2_5_VL(tokenizer_texts=[str(FVQA / "fvqa_dev.jsonl")], scaffold=Scaffold(), seed=0),
                engine=ScriptedEngine(script), num_generations=4, kl_coef=0.0)  # fmt: skip
    module = HotterModule(temperature=0.7, **args)
    assert module.hparams.temperature == 0.7  # what Lightning records: the subclass's own argument
    assert module.sampling.temperature == pytest.approx(1.4)
    assert module.policy_update.settings.temperature == pytest.approx(1.4)  # the trainer scores logits / 1.4


class Adjusting(GRPOModule):
    """A subclass that trains at ten times the lr it is given, into its own export directory, with 8 generations."""

    def __init__(self, lr: float = 1e-3, export_dir: str | None = None, **kwargs):
        super().__init__(lr=lr * 10, export_dir=f"{export_dir}/own", num_generations=8, **kwargs)


def test_a_subclass_runs_with_what_it_passes_on_everywhere_not_its_own_arguments(tmp_path):
    """Every setting the module reads came from ``hparams``, save_hyperparameters' record of the subclass's own
    arguments: the optimizer took the lr it was given, not the one passed on."""
    args = dict(policy=TinyQwen2_5_VL(tokenizer_texts=[str(FVQA / "fvqa_dev.jsonl")], scaffold=Scaffold(), seed=0),
                engine=ScriptedEngine(script), kl_coef=0.0)  # fmt: skip
    module = Adjusting(lr=1e-3, export_dir=str(tmp_path), **args)
    assert module.hparams.lr == 1e-3  # what rebuilds the subclass
    [optimizer], _ = module.configure_optimizers()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-2)
    assert module.init_args.num_generations == 8
    module.trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False)
    module.on_train_end()
    assert (tmp_path / "own" / "config.json").exists()


BF16_REWARDS = [1.0, 0.3, 0.7, 0.1]  # not one of them a bf16 number but 1.0


class BF16Rewards(GRPOModule):
    """A reward model's scores under bf16 autocast: a bf16 tensor."""

    def compute_rewards(self, trajectories, samples):
        return torch.tensor(BF16_REWARDS[: len(trajectories)], dtype=torch.bfloat16)


def test_an_override_s_bf16_rewards_come_back_on_the_cpu_in_float32_and_the_advantages_too(sample):
    """bf16 rewards ran the advantages in bf16 (and CUDA ones failed their index_add on the device)."""
    from mmsr.algo import group_advantages

    module = make_module()
    module.__class__ = BF16Rewards
    fit_one_step(module, [sample])
    got = module.last_rollout
    assert got.rewards.dtype == torch.float32 and got.rewards.device.type == "cpu"
    values = torch.tensor(BF16_REWARDS, dtype=torch.bfloat16).float()
    assert torch.equal(got.rewards, values)
    assert got.advantages.dtype == torch.float32
    assert torch.equal(got.advantages, group_advantages(values, torch.zeros(4, dtype=torch.long)))


def test_rewards_already_on_the_cpu_in_float32_are_checked_without_a_copy():
    """The default's rewards are already CPU float32: checking them copies nothing (the demo's numbers stay)."""
    module = make_module()
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.25])
    module.compute_rewards = lambda trajectories, samples: rewards
    from tests.reward.test_reward_errors import SAMPLES, TRAJS

    checked = module.checked_rewards(TRAJS, SAMPLES)
    assert checked.data_ptr() == rewards.data_ptr() and checked.dtype == torch.float32 and torch.equal(checked, rewards)


@pytest.mark.parametrize("sanity", [True, False], ids=["sanity_check", "after_a_step"])
def test_a_validation_error_is_raised_itself_and_skips_the_rank_s_later_batches(sample, sanity):
    """One process: the error a held-out episode raised is raised (the same object) at the validation epoch's end,
    where several ranks agree to stop (``on_validation_epoch_end``), the rank's later batches not rolled out."""
    from mmsr.tools.base import FatalToolError

    module, error, val_runs = make_module(), FatalToolError("replay miss"), []
    run = module.loop.run

    def failing(batch, n, sampling):
        if sampling.temperature != 0.0:  # training's rollouts
            return run(batch, n, sampling)
        val_runs.append(batch)  # validation's greedy episodes
        raise error

    module.loop.run = failing
    loader = torch.utils.data.DataLoader([sample] * 3, batch_size=1, collate_fn=list)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, val_check_interval=1,
                        check_val_every_n_epoch=None, num_sanity_val_steps=2 if sanity else 0)  # fmt: skip
    with pytest.raises(FatalToolError) as info:
        trainer.fit(module, loader, loader)
    assert info.value is error and len(val_runs) == 1
    assert trainer.global_step == (0 if sanity else 1)


class SleepingEngine(ScriptedEngine):
    """Sleeps like vLLM's sleep mode: every wake, weight load, generate and sleep call in order."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.calls: list[str] = []

    def wake(self):
        self.calls.append("wake")

    def sleep(self):
        self.calls.append("sleep")

    def update_weights(self, named_tensors):
        self.calls.append("sync")
        super().update_weights(named_tensors)

    def generate(self, requests, sampling):
        self.calls.append("generate")
        return super().generate(requests, sampling)


def test_the_engine_wakes_for_the_sync_and_rollout_and_sleeps_before_the_update(sample):
    """The update needs the GPU memory the sleeping engine frees: sleep comes after the step's last generate
    and before its update, every step."""
    engine = SleepingEngine(script)
    module = make_module(engine=engine)
    update_policy = module.update_policy

    def recorded_update(trajs, advantages):
        engine.calls.append("update")
        return update_policy(trajs, advantages)

    module.update_policy = recorded_update
    fit_one_step(module, [sample], max_steps=2)
    steps = [step.strip(",").split(",") for step in ",".join(engine.calls).split("wake")[1:]]
    assert len(steps) == 2 and ",".join(engine.calls).startswith("wake,"), engine.calls
    for step in steps:
        generates = step.count("generate")
        assert generates >= 1 and step == ["sync"] + ["generate"] * generates + ["sleep", "update"], engine.calls
