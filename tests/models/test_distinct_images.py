"""The vision tower encodes each distinct image of a forward once: a GRPO group's copies of its question
image (and a search index's repeated thumbnails) reuse one encoding, with the log-probs, entropies and
gradients of encoding every copy."""

import torch
from PIL import Image

import mmsr.models.policy
from mmsr.models.vision import VisionInput, distinct_images
from tests.models.conftest import tiny_qwen3_vl, vl_policy  # noqa: F401 - fixtures: each vision-language family
from tests.train.test_prefix import group_batch, scores


def _input(pixels: torch.Tensor, grid=(1, 2, 2)) -> VisionInput:
    return VisionInput(Image.new("RGB", (28, 28)), pixels, grid, 1)


def test_images_are_one_when_grid_and_pixels_are():
    a = torch.arange(4 * 6, dtype=torch.float32).reshape(4, 6)
    red, copy, other, regrid = _input(a), _input(a.clone()), _input(a + 1e-6 * (torch.arange(24).reshape(4, 6) == 5)), _input(a, (1, 1, 4))
    distinct, which = distinct_images([red, other, copy, red, regrid])
    assert distinct == [red, other, regrid] and distinct[0] is red and which == [0, 1, 0, 0, 2]
    assert distinct_images([]) == ([], [])


def counting_tower(policy, monkeypatch) -> list[int]:
    """Patch rows the vision tower encodes, one entry per call."""
    rows, visual = [], policy.model.model.visual
    forward = visual.forward
    monkeypatch.setattr(visual, "forward", lambda pixels, *a, **k: rows.append(pixels.shape[0]) or forward(pixels, *a, **k))
    return rows


def test_a_group_image_is_encoded_once_with_the_same_scores_and_gradients(vl_policy, fvqa_samples, monkeypatch):
    batch = group_batch(vl_policy, fvqa_samples)  # 2 groups of 3 episodes, 2 lone ones; thumbnails in some
    every = sum(v.pixel_values.shape[0] for v in batch.vision)
    distinct, _ = distinct_images(batch.vision)
    assert len(distinct) < len(batch.vision)
    rows = counting_tower(vl_policy, monkeypatch)
    once = scores(vl_policy, batch, shared=False)
    assert rows == [sum(v.pixel_values.shape[0] for v in distinct)] and rows[0] < every
    # every copy encoded, as before
    monkeypatch.setattr(mmsr.models.policy, "distinct_images", lambda vision: (list(vision), list(range(len(vision)))))
    each = scores(vl_policy, batch, shared=False)
    assert rows[1:] == [every]
    for a, b in zip(each, once):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    visual = torch.cat([p.grad.flatten() for p in vl_policy.model.model.visual.parameters() if p.grad is not None])
    assert visual.abs().max() > 0  # the tower's own gradients are part of the comparison
    assert "get_image_features" not in vars(vl_policy.model.model)  # the patch is gone
