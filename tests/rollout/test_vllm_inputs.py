"""vLLM's raw prompt (one pad per image) against the training sequence (expanded pads), CPU only.

Regression for MMSearch-R1 issue #20, "Image features and image tokens do not match" with several
searched images: the inputs built for vLLM and for training must describe the same images.
"""

import gc

import pytest
import torch
from PIL import Image

from mmsr.models.policy import check_image_tokens
from mmsr.models.vision import VisionInput
from mmsr.rollout.engine import SamplingParams
from mmsr.rollout.loop import RolloutSettings
from mmsr.rollout.vllm_inputs import (
    GridImages,
    ImageTokenIds,
    ImageTokenMismatch,
    collapse_image_tokens,
    engine_input,
    expand_image_tokens,
    image_runs,
    pixel_bounds,
)
from mmsr.train.batch import collate
from tests.rollout.test_loop import ANS, IMG, TXT, make_loop


@pytest.fixture(scope="module")
def searched(tiny_policy, fvqa_samples):
    """Two episodes with two image searches each: question image + 2 x 2 thumbnails = 5 images."""
    settings = RolloutSettings(max_rounds=4, image_search_limit=2)
    loop, _ = make_loop(tiny_policy, lambda r: [IMG, TXT, IMG, ANS][r.turn], settings)
    return loop.run(fvqa_samples[:2], 1, SamplingParams())


def test_raw_ids_hold_one_pad_per_image_in_context_order(tiny_policy, searched):
    ids = ImageTokenIds.from_tokenizer(tiny_policy.tokenizer)
    for traj in searched:
        assert len(traj.vision) == 5 and traj.finish_reason == "answer"
        inp = engine_input(traj.input_ids, traj.vision, ids)
        assert inp.prompt_token_ids.count(ids.pad) == 5
        assert len(inp.prompt_token_ids) == len(traj) - sum(v.num_tokens for v in traj.vision) + 5
        # Text between images is untouched: removing all pads leaves the same token sequence.
        assert [t for t in inp.prompt_token_ids if t != ids.pad] == [t for t in traj.input_ids if t != ids.pad]
        # vLLM's expansion of the raw prompt gives back exactly the sequence the trainer runs.
        assert expand_image_tokens(inp.prompt_token_ids, inp.num_image_tokens, ids.pad) == traj.input_ids
        prompt = inp.prompt({"min_pixels": 1, "max_pixels": 2})
        assert len(prompt["multi_modal_data"]["image"]) == 5 and prompt["mm_processor_kwargs"]["max_pixels"] == 2


def test_images_given_to_vllm_process_to_the_training_grid(tiny_policy, searched):
    """The processor run on vLLM's images (as vLLM runs it) yields the trainer's grids and pixels."""
    ids = ImageTokenIds.from_tokenizer(tiny_policy.tokenizer)
    traj = searched[0]
    inp = engine_input(traj.input_ids, traj.vision, ids, patch_size=tiny_policy.image_processor.patch_size)
    sizes = {im.size for im in inp.images}
    assert len(sizes) > 1  # question image and thumbnails of different shapes
    for image, v in zip(inp.images, traj.vision):
        again = tiny_policy.process_image(image)
        assert again.grid_thw == v.grid_thw and again.num_tokens == v.num_tokens
        assert torch.equal(again.pixel_values, v.pixel_values)  # same resize, so identical pixels
    # vLLM's processor is also told the policy's resize bounds (transformers 5 keeps them in `size`).
    assert pixel_bounds(tiny_policy.image_processor) == {"min_pixels": 56 * 56, "max_pixels": 112 * 112}
    assert pixel_bounds(None) == {}
    # The training batch built from the same trajectories passes its own image-token check.
    batch = collate(searched, range(len(searched)), tiny_policy, torch.device("cpu"))
    assert len(batch.vision) == 10


def test_each_image_is_resized_once_while_it_lives(tiny_policy, searched, monkeypatch):
    """A group's requests, every turn, share their images' resized copies; a freed image's entry goes."""
    ids, patch = ImageTokenIds.from_tokenizer(tiny_policy.tokenizer), tiny_policy.image_processor.patch_size
    resized = []
    real_resize = Image.Image.resize
    monkeypatch.setattr(Image.Image, "resize", lambda im, *a, **k: resized.append(im.size) or real_resize(im, *a, **k))
    traj = searched[0]
    fresh = [engine_input(traj.input_ids, traj.vision, ids, patch) for _ in range(3)]
    per_call = len(resized) // 3
    assert per_call > 0  # the question image is not already on its grid
    grids = GridImages(patch)
    shared = [engine_input(traj.input_ids, traj.vision, ids, grids=grids) for _ in range(3)]
    assert len(resized) == 3 * per_call + per_call and len(grids) == 5
    for a, b in zip(fresh[0].images, shared[2].images):  # the same pictures as resizing every time
        assert a.size == b.size and a.tobytes() == b.tobytes()
    assert all(x is y for x, y in zip(shared[0].images, shared[2].images))
    copy = VisionInput(*(getattr(traj.vision[0], f) for f in ("image", "pixel_values", "grid_thw", "num_tokens")))
    grids(copy)
    assert len(grids) == 6  # keyed by the object: a copy is resized on its own (the loop shares objects)
    del copy
    gc.collect()
    assert len(grids) == 5


def test_upstream_issue_20_shapes_fail_loudly(tiny_policy, searched):
    """Each way the two views can drift apart is caught before anything reaches vLLM."""
    ids = ImageTokenIds.from_tokenizer(tiny_policy.tokenizer)
    traj = searched[0]
    good = list(traj.input_ids)
    (s0, e0), (s1, _) = image_runs(good, ids.pad)[:2]
    cases = {
        "a thumbnail dropped from the image list": (good, traj.vision[:-1], "5 <|image_pad|> runs but 4 images"),
        "images out of order": (good, [traj.vision[1], traj.vision[0], *traj.vision[2:]], "needs"),
        "one pad missing in a run": (good[:s1] + good[s1 + 1 :], traj.vision, "needs"),
        "a pad sampled by the model": (good + [ids.pad], traj.vision, "6 <|image_pad|> runs"),
        "context cut inside an image": (good[: (s0 + e0) // 2], traj.vision[:1], "not framed"),
    }
    assert traj.vision[0].num_tokens != traj.vision[1].num_tokens  # so reordering changes counts
    for input_ids, vision, words in cases.values():
        with pytest.raises(ImageTokenMismatch, match=words.replace("|", r"\|")):
            engine_input(input_ids, vision, ids)
    with pytest.raises(ValueError):  # the training side refuses the dropped thumbnail too
        check_image_tokens(good, traj.vision[:-1], tiny_policy.model.config.image_token_id)


def test_collapse_and_expand_by_hand():
    ids = ImageTokenIds(pad=9, start=7, end=8)
    img = lambda n: type("V", (), {"num_tokens": n, "grid_thw": (1, 2, n * 2)})()
    expanded = [1, 7, 9, 9, 9, 8, 2, 7, 9, 8, 3]
    assert collapse_image_tokens(expanded, [img(3), img(1)], ids) == [1, 7, 9, 8, 2, 7, 9, 8, 3]
    assert expand_image_tokens([1, 7, 9, 8, 2, 7, 9, 8, 3], [3, 1], 9) == expanded
    with pytest.raises(ImageTokenMismatch, match="image 1 .* needs 2"):
        collapse_image_tokens(expanded, [img(3), img(2)], ids)


def test_text_only_policy_passes_ids_and_refuses_images():
    assert engine_input([1, 2, 3], [], None).prompt() == {"prompt_token_ids": [1, 2, 3]}
    fake = type("V", (), {"image": Image.new("RGB", (4, 4))})()
    with pytest.raises(ImageTokenMismatch, match="text-only"):
        engine_input([1, 2], [fake], None)


def test_a_submit_that_fails_part_way_leaves_nothing_in_flight():
    """vLLM's add_request rejects a prompt over max_model_len inside the call: the requests of that submit
    already added were left queued and in flight, with tickets the caller never got (it could not cancel
    them), and every later generate, score or sync refused to run."""
    from types import SimpleNamespace

    from mmsr.rollout.engine import GenerationRequest, SamplingParams
    from mmsr.rollout.vllm_engine import VLLMEngine
    from mmsr.rollout.vllm_inputs import GridImages

    class Scheduler:  # vLLM's LLMEngine, as far as submit and cancel use it
        def __init__(self):
            self.queued = []

        def add_request(self, rid, prompt, params):
            if len(prompt["prompt_token_ids"]) > 8:
                raise ValueError("The decoder prompt is longer than the maximum model length of 8.")
            self.queued.append(rid)

        def abort_request(self, ids):
            self.queued = [r for r in self.queued if r not in ids]

    engine = VLLMEngine()
    engine.llm = SimpleNamespace(llm_engine=Scheduler())
    engine.image_ids, engine.grid_images, engine.mm_kwargs, engine.stop_ids, engine.logit_bias = None, GridImages(), {}, [1], {}
    with pytest.raises(ValueError, match="longer than the maximum model length"):
        engine.submit([GenerationRequest((1, 2, 3), key="a"), GenerationRequest(tuple(range(20)), key="b")], SamplingParams())
    assert engine.in_flight == set() and engine.llm.llm_engine.queued == []
    assert engine.submit([GenerationRequest((1, 2), key="c")], SamplingParams()) == ["mmsr-2"]


def test_a_prompts_bounds_cover_an_image_whose_training_grid_lies_outside_the_policys(tiny_policy):
    """``smart_resize`` keeps each side at least one merged patch: a 1000x10 banner trains as 28x560 pixels
    (a 2x40 grid), above the policy's max_pixels 112*112; re-processed within those bounds (what vLLM did) it
    became 2x34, three image tokens short. Within the prompt's covering bounds the grid image stays as it is."""
    from transformers import Qwen2VLImageProcessorPil

    from mmsr.models.vision import covering_bounds
    from mmsr.rollout.vllm_inputs import grid_image

    v = tiny_policy.process_image(Image.new("RGB", (1000, 10), "gray"))
    bounds = pixel_bounds(tiny_policy.image_processor)
    assert v.grid_thw == (1, 2, 40) and bounds == {"min_pixels": 56 * 56, "max_pixels": 112 * 112}

    def grid_in_vllm(kwargs):
        processor = Qwen2VLImageProcessorPil(patch_size=14, merge_size=2, temporal_patch_size=2, **kwargs)
        return tuple(processor(images=[grid_image(v, 14)], return_tensors="pt")["image_grid_thw"][0].tolist())

    assert grid_in_vllm(bounds) == (1, 2, 34)  # the policy's bounds alone
    covering = covering_bounds(bounds, [v], 14)
    assert covering == {"min_pixels": 56 * 56, "max_pixels": 28 * 560} and grid_in_vllm(covering) == (1, 2, 40)
    assert covering_bounds(bounds, [], 14) == bounds  # a text-only prompt
