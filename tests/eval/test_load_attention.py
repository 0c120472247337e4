"""A policy built with flash-attention 2 (a GPU recipe's builder where flash-attn is installed: ``auto`` with bf16
weights) is evaluated with sdpa, its vision tower's included: every ``mmsr eval`` source leaves the model on the CPU
(a checkpoint's in its fp32 master weights), where flash-attn cannot run the weight-sync probe's forward. Without
flash-attn here, a forward that still dispatched to it fails as on such a machine."""

from __future__ import annotations

import pytest
import torch
import yaml

from mmsr.models.build import PretrainedPolicy, TinyQwen2_5_VL
from mmsr.models.policy import Policy
from mmsr.models.tiny_qwen3_vl import TinyQwen3VL
from mmsr.sync.probe import probe_inputs, trainer_logits
from mmsr.demo.tokenizer import Scaffold
from tests.conftest import FVQA
from tests.eval.test_cli import TOOLS, _checkpointed

TEXTS = [str(FVQA / "fvqa_dev.jsonl"), str(FVQA / "search" / "corpus.jsonl")]
FAMILIES = {"qwen2_5_vl": TinyQwen2_5_VL, "qwen3_vl": TinyQwen3VL}


def flash_attention(policy: Policy) -> Policy:
    """``policy`` as a GPU builder leaves it: flash-attention 2 in its config and sub-configs (the config's setter
    reaches them; transformers checks flash-attn only when it loads a model or switches its attention)."""
    policy.model.config._attn_implementation = "flash_attention_2"
    return policy


class FlashTiny:
    """A tiny vision-language policy of ``family`` (``FAMILIES``) built with flash-attention 2 (``flash_attention``)."""

    def __init__(self, family: str = "qwen2_5_vl", seed: int = 0) -> None:
        self.family, self.seed = family, seed

    def build(self) -> Policy:
        builder = FAMILIES[self.family](tokenizer_texts=TEXTS, scaffold=Scaffold(), seed=self.seed)
        return flash_attention(builder.build())


FLASH = {"class_path": f"{__name__}.FlashTiny"}


def attentions(policy: Policy) -> dict[str, str]:
    """The attention of the model's config and of each sub-config (a Qwen-VL's ``text_config``, ``vision_config``)."""
    config = policy.model.config
    return {"": config._attn_implementation} | {k: getattr(config, k)._attn_implementation for k in config.sub_configs}


def assert_runs_with_sdpa(policy: Policy) -> None:
    """The weight-sync probe's trainer-side forward runs (an engine that scores, as vLLM, has it run while loading;
    ``HFEngine`` does not), with sdpa everywhere."""
    ids, vision = probe_inputs(policy)  # the probe's images: the vision tower's attention runs too
    assert vision and torch.isfinite(trainer_logits(policy, ids, vision)).all()
    assert attentions(policy) == {"": "sdpa", "text_config": "sdpa", "vision_config": "sdpa"}


def test_a_flash_attention_checkpoint_is_evaluated_with_sdpa(tmp_path):
    """``--ckpt``: the run's builder picks flash-attention 2, the checkpoint's fp32 weights replace the built ones."""
    from mmsr.eval.load import load_checkpoint

    init = {"policy": FLASH, **TOOLS, "num_generations": 2, "rollout": {"max_rounds": 2, "max_tokens_per_turn": 5}}
    ckpt, _ = _checkpointed(tmp_path, {"class_path": "mmsr.module.GRPOModule", "init_args": init})
    loaded = load_checkpoint(ckpt)
    assert loaded.policy.model.dtype == torch.float32
    assert_runs_with_sdpa(loaded.policy)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_flash_attention_policy_yaml_is_evaluated_with_sdpa(tmp_path, family):
    from mmsr.eval.load import load_policy_yaml

    (tmp_path / "policy.yaml").write_text(yaml.safe_dump({"policy": FLASH | {"init_args": {"family": family}}}))
    assert_runs_with_sdpa(load_policy_yaml(tmp_path / "policy.yaml").policy)


def test_a_flash_attention_model_dir_is_evaluated_with_sdpa(tmp_path, tiny_policy, monkeypatch):
    """``--model-dir`` with bf16 weights on the CPU: flash-attn refuses CPU tensors whatever their dtype."""
    from mmsr.eval.load import load_model_dir

    tiny_policy.model.save_pretrained(tmp_path)
    tiny_policy.tokenizer.save_pretrained(tmp_path)
    build = PretrainedPolicy.build
    monkeypatch.setattr(PretrainedPolicy, "build", lambda self: flash_attention(build(self)))
    monkeypatch.setattr(PretrainedPolicy, "__init__", with_dtype(PretrainedPolicy.__init__, "bfloat16"))
    loaded = load_model_dir(str(tmp_path), 3136, 12544)
    assert loaded.policy.model.dtype == torch.bfloat16
    assert_runs_with_sdpa(loaded.policy)


def with_dtype(init, dtype: str):
    """``PretrainedPolicy.__init__`` building ``dtype`` weights (``load_model_dir`` takes the default, fp32)."""
    return lambda self, path, **kw: init(self, path, **(kw | {"dtype": dtype}))
