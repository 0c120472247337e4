"""An update whose gradient norm is not finite is skipped, as veRL's ``dp_actor`` skips it: one inf gradient element
(a bf16 overflow, an outlier) made ``clip_grad_norm_`` scale every gradient by NaN, AdamW wrote NaN into every
weight and the run trained on. Now the weights and AdamW's state stay as they were, ``train/nonfinite_grad_steps``
counts the step's skipped updates (0 on a healthy step), and 5 in a row stop the run naming the step."""

import copy
import re
import warnings

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from mmsr.optim import NonfiniteGuard, adamw_with_schedule
from mmsr.sft import SFTModule
from mmsr.train.update import Backprop, PolicyUpdate, UpdateSettings
from tests.test_module import fit_one_step, make_module
from tests.test_sft import Built, EchoTeacher
from tests.train.test_update_metrics import KeepGradients

KEY = "train/nonfinite_grad_steps"


def poison(param: torch.nn.Parameter, times: int) -> None:
    """Make ``param``'s first ``times`` gradients (one a backward pass) hold an inf."""
    fired = []

    def hook(grad):
        if len(fired) >= times:
            return grad
        fired.append(1)
        grad = grad.clone()
        grad.view(-1)[0] = float("inf")
        return grad

    param.register_hook(hook)


def linear_step(guard, model, opt, inf: bool, at: int) -> bool:
    opt.zero_grad()
    model(torch.ones(1, 4)).sum().backward()
    if inf:
        model.weight.grad[0, 0] = float("inf")
    norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
    return guard.step(opt, norm, at)


def test_a_skipped_update_leaves_weights_and_adamw_state_as_they_were_and_a_finite_one_is_plain_adamw():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    plain = copy.deepcopy(model)
    [opt], _ = adamw_with_schedule(model.parameters(), 1e-2, 0.1, "constant", 0, 10)
    [plain_opt], _ = adamw_with_schedule(plain.parameters(), 1e-2, 0.1, "constant", 0, 10)
    guard = NonfiniteGuard("Test", "an outlier")
    assert linear_step(guard, model, opt, False, 0) is False
    plain_opt.zero_grad()
    plain(torch.ones(1, 4)).sum().backward()
    torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0)
    plain_opt.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), plain.parameters()))  # bit for bit
    before = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    with pytest.warns(UserWarning, match="Test: the gradient norm at global_step 1 is (inf|nan): update skipped"):
        assert linear_step(guard, model, opt, True, 1) is True
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), before[0].values()))
    for p, state in opt.state_dict()["state"].items():  # moments and step count untouched
        assert all(torch.equal(v, before[1]["state"][p][k]) for k, v in state.items())
    assert all(p.grad is None for p in model.parameters())


def test_five_skipped_updates_in_a_row_stop_the_run_naming_the_step_and_the_causes():
    model = torch.nn.Linear(4, 3)
    [opt], _ = adamw_with_schedule(model.parameters(), 1e-2, 0.0, "constant", 0, 10)
    guard = NonfiniteGuard("Test", "an outlier")
    with pytest.warns(UserWarning):
        for at in range(4):
            linear_step(guard, model, opt, True, at)
        linear_step(guard, model, opt, False, 4)  # a finite norm in between starts the count again
        for at in range(5, 9):
            linear_step(guard, model, opt, True, at)
    with pytest.raises(FloatingPointError, match=r"5 optimizer updates in a row, the last at global_step 9.*model.lr.*"
                                                 r"bf16.*an outlier"):  # fmt: skip
        linear_step(guard, model, opt, True, 9)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_the_step_counts_its_skipped_updates_not_their_mean(fvqa_samples):
    """``mini_batches=2``: the first update's gradient holds an inf, the second's not. The step logs 1 skipped
    update (a mean over updates would read 0.5) and applies the second; the warning names the update's step."""
    module = make_module()
    module.start_engine()
    trajs = module.loop.run(fvqa_samples[:1], 4, module.sampling)
    opt = KeepGradients(module.model.parameters())
    poison(next(iter(module.model.parameters())), times=1)
    settings = UpdateSettings(kl_coef=0.0, share_prefix=False, mini_batches=2)
    step = Backprop(module.model, opt, torch.Tensor.backward, torch.device("cpu"), 1, global_step=7)
    with pytest.warns(UserWarning, match="GRPOModule: the gradient norm at global_step 7 is"):
        metrics = PolicyUpdate(module.policy, settings).update(trajs, torch.tensor([1.0, -0.5, 0.3, -0.8]), None, step)
    assert metrics[KEY] == 1
    assert len(opt.steps) == 2 and (opt.steps[0] == 0).all()  # no gradient reached the first optimizer step
    assert torch.isfinite(opt.steps[1]).all() and opt.steps[1].abs().sum() > 0


class Watch(L.Callback):
    """Each step's logged skip count, and whether the weights are finite and as at the start."""

    def __init__(self, module):
        self.start = [p.detach().clone() for p in module.model.parameters()]
        self.rows = []

    def on_train_batch_end(self, trainer, pl_module, *args):
        params = list(pl_module.model.parameters())
        self.rows.append((float(trainer.callback_metrics[KEY]), all(torch.isfinite(p).all() for p in params),
                          all(torch.equal(p, s) for p, s in zip(params, self.start))))  # fmt: skip


def test_grpo_skips_an_inf_gradient_and_trains_on(fvqa_samples):
    module = make_module()
    poison(next(iter(module.model.parameters())), times=1)
    watch = Watch(module)
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        trainer = fit_one_step(module, fvqa_samples[:1], max_steps=2, callbacks=[watch])
    # step 1 skipped (weights as at the start), step 2 trained; every step logs the count
    assert watch.rows == [(1.0, True, True), (0.0, True, False)]
    assert trainer.global_step == 2  # the skipped update counts towards max_steps
    assert said(warned, "GRPOModule: the gradient norm at global_step 0 is (inf|nan): update skipped")


def test_grpo_stops_after_five_nonfinite_updates_in_a_row(fvqa_samples):
    module = make_module()
    poison(next(iter(module.model.parameters())), times=100)
    watch = Watch(module)
    with pytest.raises(FloatingPointError, match="GRPOModule: .* 5 optimizer updates in a row, the last at global_step 4"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the first 4 warn (test_grpo_skips_an_inf_gradient_and_trains_on)
            fit_one_step(module, fvqa_samples[:1], max_steps=10, callbacks=[watch])
    assert watch.rows == [(1.0, True, True)] * 4


def test_sft_skips_an_inf_gradient_and_trains_on(tiny_policy, fvqa_samples):
    module = SFTModule(Built(copy.deepcopy(tiny_policy)), EchoTeacher())
    poison(next(iter(module.model.parameters())), times=1)
    watch = Watch(module)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[watch])  # fmt: skip
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        trainer.fit(module, DataLoader(fvqa_samples[:2], batch_size=1, collate_fn=list))
    assert watch.rows == [(1.0, True, True), (0.0, True, False)]
    assert said(warned, "SFTModule: the gradient norm at global_step 0 is (inf|nan): update skipped")


def said(warned, pattern: str) -> bool:
    return any(re.match(pattern, str(w.message)) for w in warned)


def test_a_resumed_run_continues_the_count_of_skipped_updates_in_a_row(fvqa_samples):
    """A run stopped after 4 skipped updates in a row resumed at 0 and skipped 4 more before stopping: the count
    is in the checkpoint (GRPO's and the warm start's)."""
    module = make_module()
    module.policy_update.nonfinite.in_a_row = 4
    checkpoint = {}
    module.on_save_checkpoint(checkpoint)
    resumed = make_module()
    resumed.on_load_checkpoint(checkpoint)
    poison(next(iter(resumed.model.parameters())), times=100)
    with pytest.raises(FloatingPointError, match="5 optimizer updates in a row, the last at global_step 0"):
        fit_one_step(resumed, fvqa_samples[:1], max_steps=3)
    make_module().on_load_checkpoint({})  # a checkpoint from before the count was saved starts at 0


def test_a_resumed_warm_start_continues_the_count_too(tiny_policy):
    module = SFTModule(Built(copy.deepcopy(tiny_policy)), EchoTeacher())
    module.nonfinite.in_a_row = 3
    checkpoint = {}
    module.on_save_checkpoint(checkpoint)
    resumed = SFTModule(Built(copy.deepcopy(tiny_policy)), EchoTeacher())
    resumed.on_load_checkpoint(checkpoint)
    assert resumed.nonfinite.in_a_row == 3
