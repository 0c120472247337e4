"""``mmsr export``: the exported directory reloads as the policy was trained, tool-image bounds included
(``save_policy`` records them beside the Hugging Face files)."""

from dataclasses import replace
from types import SimpleNamespace

import torch
from transformers import GenerationConfig, Qwen2VLImageProcessorPil

import mmsr.eval.load
from mmsr.export import export
from mmsr.models.build import PretrainedPolicy
from mmsr.sync import probe_image


def test_an_exported_policy_reloads_with_its_tool_image_bounds(tiny_policy, tmp_path, monkeypatch):
    tools = Qwen2VLImageProcessorPil(patch_size=14, merge_size=2, temporal_patch_size=2, min_pixels=56 * 56,
                                     max_pixels=56 * 56 * 2)  # fmt: skip
    policy = replace(tiny_policy, tool_image_processor=tools)
    monkeypatch.setattr(mmsr.eval.load, "load_module", lambda ckpt, run_config, leave_out: SimpleNamespace(policy=policy))
    out = export("run/checkpoints/last.ckpt", tmp_path / "hf")
    reloaded = PretrainedPolicy(str(out)).build()
    thumbnail = probe_image().resize((400, 300))  # 120k pixels: above every bound here, resized down
    trained, seen = policy.process_image(thumbnail, tool=True), reloaded.process_image(thumbnail, tool=True)
    assert seen.grid_thw == trained.grid_thw and torch.equal(seen.pixel_values, trained.pixel_values)


def test_an_exported_policy_keeps_its_generation_configs_eos_ids_and_sampling_defaults(tiny_policy, tmp_path, monkeypatch):
    """``save_policy`` writes a copy of the generation config with the banned ids added, nothing else changed:
    the eos list is what ``Policy.stop_token_ids`` (and vLLM) stop on, so an exported policy that lost it ran
    past ``<|endoftext|>``. The tiny policy's own eos is the tokenizer's, so a dropped list went unnoticed there."""
    config = tiny_policy.model.generation_config
    monkeypatch.setattr(config, "eos_token_id", [2, 5])  # as Qwen2.5-VL-Instruct's: end of turn and another; restored
    monkeypatch.setattr(config, "temperature", 0.1)
    monkeypatch.setattr(config, "do_sample", True)  # transformers refuses to save a temperature without sampling
    monkeypatch.setattr(mmsr.eval.load, "load_module", lambda ckpt, run_config, leave_out: SimpleNamespace(policy=tiny_policy))
    out = export("run/checkpoints/last.ckpt", tmp_path / "hf")
    saved = GenerationConfig.from_pretrained(out)
    assert saved.eos_token_id == [2, 5] and saved.temperature == 0.1
    tokenizer = tiny_policy.tokenizer  # 5 is neither its eos nor the end of turn (2): only the config holds it
    assert 5 not in {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(tiny_policy.chat.end_of_turn)}
    assert {2, 5} <= PretrainedPolicy(str(out)).build().stop_token_ids()
