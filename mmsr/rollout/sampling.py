"""Per-episode sampling streams: the draws of an episode depend on its identity, never on its batch.

A single generator shared by a batch makes every draw depend on which episodes happen to be batched
together, so a run on 2 ranks (each rolling out half of the prompts) or a run resumed mid-way could
not reproduce a 1-rank, uninterrupted run. Here each request carries a seed derived from the engine's
seed, the rollout index, the episode key and the turn (``request_seed``); token ``t`` of that request
is drawn with noise that is a pure function of ``(seed, t, vocabulary id)`` (a counter-based hash,
vectorized over the batch: no per-row Python work per token). vLLM takes the same per-request seed.

Sampling is the Gumbel-max trick: ``argmax(logits / T + g)`` with ``g = -log(-log u)``, ``u``
uniform, is a draw from ``softmax(logits / T)``; top-k / top-p filtering sets logits to ``-inf`` first.
"""

from __future__ import annotations

import hashlib

import torch

MASK63 = (1 << 63) - 1


def request_seed(engine_seed: int, stream: int, key: str, turn: int) -> int:
    """A 63-bit seed for one turn of one episode (stable across processes and Python runs)."""
    digest = hashlib.blake2b(f"{engine_seed}/{stream}/{key}/{turn}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & MASK63


def _signed(c: int) -> int:
    """A 64-bit constant as the int64 torch stores (two's complement)."""
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN, _MIX1, _MIX2 = _signed(0x9E3779B97F4A7C15), _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic: it copies the sign bit)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finalizer on int64 tensors (wrapping arithmetic): a well-mixed 64-bit hash."""
    z = x + _GOLDEN
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


def _shr_(x: torch.Tensor, s: int, out: torch.Tensor) -> torch.Tensor:
    """``_shr`` into the preallocated ``out`` (the hash of a ``[B, V]`` batch allocates two tensors, not twenty)."""
    torch.bitwise_right_shift(x, s, out=out)
    return out.bitwise_and_((1 << (64 - s)) - 1)


def _vocab_keys(vocab: int, device: torch.device) -> torch.Tensor:
    """``[V]`` int64 ``id * golden + golden``: the per-id offset of ``stream_uniform``'s hash, with the first
    addition of ``splitmix64`` folded in (wrapping addition is associative, so the bits are the same)."""
    key = (vocab, str(device))
    if key not in _VOCAB_KEYS:
        _VOCAB_KEYS[key] = torch.arange(vocab, device=device, dtype=torch.long) * _GOLDEN + _GOLDEN
    return _VOCAB_KEYS[key]


_VOCAB_KEYS: dict[tuple[int, str], torch.Tensor] = {}


def stream_bits(seeds: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """53 random bits per (row, vocabulary id): ``splitmix64(row + id * golden) >> 11`` with
    ``row = splitmix64(seed + splitmix64(position))``, computed in place.

    Args:
        seeds: ``[B]`` int64 request seeds; positions: ``[B]`` int64 index of the token being drawn.
    Returns:
        ``[B, V]`` int64 in ``[0, 2**53)``.
    """
    row = splitmix64(seeds + splitmix64(positions))  # [B]
    z = row[:, None] + _vocab_keys(vocab, seeds.device)  # [B, V]: splitmix64's ``x + golden``
    tmp = torch.empty_like(z)
    z.bitwise_xor_(_shr_(z, 30, tmp)).mul_(_MIX1)
    z.bitwise_xor_(_shr_(z, 27, tmp)).mul_(_MIX2)
    z.bitwise_xor_(_shr_(z, 31, tmp))
    return _shr_(z, 11, tmp)


def stream_uniform(seeds: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """Uniform noise in (0, 1), a pure function of (seed, position, vocabulary id).

    Args:
        seeds: ``[B]`` int64 request seeds; positions: ``[B]`` int64 index of the token being drawn.
    Returns:
        ``[B, V]`` float64.
    """
    return stream_bits(seeds, positions, vocab).double().add_(0.5).mul_(1.0 / (1 << 53))  # exact: a power of 2


def gumbel_sample(filtered: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """One draw per row from ``softmax(filtered)``: ``argmax(filtered + g)``, ``g = -log(-log u)``
    (subtracting ``log(-log u)`` is the same IEEE operation, one op fewer).

    Args:
        filtered: ``[B, V]`` scaled logits, ``-inf`` where filtered out.
        seeds, positions: ``[B]`` int64 (see ``stream_uniform``).
    Returns:
        ``[B]`` token ids.
    """
    u = stream_uniform(seeds.to(filtered.device), positions.to(filtered.device), filtered.shape[-1])
    return torch.sub(filtered, u.log_().neg_().log_()).argmax(-1)  # float64: ``filtered`` is promoted exactly
