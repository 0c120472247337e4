import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mmsr.algo import entropy_from_logits, logprobs_and_entropy, token_logprobs
from mmsr.algo.logprobs import _blocks

N, T, V = 3, 5, 11  # 15 rows


def _inputs(seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(N, T, V, generator=gen) * 3).to(dtype)
    labels = torch.randint(0, V, (N, T), generator=gen)
    return logits, labels


def _reference(logits, labels, temperature=1.0):
    logp_all = torch.log_softmax(logits.float() / temperature, dim=-1)
    logp = logp_all.gather(-1, labels[..., None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def test_hand_worked_uniform():
    # uniform logits over V=4: every log-prob is log(1/4) = -1.386294, entropy log(4) = 1.386294
    logits = torch.zeros(1, 2, 4)
    logp, ent = logprobs_and_entropy(logits, torch.tensor([[0, 3]]))
    torch.testing.assert_close(logp, torch.full((1, 2), -1.386294))
    torch.testing.assert_close(ent, torch.full((1, 2), 1.386294))


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 15, 100])  # 4 and 7 do not divide 15 rows
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_log_softmax(chunk_size, temperature):
    logits, labels = _inputs()
    ref_logp, ref_ent = _reference(logits, labels, temperature)
    torch.testing.assert_close(token_logprobs(logits, labels, temperature, chunk_size), ref_logp, atol=1e-5, rtol=0)
    torch.testing.assert_close(entropy_from_logits(logits, temperature, chunk_size), ref_ent, atol=1e-5, rtol=0)
    logp, ent = logprobs_and_entropy(logits, labels, temperature, chunk_size)
    torch.testing.assert_close(logp, ref_logp, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=0)


@pytest.mark.parametrize("chunk_size", [1, 4, 15])
@pytest.mark.parametrize("use", ["logp", "entropy", "both"])
def test_gradients_match_unchunked(chunk_size, use):
    logits, labels = _inputs(seed=1)
    w_logp, w_ent = torch.randn(N, T), torch.randn(N, T)

    def loss_of(logp, ent):
        return {"logp": (logp * w_logp).sum(), "entropy": (ent * w_ent).sum()}.get(
            use, (logp * w_logp).sum() + (ent * w_ent).sum()
        )

    ours = logits.clone().requires_grad_()
    loss_of(*logprobs_and_entropy(ours, labels, 0.8, chunk_size)).backward()
    ref = logits.clone().requires_grad_()
    loss_of(*_reference(ref, labels, 0.8)).backward()
    torch.testing.assert_close(ours.grad, ref.grad, atol=1e-5, rtol=1e-4)


def test_gradcheck_float64():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 5, (2, 3), generator=gen)
    labels[0, 1] = -100
    assert torch.autograd.gradcheck(lambda x: logprobs_and_entropy(x, labels, 1.3, 4), (logits,))


def test_negative_labels_give_zero_and_no_gradient():
    logits, labels = _inputs(seed=3)
    labels[1, 2] = -100
    logits.requires_grad_()
    logp = token_logprobs(logits, labels, chunk_size=4)
    assert logp[1, 2].item() == 0.0
    logp.sum().backward()
    assert torch.equal(logits.grad[1, 2], torch.zeros(V))
    ref_logp, _ = _reference(logits.detach(), labels.clamp(min=0))
    keep = labels >= 0
    torch.testing.assert_close(logp[keep], ref_logp[keep], atol=1e-5, rtol=0)


def test_bf16_logits_computed_in_float32():
    logits, labels = _inputs(seed=4, dtype=torch.bfloat16)
    logits.requires_grad_()
    logp, ent = logprobs_and_entropy(logits, labels, chunk_size=4)
    assert logp.dtype == ent.dtype == torch.float32
    ref_logp, ref_ent = _reference(logits.detach(), labels)
    torch.testing.assert_close(logp, ref_logp, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=0)
    logp.sum().backward()
    assert logits.grad.dtype == torch.bfloat16


def test_without_entropy_and_no_grad():
    logits, labels = _inputs()
    with torch.no_grad():
        logp, ent = logprobs_and_entropy(logits, labels, with_entropy=False)
    assert ent is None and logp.shape == (N, T) and not logp.requires_grad


def test_saves_no_full_float32_softmax_for_backward():
    # autograd may keep the (bf16) logits plus a few [N*T] vectors, never an [N*T, V] float32 copy
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    logits = torch.randn(2, 64, 1000, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 1000, (2, 64))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logp, ent = logprobs_and_entropy(logits, labels, chunk_size=16)
    rows = 2 * 64  # bf16 logits (a reference) + labels int64, valid bool, lse and entropy float32
    assert sum(saved) <= logits.numel() * 2 + rows * (8 + 1 + 4 + 4)
    (logp.sum() + ent.sum()).backward()


def test_sliced_logits_are_not_copied_and_match_reference():
    # the trainer passes out.logits[:, :-1], which cannot be flattened to [N*T, V] without a copy
    gen = torch.Generator().manual_seed(5)
    full = torch.randn(2, 9, V, generator=gen, requires_grad=True)
    labels = torch.randint(0, V, (2, 8), generator=gen)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        logp, ent = logprobs_and_entropy(full[:, :-1], labels, chunk_size=3)
    big = [t for t in saved if t.dim() == 3]
    assert len(big) == 1 and big[0].untyped_storage().data_ptr() == full.untyped_storage().data_ptr()
    (logp.sum() + ent.sum()).backward()
    ref_full = full.detach().clone().requires_grad_()
    sum(t.sum() for t in _reference(ref_full[:, :-1], labels)).backward()
    torch.testing.assert_close(logp, _reference(full.detach()[:, :-1], labels)[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(full.grad, ref_full.grad, atol=1e-5, rtol=1e-4)


@given(st.integers(0, 6), st.integers(0, 9), st.integers(1, 12))
def test_blocks_cover_every_position_once(n, t, chunk_size):
    seen = torch.zeros(n, t, dtype=torch.long)
    for idx in _blocks(n, t, chunk_size):
        assert 0 < seen[idx].numel() <= chunk_size
        seen[idx] += 1
    assert torch.equal(seen, torch.ones(n, t, dtype=torch.long))


def test_empty_batch():
    logp, ent = logprobs_and_entropy(torch.zeros(0, 3, V, requires_grad=True), torch.zeros(0, 3, dtype=torch.long))
    assert logp.shape == ent.shape == (0, 3)


def test_errors():
    logits, labels = _inputs()
    with pytest.raises(ValueError, match="logits"):
        token_logprobs(logits[0], labels[0])
    with pytest.raises(ValueError, match="logits"):
        token_logprobs(logits, labels[:, :2])
    with pytest.raises(ValueError, match="integer"):
        token_logprobs(logits, labels.float())
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(logits, labels, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        entropy_from_logits(logits, chunk_size=0)
