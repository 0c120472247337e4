"""``mmsr export``: the exported directory reloads as the policy was trained, tool-image bounds included
(``save_policy`` records them beside the Hugging Face files)."""

from dataclasses import replace
from types import SimpleNamespace

import torch
from transformers import Qwen2VLImageProcessorPil

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
