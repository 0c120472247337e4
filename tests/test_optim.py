"""The optimizer both modules configure: AdamW over the trainable parameters, stepped as one foreach
update that equals the per-tensor AdamW bit for bit, and the LR schedule stepping with it."""

import torch

from mmsr.optim import adamw_with_schedule


def params(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(64, 32), (32,), (128, 64), (7,)]
    return [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in shapes]


def test_adamw_steps_as_the_per_tensor_update_bit_for_bit_and_skips_frozen_parameters():
    ours, theirs = params(0), params(0)
    ours[1].requires_grad_(False)
    [opt], [entry] = adamw_with_schedule(ours, 1e-2, 0.1, "cosine", 2, 6)
    sched, lrs = entry["scheduler"], []
    assert opt.defaults["foreach"] and [p for g in opt.param_groups for p in g["params"]] == [ours[0], ours[2], ours[3]]
    ref = torch.optim.AdamW([theirs[0], theirs[2], theirs[3]], lr=1e-2, weight_decay=0.1, foreach=False)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        for a, b in zip(ours, theirs):
            b.grad = torch.randn(b.shape, generator=g)
            a.grad = None if not a.requires_grad else b.grad.clone()
        ref.param_groups[0]["lr"] = opt.param_groups[0]["lr"]
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        ref.step()
        sched.step()
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    assert lrs[0] < lrs[1] > lrs[-1]  # the cosine schedule's warm-up, then its decay
    assert not torch.equal(ours[0], params(0)[0]) and torch.equal(ours[1], params(0)[1])


def test_a_warmup_the_schedule_would_ignore_is_refused():
    """Only ``cosine`` warms up: ``warmup_steps`` with ``constant`` or ``sigmoid`` did nothing, silently (the
    demo's warm start set 10 and ran at full rate from step 0)."""
    import pytest

    for schedule in ("constant", "sigmoid"):
        with pytest.raises(ValueError, match=f"warmup_steps=10 needs lr_schedule: cosine; the '{schedule}' schedule"):
            adamw_with_schedule(params(0), 1e-3, 0.0, schedule, 10, 100)
    adamw_with_schedule(params(0), 1e-3, 0.0, "constant", 0, 100)  # no warmup: fine
