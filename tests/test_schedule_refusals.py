"""A cosine ``warmup_steps`` longer than ``total_steps`` was refused only in ``configure_optimizers``
(``make_lr_lambda``), after the policy was built and, under ``mmsr fit``, the engine started. ``check_schedule``
refuses it in the modules' ``__init__``, before the build, naming the ``model.`` keys."""

import re

import pytest

from mmsr.cli import cause, lightning_cli
from mmsr.optim import check_schedule
from mmsr.sft import SFTModule
from tests.conftest import ROOT
from tests.test_module import make_module
from tests.test_sft import Unbuildable

REFUSED = re.escape("model.warmup_steps=10 > model.total_steps=5: the cosine lr schedule")
COSINE = dict(lr_schedule="cosine", warmup_steps=10, total_steps=5)


def test_a_warmup_longer_than_the_schedule_is_refused_before_the_policy_is_built():
    with pytest.raises(ValueError, match=REFUSED):
        make_module(policy=Unbuildable(), **COSINE)
    with pytest.raises(ValueError, match=REFUSED):
        SFTModule(Unbuildable(), teacher=object(), **COSINE)


def test_a_warmup_as_long_as_the_schedule_is_accepted():
    check_schedule("cosine", 5, 5)
    check_schedule("cosine", 0, 5)


def test_mmsr_fit_refuses_it_as_it_builds_the_module_naming_the_keys():
    """Before: accepted here, refused in ``configure_optimizers`` once ``trainer.fit`` had started the engine."""
    args = ["-c", str(ROOT / "configs" / "smoke.yaml"), *(f"--model.init_args.{k}={v}" for k, v in COSINE.items())]
    with pytest.raises(BaseException) as refused:
        lightning_cli(args, run=False)
    assert re.match(f"ValueError: {REFUSED}", cause(refused.value)), cause(refused.value)
