"""A vision-language policy's forward without images still runs its vision tower, at zero weight: every
rank of DDP / FSDP2 runs the same modules whatever its micro-batch holds (a text-only rank failed DDP's
step and hung FSDP2's gathers), with the loss and gradients a forward without the tower gives."""

from contextlib import nullcontext

import torch
from PIL import Image

import mmsr.models.policy
from tests.models.conftest import tiny_qwen3_vl, vl_policy  # noqa: F401 - fixtures: each vision-language family


def _loss_and_grads(policy, ids: torch.Tensor, vision: list) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    """Mean log-prob of ``ids`` ``[1, T]`` (with ``vision``'s images) and every parameter's gradient."""
    policy.model.zero_grad(set_to_none=True)
    pos = policy.position_ids(ids[0], vision)[:, None]  # [3, 1, T]
    out = policy.forward(ids, torch.ones_like(ids), pos, vision)
    loss = torch.log_softmax(out.logits[0, :-1], -1).gather(-1, ids[0, 1:, None]).mean()
    loss.backward()
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in policy.model.named_parameters()}
    policy.model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@torch.no_grad()
def _scores(policy, ids: torch.Tensor) -> torch.Tensor:
    """Logits ``[1, T, V]`` of a text-only forward without gradients (as the reference model scores)."""
    return policy.forward(ids, torch.ones_like(ids), policy.position_ids(ids[0], [])[:, None], []).logits


def _text(policy) -> torch.Tensor:
    return torch.tensor([policy.tokenizer.encode("<|im_start|>user\nWho wrote it?<|im_end|>\n<|im_start|>assistant\n")])


def test_a_text_only_forward_gives_the_vision_tower_zero_gradients_and_the_same_loss(vl_policy, monkeypatch):
    monkeypatch.setattr(mmsr.models.policy, "runs_beside_other_ranks", lambda: True)
    ids = _text(vl_policy)
    loss, grads = _loss_and_grads(vl_policy, ids, [])
    scored = _scores(vl_policy, ids)
    visual = {n for n, _ in vl_policy.model.model.visual.named_parameters(prefix="model.visual")}
    assert visual and all(grads[n] is not None and not grads[n].any() for n in visual)  # zeros, not None
    assert not vl_policy.model.model.language_model._forward_pre_hooks  # the hook is gone
    # as before: the tower left out
    monkeypatch.setattr(mmsr.models.policy, "idle_vision_tower", lambda model: nullcontext())
    before, before_grads = _loss_and_grads(vl_policy, ids, [])
    assert torch.equal(loss, before)
    assert all(before_grads[n] is None for n in visual)
    for n, g in before_grads.items():
        if n not in visual and g is not None:
            assert torch.equal(grads[n], g), n
    assert torch.equal(scored, _scores(vl_policy, ids))


def test_a_forward_with_images_encodes_them_only(vl_policy, monkeypatch):
    """An image batch runs the tower once, on its own images: as it did before the blank image existed."""
    monkeypatch.setattr(mmsr.models.policy, "runs_beside_other_ranks", lambda: True)
    image = vl_policy.process_image(Image.new("RGB", (64, 64), "red"))
    pad = vl_policy.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    ids = torch.cat([_text(vl_policy)[:, :3], torch.full((1, image.num_tokens), pad), _text(vl_policy)[:, 3:]], 1)
    rows, visual = [], vl_policy.model.model.visual
    forward = visual.forward
    monkeypatch.setattr(visual, "forward", lambda pixels, *a, **k: rows.append(pixels.shape[0]) or forward(pixels, *a, **k))
    _loss_and_grads(vl_policy, ids, [image])
    assert rows == [image.pixel_values.shape[0]]
    _loss_and_grads(vl_policy, _text(vl_policy), [])
    merge = vl_policy.model.config.vision_config.spatial_merge_size
    assert rows[1:] == [merge * merge]  # the blank image: one merged token's patches


def test_one_process_leaves_the_tower_out_of_a_text_only_forward(vl_policy):
    """Alone, nothing waits for the tower: its gradients stay None, so AdamW leaves it as before (its step count
    and weight decay would move with zero gradients: the warm start's reading steps are text-only)."""
    assert not mmsr.models.policy.runs_beside_other_ranks()
    _, grads = _loss_and_grads(vl_policy, _text(vl_policy), [])
    assert all(grads[n] is None for n, _ in vl_policy.model.model.visual.named_parameters(prefix="model.visual"))
