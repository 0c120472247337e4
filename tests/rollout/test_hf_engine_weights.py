"""HFEngine's weight sync into a separate copy (an FSDP2 trainer's engine): every name sent must land."""

import copy

import pytest
import torch

from mmsr.models.policy import Policy
from mmsr.rollout.hf_engine import HFEngine
from mmsr.sync import sync_weights


@pytest.fixture
def engine(tiny_policy):
    """An HFEngine on its own copy of the tiny policy (as ``GRPOModule.configure_model`` makes under FSDP2)."""
    engine = HFEngine()
    engine.bind(Policy(copy.deepcopy(tiny_policy.model), tiny_policy.tokenizer, tiny_policy.image_processor))
    return engine


def test_hf_engine_refuses_names_it_has_no_parameter_for(tiny_policy, engine):
    """A renamed parameter was skipped without a word, and the copy generated with it stale; the sync's probe
    never checks an HFEngine (it has no ``score``)."""
    sent = [(name, p.detach() + 1) for name, p in tiny_policy.model.named_parameters()]
    renamed = [("renamed." + sent[0][0], sent[0][1]), *sent[1:]]
    with pytest.raises(ValueError, match=r"no parameter named \['renamed\.model\..*'\] \(1 of the names sent\); .*stale"):
        engine.update_weights(iter(renamed))
    # the stream was read to its end (under FSDP2 every rank gathers every bucket): the known names landed
    params = dict(engine.policy.model.named_parameters())
    assert all(torch.equal(params[name], t) for name, t in sent[1:])


def test_hf_engine_takes_the_sync_and_either_name_of_a_tied_parameter(tiny_policy, engine):
    """``mmsr.sync`` sends a tied parameter once, under its first name; its other name (``lm_head.weight``,
    vLLM's) is the same tensor and is taken too."""
    trainer = copy.deepcopy(tiny_policy.model)
    with torch.no_grad():
        for p in trainer.parameters():
            p.add_(0.5)
    sync_weights(trainer, engine)
    synced = dict(engine.policy.model.named_parameters())
    assert all(torch.equal(synced[name], p) for name, p in trainer.named_parameters())
    model = engine.policy.model
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied
    engine.update_weights([("lm_head.weight", torch.zeros_like(model.lm_head.weight))])
    assert not model.get_input_embeddings().weight.any()
