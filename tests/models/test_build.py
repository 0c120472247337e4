"""Loading real checkpoints (a tiny model saved locally) and text-only causal LMs."""

import os
from dataclasses import replace

import pytest
import torch
from PIL import Image
from transformers import Qwen2VLImageProcessorPil

from mmsr.demo.tokenizer import Scaffold
from mmsr.models.build import POLICY_RECORD, PretrainedPolicy, TinyQwen2_5_VL, mrope_sections, save_policy
from mmsr.models.tiny_text import TinyQwen2
from mmsr.rollout.engine import SamplingParams
from mmsr.rollout.hf_engine import HFEngine
from tests.conftest import FVQA
from tests.rollout.test_loop import ANS, make_loop


def test_pretrained_directory_round_trip(tiny_policy, tmp_path, fvqa_samples):
    save_policy(tiny_policy, tmp_path)
    loaded = PretrainedPolicy(str(tmp_path)).build()
    assert loaded.is_vision and loaded.image_processor.size == tiny_policy.image_processor.size
    image = fvqa_samples[0].image
    v1, v2 = tiny_policy.process_image(image), loaded.process_image(image)
    assert v1.grid_thw == v2.grid_thw and torch.equal(v1.pixel_values, v2.pixel_values)
    ids = torch.tensor([loaded.encoder().encode("hi <image> there", [v2.num_tokens])])
    pos = loaded.position_ids(ids[0], [v2])[:, None]
    with torch.no_grad():
        a = tiny_policy.forward(ids, torch.ones_like(ids), pos, [v1]).logits
        b = loaded.forward(ids, torch.ones_like(ids), pos, [v2]).logits
    torch.testing.assert_close(a, b)


def test_text_only_lm_rolls_out_and_scores(tmp_path, fvqa_samples):
    policy = TinyQwen2(tokenizer_texts=[str(FVQA / "fvqa_dev.jsonl")], scaffold=Scaffold(), hidden_size=64, num_heads=2).build()
    save_policy(policy, tmp_path)
    policy = PretrainedPolicy(str(tmp_path)).build()
    assert not policy.is_vision
    # Scripted: the question image is replaced by a text stub, tool images are dropped.
    loop, _ = make_loop(policy, lambda r: ANS)
    (traj,) = loop.run(fvqa_samples[:1], 1, SamplingParams())
    assert traj.vision == [] and "[image]" in policy.tokenizer.decode(traj.input_ids)
    # Real generation with the HF engine on the text model.
    engine = HFEngine(seed=1)
    engine.bind(policy)
    loop.engine = engine
    trajs = loop.run(fvqa_samples[:2], 2, SamplingParams(max_tokens=8))
    assert all(t.num_sampled_tokens > 0 for t in trajs)


def test_tool_images_have_their_own_pixel_bounds(tiny_policy, tmp_path, fvqa_samples):
    """With the 7B recipe's question-image bounds (512x512 .. 903,168 pixels), thumbnails keep the
    tool bounds (56x56 .. 224x224): the images of a 5-thumbnail image search take at most 320 tokens
    (with the question bounds each would take >= 334)."""
    from PIL import Image

    from mmsr.rollout.vllm_inputs import pixel_bounds
    from mmsr.tools.base import IMAGE_MARKER, ToolResult
    from tests.rollout.test_loop import IMG

    save_policy(tiny_policy, tmp_path)
    (tmp_path / POLICY_RECORD).unlink()  # as a hub checkpoint: no trained tool-image bounds, the defaults
    policy = PretrainedPolicy(str(tmp_path), min_pixels=262144, max_pixels=903168).build()
    assert policy.process_image(fvqa_samples[0].image).num_tokens >= 334  # the question image, upscaled
    thumbs = tuple(Image.new("RGB", size, "gray") for size in [(200, 150), (150, 200), (300, 300), (1200, 900), (40, 30)])
    tokens = [policy.process_image(t, tool=True).num_tokens for t in thumbs]
    assert max(tokens) <= 64 and min(tokens) >= 4  # 224x224 at most, 56x56 at least

    class FiveThumbnails:
        async def __call__(self, request):
            text = "[Image Search Results]\n" + "".join(f"{i}. image: {IMAGE_MARKER}\ntitle: t{i}\n" for i in range(5))
            return ToolResult(text, thumbs)

    loop, _ = make_loop(policy, lambda r: IMG if r.turn == 0 else ANS, image=FiveThumbnails())
    (traj,) = loop.run(fvqa_samples[:1], 1, SamplingParams())
    observation = traj.input_ids[traj.turns[0].span[1] : traj.turns[1].span[0]]
    pads = sum(t == policy.model.config.image_token_id for t in observation)
    assert [v.num_tokens for v in traj.vision[1:]] == tokens and pads == sum(tokens) <= 5 * 64
    assert pixel_bounds(policy.image_processor, policy.tool_image_processor) == {"min_pixels": 56 * 56, "max_pixels": 903168}
    same = PretrainedPolicy(str(tmp_path), tool_image_min_pixels=None, tool_image_max_pixels=None).build()
    assert same.tool_image_processor is None  # None: thumbnails take the question image's bounds


def test_a_published_style_preprocessor_config_takes_the_pixel_overrides(tiny_policy, tmp_path):
    """Qwen2.5-VL-7B-Instruct's own preprocessor_config.json names min_pixels / max_pixels: passing the recipe's
    bounds as well raised TypeError ('multiple values for keyword argument'); the overrides win."""
    import json

    from mmsr.rollout.vllm_inputs import pixel_bounds

    save_policy(tiny_policy, tmp_path)
    cfg_file = tmp_path / "preprocessor_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.pop("size", None)
    cfg_file.write_text(json.dumps(cfg | {"min_pixels": 3136, "max_pixels": 12845056}))
    policy = PretrainedPolicy(str(tmp_path), min_pixels=262144, max_pixels=903168).build()
    assert pixel_bounds(policy.image_processor) == {"min_pixels": 262144, "max_pixels": 903168}
    assert pixel_bounds(policy.image_processor, policy.tool_image_processor) == {"min_pixels": 56 * 56, "max_pixels": 903168}
    assert pixel_bounds(PretrainedPolicy(str(tmp_path)).build().image_processor) == {"min_pixels": 3136, "max_pixels": 12845056}


def test_a_hub_id_reads_the_checkpoints_preprocessor_config_and_a_wrong_patch_size_is_refused(tiny_qwen3_vl, tmp_path):
    """By hub id (here from an offline hub cache) the processor config was skipped: a Qwen3-VL got Qwen2-VL's
    14-pixel patches and mean. A processor whose patches do not fit the vision tower is refused, naming both."""
    import json
    import subprocess
    import sys

    from tests.conftest import ROOT, subprocess_env

    snapshot = tmp_path / "hub" / "models--acme--tiny-qwen3-vl" / "snapshots" / ("0" * 40)
    save_policy(tiny_qwen3_vl, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    code = "from mmsr.models.build import PretrainedPolicy; print(PretrainedPolicy('acme/tiny-qwen3-vl').build().image_processor.patch_size)"
    env = subprocess_env(HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-1] == "16"
    cfg_file = snapshot / "preprocessor_config.json"
    cfg_file.write_text(json.dumps(json.loads(cfg_file.read_text()) | {"patch_size": 14}))
    import pytest

    with pytest.raises(ValueError, match="cuts 14-pixel patches, the model's vision tower takes 16"):
        PretrainedPolicy(str(snapshot)).build()


def test_saved_weights_follow_the_umask_so_other_users_jobs_read_them(tiny_policy, tmp_path):
    """safetensors writes its file 0600: an export another user's vLLM or eval job loads was unreadable."""
    old = os.umask(0o022)
    try:
        save_policy(tiny_policy, tmp_path)
    finally:
        os.umask(old)
    assert {p.name: p.stat().st_mode & 0o777 for p in tmp_path.glob("*.safetensors")} == {"model.safetensors": 0o644}


def tool_bounds_of(path, **kw) -> dict[str, int]:
    from mmsr.rollout.vllm_inputs import pixel_bounds

    return pixel_bounds(PretrainedPolicy(str(path), **kw).build().tool_image_processor)


@pytest.mark.parametrize("tool_max_pixels", [None, 56 * 56 * 2])  # the question images' bounds; the tools' own
def test_a_saved_policy_reloads_with_the_tool_image_bounds_it_was_trained_with(tiny_policy, tmp_path, tool_max_pixels):
    """No saved file held the tool images' bounds: ``PretrainedPolicy(path=DIR)`` resized them within its
    defaults, so a 400x300 tool image the policy trained on as 12 tokens came back as 54."""
    from mmsr.sync import probe_image

    policy = tiny_policy
    if tool_max_pixels is not None:
        tools = Qwen2VLImageProcessorPil(patch_size=14, merge_size=2, temporal_patch_size=2, min_pixels=56 * 56,
                                         max_pixels=tool_max_pixels)  # fmt: skip
        policy = replace(tiny_policy, tool_image_processor=tools)
    save_policy(policy, tmp_path)
    reloaded = PretrainedPolicy(str(tmp_path)).build()
    image = probe_image().resize((400, 300))  # 120k pixels: above every bound here, resized down
    trained, seen = policy.process_image(image, tool=True), reloaded.process_image(image, tool=True)
    assert seen.grid_thw == trained.grid_thw and torch.equal(seen.pixel_values, trained.pixel_values)
    assert reloaded.process_image(image).grid_thw == policy.process_image(image).grid_thw


def test_explicit_tool_image_bounds_win_over_the_saved_ones(tiny_policy, tmp_path):
    save_policy(tiny_policy, tmp_path)  # tool images as its question images: 56x56 .. 112x112
    assert tool_bounds_of(tmp_path) == {"min_pixels": 56 * 56, "max_pixels": 112 * 112}
    assert tool_bounds_of(tmp_path, tool_image_max_pixels=224 * 224) == {"min_pixels": 56 * 56, "max_pixels": 224 * 224}
    assert tool_bounds_of(tmp_path, tool_image_min_pixels=28 * 28) == {"min_pixels": 28 * 28, "max_pixels": 112 * 112}
    assert tool_bounds_of(tmp_path, tool_image_min_pixels=None, tool_image_max_pixels=None) == {}  # the question's


def test_a_directory_saved_without_the_tool_image_record_takes_the_defaults(tiny_policy, tmp_path):
    """Directories saved before ``save_policy`` wrote ``mmsr_policy.json`` (and hub checkpoints) load as before."""
    save_policy(tiny_policy, tmp_path)
    (tmp_path / POLICY_RECORD).unlink()
    assert tool_bounds_of(tmp_path) == {"min_pixels": 56 * 56, "max_pixels": 224 * 224}


def test_a_text_only_policy_saves_no_tool_image_record(tmp_path):
    policy = TinyQwen2(tokenizer_texts=[str(FVQA / "fvqa_dev.jsonl")], scaffold=Scaffold(), hidden_size=64, num_heads=2).build()
    save_policy(policy, tmp_path)
    assert not (tmp_path / POLICY_RECORD).exists()


def test_a_processor_saved_by_transformers_5_keeps_the_checkpoints_image_settings(vl_policy, tmp_path):
    """transformers 5's ``processor.save_pretrained`` writes the image processor under ``image_processor`` in
    ``processor_config.json`` and no ``preprocessor_config.json``: a Qwen3-VL was refused (14-pixel patches from the
    defaults), a Qwen2.5-VL took the default pixel bounds (3136 .. 12,845,056) silently."""
    import json

    from mmsr.rollout.vllm_inputs import pixel_bounds

    save_policy(vl_policy, tmp_path)
    cfg = json.loads((tmp_path / "preprocessor_config.json").read_text())
    (tmp_path / "processor_config.json").write_text(json.dumps({"image_processor": cfg, "processor_class": "AnyProcessor"}))
    (tmp_path / "preprocessor_config.json").unlink()
    loaded = PretrainedPolicy(str(tmp_path)).build()
    assert loaded.image_processor.patch_size == vl_policy.image_processor.patch_size
    assert pixel_bounds(loaded.image_processor) == pixel_bounds(vl_policy.image_processor)
    image = Image.new("RGB", (640, 480), "gray")
    assert loaded.process_image(image).grid_thw == vl_policy.process_image(image).grid_thw


def test_a_chat_template_kept_in_chat_template_json_is_the_policys(tiny_qwen3_vl, tmp_path):
    """Processors saved by transformers 4.43 to 4.5x hold the template in ``chat_template.json`` alone: Qwen3-VL
    (no default system message) got Qwen2.5-VL's system message, silently. With no template anywhere, the default
    ChatML is kept, with a warning."""
    import json

    from mmsr.models.tokenizer import QWEN3_VL_CHAT_TEMPLATE
    from mmsr.prompt.render import ChatFormat

    save_policy(tiny_qwen3_vl, tmp_path)
    assert tiny_qwen3_vl.chat.system is None
    (tmp_path / "chat_template.jinja").unlink()  # where transformers 5 (save_policy) writes it; the tokenizer reads it
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": QWEN3_VL_CHAT_TEMPLATE}))
    assert PretrainedPolicy(str(tmp_path)).build().chat == tiny_qwen3_vl.chat
    (tmp_path / "chat_template.json").unlink()
    with pytest.warns(UserWarning, match="no chat template"):
        assert PretrainedPolicy(str(tmp_path)).build().chat == ChatFormat()


def test_inverted_pixel_bounds_are_refused_before_the_weights_load(tiny_policy, tmp_path):
    """A tool bound left ``None`` is the question images': min 262,144 over a tool max of 65,536 made a tool
    processor that resized a 200x150 thumbnail to 352 tokens, silently; an ``auto`` bound (the saved one, 112*112
    here) was resolved only after the weights had loaded. Each is refused when the builder is made, naming the fields."""
    save_policy(tiny_policy, tmp_path)
    path = str(tmp_path)
    with pytest.raises(ValueError, match="tool_image_min_pixels resolves to 262144 > tool_image_max_pixels 65536"):
        PretrainedPolicy(path, min_pixels=262144, max_pixels=903168, tool_image_min_pixels=None, tool_image_max_pixels=65536)
    with pytest.raises(ValueError, match="tool_image_min_pixels resolves to 100000 > tool_image_max_pixels 12544"):
        PretrainedPolicy(path, tool_image_min_pixels=100000)
    with pytest.raises(ValueError, match=r"\bmin_pixels resolves to 20000 > max_pixels 12544"):
        PretrainedPolicy(path, min_pixels=20000)  # over the checkpoint's max_pixels
    with pytest.raises(ValueError, match="TinyQwen2_5_VL: tool_image_min_pixels resolves to 3136 > tool_image_max_pixels 1000"):
        TinyQwen2_5_VL(tool_image_max_pixels=1000)
    assert PretrainedPolicy("acme/not-downloaded").tools is None  # a hub id: resolved when it builds (mmsr plan stays offline)


def test_default_tool_image_bounds_are_4_to_64_tokens_for_either_patch_size(vl_policy, tmp_path):
    """The defaults were 56*56 .. 224*224 pixels whatever the patches: 4 to 64 tokens with Qwen2.5-VL's 14-pixel
    patches, but at most 49 with Qwen3-VL's 16-pixel ones (README: 256x256 and 64 tokens for Qwen3-VL)."""
    save_policy(vl_policy, tmp_path)
    from mmsr.rollout.vllm_inputs import pixel_bounds

    (tmp_path / POLICY_RECORD).unlink()  # as a hub checkpoint
    side = {14: 56, 16: 64}[vl_policy.image_processor.patch_size]  # 2x2 merged patches
    policy = PretrainedPolicy(str(tmp_path)).build()
    assert pixel_bounds(policy.tool_image_processor) == {"min_pixels": side * side, "max_pixels": 16 * side * side}
    tokens = [policy.process_image(Image.new("RGB", size), tool=True).num_tokens for size in [(1024, 1024), (20, 20)]]
    assert tokens == [64, 4]


@pytest.mark.parametrize(("dtype", "expected"), [("float32", "sdpa"), ("bfloat16", "flash_attention_2"),
                                                 ("float16", "flash_attention_2")])  # fmt: skip
def test_auto_attention_takes_flash_attention_only_in_half_precision(monkeypatch, dtype, expected):
    """flash-attn kernels take fp16/bf16 only: fp32 weights without autocast (``mmsr eval --model-dir``) got
    flash_attention_2 whenever CUDA and flash-attn were there."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "flash_attn" else find_spec(name, *a))
    assert PretrainedPolicy("acme/model", dtype=dtype).attention() == expected


@pytest.mark.parametrize("head_dim, sections", [(128, [16, 24, 24]), (16, [2, 3, 3])])
def test_mrope_splits_half_the_rotary_dims_a_quarter_to_time_as_qwen2_5_vl_does(head_dim, sections):
    """Qwen2.5-VL-7B (head_dim 128) ships ``mrope_section`` [16, 24, 24]: half the dims (64), a quarter (16) to
    time, the rest split evenly over height and width. The tiny models' 16 give 8: 2 to time, 3 and 3."""
    assert mrope_sections(head_dim) == sections and sum(sections) == head_dim // 2
