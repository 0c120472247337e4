"""The crop tool: a box in the pixels of the image as the policy sees it comes back as a new image in
context; a bad box is a failure observation. Scripted episodes check the image tokens and the loss mask."""

import asyncio
from dataclasses import replace

import pytest
import torch
from PIL import Image

from mmsr.prompt.render import PromptBuilder
from mmsr.rollout.actions import ToolUse
from mmsr.rollout.engine import SamplingParams, ScriptedEngine
from mmsr.rollout.hf_engine import HFEngine
from mmsr.rollout.loop import RolloutLoop, RolloutSettings
from mmsr.tools.base import IMAGE_MARKER, FatalToolError, ToolRequest, ToolResult
from mmsr.tools.cache import ReplayMiss
from mmsr.tools.crop import Crop, CropSearch
from mmsr.tools.fvqa_cache import FVQACacheError
from mmsr.tools.local import LocalImageSearch
from mmsr.tools.server import RemoteFatalError, ServerRefused
from mmsr.tools.spec import configured
from mmsr.tools.web.http import ProviderRefused
from mmsr.train.update import PolicyUpdate, UpdateSettings
from tests.conftest import FVQA

R = "<reason>zoom</reason>"
ANS = f"{R}<answer>a sign</answer>"


def episode(policy, sample, script, limit=None):
    loop = RolloutLoop(ScriptedEngine({f"{sample.id}#0": script}, policy.tokenizer), policy,
                       PromptBuilder(round1="round1_crop.txt"), configured([Crop(limit)]), RolloutSettings(max_rounds=4))  # fmt: skip
    (traj,) = loop.run([sample], 1, SamplingParams())
    return traj


def seen_size(policy, image):
    """(width, height) of ``image`` as the policy sees it: its patch grid times the patch size."""
    _, h, w = policy.process_image(image).grid_thw
    return w * policy.image_processor.patch_size, h * policy.image_processor.patch_size


def test_a_crop_is_a_new_image_with_its_tokens_masked_out(tiny_policy, fvqa_samples):
    sample = fvqa_samples[0]
    w, h = seen_size(tiny_policy, sample.image)
    turn = f"{R}<crop>[0, 0, {w // 2}, {h // 2}]</crop>"
    traj = episode(tiny_policy, sample, [turn, ANS])
    assert traj.turns[0].action == ToolUse("crop", f"[0, 0, {w // 2}, {h // 2}]") and traj.finish_reason == "answer"
    # The region is the top-left quarter of the ORIGINAL image (the box was in the policy's pixels).
    region = traj.vision[1].image
    assert region.size == (round(w // 2 * sample.image.width / w), round(h // 2 * sample.image.height / h))
    assert list(region.getdata()) == list(sample.image.convert("RGB").crop((0, 0, *region.size)).getdata())
    # Image tokens: the question image's and the crop's, each expanded to its own count, all mask 0.
    image_id = tiny_policy.model.config.image_token_id
    assert len(traj.vision) == 2 and traj.input_ids.count(image_id) == sum(v.num_tokens for v in traj.vision)
    # The loss mask is exactly 1 on the two sampled turns and 0 everywhere else.
    expected = [0] * len(traj)
    for t in traj.turns:
        expected[t.span[0] : t.span[1]] = [1] * (t.span[1] - t.span[0])
    assert traj.loss_mask == expected
    for t, text in zip(traj.turns, [turn, ANS]):
        assert traj.input_ids[t.span[0] : t.span[1]] == tiny_policy.tokenizer.encode(text, add_special_tokens=False)
    between = tiny_policy.tokenizer.decode(traj.input_ids[traj.turns[0].span[1] : traj.turns[1].span[0]])
    assert f"[Crop Results] region [0, 0, {w // 2}, {h // 2}]:" in between and "cropped region" in between


def test_a_bad_box_is_a_failure_observation_without_an_image(tiny_policy, fvqa_samples):
    sample = fvqa_samples[0]
    w, h = seen_size(tiny_policy, sample.image)
    traj = episode(tiny_policy, sample, [f"{R}<crop>[0, 0, {w + 1}, 10]</crop>", ANS])
    result = traj.turns[0].tool_call.result
    assert not result.ok and f"is not inside the {w}x{h} image" in result.text
    assert len(traj.vision) == 1 and traj.finish_reason == "answer"


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        ("top left", r"is not \[x1, y1, x2, y2\]"),
        ("[10, 10, 5, 20]", "is not inside the 200x100 image"),
        ("[-1, 0, 50, 50]", "is not inside"),
        ("[0, 0, 10, 50]", "smaller than 14 pixels"),
    ],
)
def test_box_validation(query, reason):
    with pytest.raises(ValueError, match=reason):
        Crop().box(query, (200, 100))


def test_the_box_is_read_in_the_policys_pixels():
    """A 400x200 image the policy sees at 200x100: the box scales by 2 into the image's own pixels."""
    image = Image.new("RGB", (400, 200), "white")
    image.paste((255, 0, 0), (100, 50, 300, 150))
    request = ToolRequest("crop", "50, 25, 150, 75", image, image_size=(200, 100))
    result = asyncio.run(Crop()(request))
    (region,) = result.images
    assert result.ok and region.size == (200, 100) and region.getcolors() == [(200 * 100, (255, 0, 0))]
    assert not asyncio.run(Crop()(ToolRequest("crop", "0, 0, 50, 50"))).ok  # no image: a failure, not a crash


def test_relative_1000_boxes_address_the_image_whatever_its_size():
    """Qwen3-VL grounds in 0..1000 on each axis: [500, 500, 1000, 1000] is the bottom-right quarter of a 640x480
    image (320x240 pixels), which in pixels is off the image."""
    image = Image.new("RGB", (640, 480), "white")
    image.paste((255, 0, 0), (320, 240, 640, 480))
    request = ToolRequest("crop", "[500, 500, 1000, 1000]", image, image_size=(640, 480))
    (region,) = asyncio.run(Crop(box_units="relative_1000")(request)).images
    assert region.size == (320, 240) and region.getcolors() == [(320 * 240, (255, 0, 0))]
    whole = asyncio.run(Crop(box_units="relative_1000")(replace(request, query="[0, 0, 1000, 1000]")))
    assert whole.images[0].size == (640, 480)
    assert "is not inside the 640x480 image" in asyncio.run(Crop()(request)).text  # pixels, the default
    relative = Crop(box_units="relative_1000")
    with pytest.raises(ValueError, match=r"not inside 0\.\.1000 \(coordinates relative to the image\)"):
        relative.box("[0, 0, 1001, 500]", (640, 480))
    # min_size is in the pixels the policy sees: 20/1000 of 640 is 12.8 < 14, 25/1000 of 640 is 16
    with pytest.raises(ValueError, match="smaller than 14 pixels on a side of the 640x480 image"):
        relative.box("[0, 0, 20, 500]", (640, 480))
    assert relative.box("[0, 0, 25, 500]", (640, 480)) == (0, 0, 25, 500)
    with pytest.raises(ValueError, match="box_units must be 'pixels' or 'relative_1000', got 'relative'"):
        Crop(box_units="relative")


def test_relative_boxes_are_described_as_such_and_crop_search_reads_them_too():
    described = {n: PromptBuilder().for_tools((Crop(box_units=n).spec, CropSearch(None, box_units=n).spec)).round1
                 for n in ("pixels", "relative_1000")}  # fmt: skip
    assert described["pixels"].count("a box in pixels of the image as you see it") == 2 and "1000" not in described["pixels"]
    assert described["relative_1000"].count("0 to 1000 on each axis") == 2 and "in pixels" not in described["relative_1000"]
    backend = Recording()
    image = Image.new("RGB", (400, 200))
    request = ToolRequest("crop_search", "[0, 0, 500, 1000]", image, image_size=(200, 100))
    assert asyncio.run(CropSearch(backend, box_units="relative_1000")(request)).ok
    assert backend.requests[0].image.size == (200, 200)


def test_a_crop_is_seen_within_the_question_images_bounds_and_search_thumbnails_within_the_tools(tiny_policy, fvqa_samples):
    """With thumbnail bounds of 1 to 2 merged patches, a crop was shown as a 2-token thumbnail: less detail than
    the question image had in the same region. Its region is now processed as a question image is."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from mmsr.tools.spec import ImageSearchTool
    from tests.rollout.test_loop import FakeImageSearch

    thumbnails = Qwen2VLImageProcessorPil(patch_size=14, merge_size=2, temporal_patch_size=2, min_pixels=28 * 28,
                                          max_pixels=2 * 28 * 28)  # fmt: skip
    policy = replace(tiny_policy, tool_image_processor=thumbnails)
    sample = fvqa_samples[0]
    w, h = seen_size(policy, sample.image)
    script = [f"{R}<crop>[0, 0, {w // 2}, {h // 2}]</crop>", f"{R}<search><img></search>", ANS]
    loop = RolloutLoop(ScriptedEngine({f"{sample.id}#0": script}, policy.tokenizer), policy, PromptBuilder(),
                       configured([Crop(), ImageSearchTool(FakeImageSearch())]), RolloutSettings(max_rounds=3))  # fmt: skip
    (traj,) = loop.run([sample], 1, SamplingParams())
    assert traj.finish_reason == "answer" and not traj.context and len(traj.vision) == 1 + 1 + 2
    crop, thumbs = traj.vision[1], traj.vision[2:]
    assert crop.grid_thw == policy.process_image(crop.image).grid_thw != policy.process_image(crop.image, tool=True).grid_thw
    assert crop.num_tokens > 2 and all(t.num_tokens <= 2 for t in thumbs)
    assert [t.grid_thw for t in thumbs] == [policy.process_image(t.image, tool=True).grid_thw for t in thumbs]
    # The context holds (and counted against max_context_tokens) each image's own tokens.
    assert traj.input_ids.count(policy.model.config.image_token_id) == sum(v.num_tokens for v in traj.vision)


class Recording:
    """An image search that records its requests; ``fatal``: it raises that, e.g. ``ReplayMiss`` as a replay
    of another region does."""

    def __init__(self, fatal: type[FatalToolError] | None = None):
        self.fatal, self.requests = fatal, []

    async def __call__(self, request: ToolRequest):
        self.requests.append(request)
        if self.fatal is not None:
            raise self.fatal("replay has no recorded image_search")
        return ToolResult(f"[Image Search Results] 1. {IMAGE_MARKER} a sign", (Image.new("RGB", (28, 28)),))


def test_crop_search_searches_the_region_and_nothing_keyed_on_the_row():
    image = Image.new("RGB", (400, 200), "white")
    backend = Recording()
    request = ToolRequest("crop_search", "[50, 25, 150, 75]", image, "https://x/1.jpg", "row1", "q", 30.0, (200, 100))
    result = asyncio.run(CropSearch(backend)(request))
    (sent,) = backend.requests
    assert result.ok and result.text.startswith("[Image Search Results]") and len(result.images) == 1
    assert sent.kind == "image_search" and sent.image.size == (200, 100) and sent.budget_s == 30.0
    assert (sent.sample_id, sent.image_url, sent.query) == ("", None, "")
    missed = asyncio.run(CropSearch(Recording(fatal=ReplayMiss))(request))
    assert not missed.ok and "no results for this region (replay has no recorded image_search)" in missed.text
    assert not asyncio.run(CropSearch(backend)(replace(request, query="[0, 0, 300, 10]"))).ok and len(backend.requests) == 1


@pytest.mark.parametrize("fatal", [FatalToolError, FVQACacheError, RemoteFatalError, ServerRefused, ProviderRefused])
def test_crop_search_lets_its_backends_configuration_errors_through(fatal):
    request = ToolRequest("crop_search", "[50, 25, 150, 75]", Image.new("RGB", (400, 200)))
    with pytest.raises(fatal, match="replay has no recorded image_search"):
        asyncio.run(CropSearch(Recording(fatal=fatal))(request))
    bad_box = asyncio.run(CropSearch(Recording(fatal=fatal))(replace(request, query="[0, 0, 500, 10]")))
    assert not bad_box.ok and "is not inside the 400x200 image" in bad_box.text  # its own failure: an observation


def test_crop_search_of_the_whole_image_finds_what_image_search_finds(tiny_policy, fvqa_samples):
    """With the offline pHash index: the whole image as a crop is the question image, so the same top hit."""
    sample = fvqa_samples[0]
    local = LocalImageSearch(index=str(FVQA / "search" / "image_index.jsonl"), top_k=1)
    w, h = seen_size(tiny_policy, sample.image)
    loop = RolloutLoop(ScriptedEngine({f"{sample.id}#0": [f"{R}<crop_search>[0, 0, {w}, {h}]</crop_search>", ANS]},
                                      tiny_policy.tokenizer), tiny_policy, PromptBuilder(),
                       configured([CropSearch(local)]), RolloutSettings())  # fmt: skip
    (traj,) = loop.run([sample], 1, SamplingParams())
    direct = asyncio.run(local(ToolRequest("image_search", image=sample.image, sample_id=sample.id)))
    call = traj.turns[0].tool_call
    assert call.kind == "crop_search" and call.result.ok and call.result.titles == direct.titles
    assert len(traj.vision) == 1 + len(direct.images) and traj.finish_reason == "answer"


class CropThenSample:
    """Turn 0 is a scripted crop; every later turn is the HF engine's own sample, in the context that now
    holds the cropped image."""

    def __init__(self, policy, key: str, crop_turn: str):
        self.scripted, self.hf = ScriptedEngine({key: [crop_turn]}, policy.tokenizer), HFEngine(seed=0)
        self.hf.bind(policy)

    def generate(self, requests, sampling):
        return (self.scripted if requests[0].turn == 0 else self.hf).generate(requests, sampling)


def test_engine_and_trainer_log_probs_agree_with_the_crop_in_context(tiny_policy, fvqa_samples):
    sample = fvqa_samples[0]
    w, h = seen_size(tiny_policy, sample.image)
    engine = CropThenSample(tiny_policy, f"{sample.id}#0", f"{R}<crop>[{w // 4}, 0, {w}, {h // 2}]</crop>")
    loop = RolloutLoop(engine, tiny_policy, PromptBuilder(round1="round1_crop.txt"), configured([Crop()]),
                       RolloutSettings(max_rounds=2, max_tokens_per_turn=48, max_context_tokens=8192))  # fmt: skip
    (traj,) = loop.run([sample], 1, SamplingParams(max_tokens=48))
    assert len(traj.vision) == 2 and traj.turns[0].tool_call.result.ok and len(traj.turns) == 2
    start, end = traj.turns[1].span
    (trainer,) = PolicyUpdate(tiny_policy, UpdateSettings()).score([traj], tiny_policy.model, torch.device("cpu"))
    engine_lp = torch.tensor(traj.logprobs[start:end])
    assert end > start and (trainer[start - 1 : end - 1] - engine_lp).abs().max() < 1e-4
    # The crop's pixels matter: the mirrored region (same size, same tokens) scores the turn differently.
    mirrored = tiny_policy.process_image(traj.vision[1].image.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    traj.vision[1] = mirrored
    (other,) = PolicyUpdate(tiny_policy, UpdateSettings()).score([traj], tiny_policy.model, torch.device("cpu"))
    assert (other[start - 1 : end - 1] - engine_lp).abs().max() > 1e-3


def test_crop_and_crop_search_count_their_calls_and_log_their_backends_searches_under_crop_search(tmp_path):
    # A crop, a bad box and a box of a question without image; then crop search through a cache: the same region
    # twice (a miss, then a hit), a bad box and a region the replay never recorded. The crop tools reported
    # nothing of their own, and a cache behind crop search (asked "image_search") had its counters dropped once an
    # image_search entry was registered beside it, else logged as tools/crop_search/image_search/cache_hits.
    from mmsr.metrics import tool_counters
    from mmsr.tools.cache import CachedTool
    from mmsr.tools.spec import ImageSearchTool

    image = Image.new("RGB", (400, 200), "white")
    crop = Crop()
    for box, picture in (("[50, 25, 150, 75]", image), ("[0, 0, 500, 10]", image), ("[0, 0, 50, 50]", None)):
        asyncio.run(crop(ToolRequest("crop", box, picture)))
    assert crop.metrics() == {"tools/crop/bad_box": 1.0, "tools/crop/cropped": 1.0, "tools/crop/no_image": 1.0}
    search = CropSearch(CachedTool(Recording(), str(tmp_path / "c.sqlite"), provider="rec"))
    for box in ("[50, 25, 150, 75]", "[50, 25, 150, 75]", "[0, 0, 500, 10]"):
        assert asyncio.run(search(ToolRequest("crop_search", box, image))).ok == (box != "[0, 0, 500, 10]")
    unrecorded = CropSearch(Recording(fatal=ReplayMiss))
    assert not asyncio.run(unrecorded(ToolRequest("crop_search", "[50, 25, 150, 75]", image))).ok
    image_search = ImageSearchTool(CachedTool(Recording(), str(tmp_path / "i.sqlite"), provider="rec"))
    logged = tool_counters({"image_search": image_search, "crop": crop, "crop_search": search})
    mine = {k.removeprefix("tools/crop_search/"): v for k, v in logged.items() if k.startswith("tools/crop_search/")}
    assert mine == {"bad_box": 1.0, "searched": 2.0, "cache_misses": 1.0, "cache_hits": 1.0, "api_calls": 1.0,
                    "api_cost": 0.0, "run_api_calls": 1.0, "run_api_cost": 0.0}  # fmt: skip
    assert logged["tools/image_search/api_calls"] == 0.0 and logged["tools/crop/cropped"] == 1.0
    assert unrecorded.metrics() == {"tools/crop_search/searched": 1.0, "tools/crop_search/unrecorded_region": 1.0}


def test_crop_takes_format_max_and_by_default_accepts_the_crops_its_limit_allows(tmp_path):
    """README says every tool entry takes ``format_max:``; Crop and CropSearch took none, and Crop's spec allowed 2
    crops an episode but 1 in a well-formed trajectory: a policy using both got format reward 0."""
    import yaml

    from mmsr.eval.load import load_tools
    from mmsr.reward.format import format_ok

    def ok(spec, crops: int) -> bool:
        return format_ok([f"{R}<crop>[0, 0, 50, 50]</crop>"] * crops + [ANS], (spec,))

    assert ok(Crop().spec, 2) and not ok(Crop().spec, 3)
    assert ok(Crop(limit=1).spec, 1) and not ok(Crop(limit=1).spec, 2)  # format_max follows a given limit
    assert (Crop(limit=1, format_max=2).spec.format_max, CropSearch(None, limit=2).spec.format_max) == (2, 2)
    path = tmp_path / "tools.yaml"
    entry = {"class_path": "mmsr.tools.crop.Crop", "init_args": {"limit": 3, "format_max": 3}}
    path.write_text(yaml.safe_dump({"tools": [entry]}))
    for crop in (Crop(limit=3, format_max=3), load_tools(path)["crop"]):
        assert crop.spec.limit == 3 and ok(crop.spec, 3) and not ok(crop.spec, 4)
    # the override survives the replaces of penalized and box_units, and CropSearch passes it on
    assert Crop(format_max=4, penalized=False, box_units="relative_1000").spec.format_max == 4
    assert CropSearch(None, format_max=3, box_units="relative_1000").spec.format_max == 3
