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


def stream_uniform(seeds: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """Uniform noise in (0, 1), a pure function of (seed, position, vocabulary id).

    Args:
        seeds: ``[B]`` int64 request seeds; positions: ``[B]`` int64 index of the token being drawn.
    Returns:
        ``[B, V]`` float64.
    """
    row = splitmix64(seeds + splitmix64(positions))  # [B]
    ids = torch.arange(vocab, device=seeds.device, dtype=torch.long) * _GOLDEN
    bits = _shr(splitmix64(row[:, None] + ids), 11)  # [B, V], 53 random bits
    return (bits.double() + 0.5) / float(1 << 53)


def gumbel_sample(filtered: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """One draw per row from ``softmax(filtered)``.

    Args:
        filtered: ``[B, V]`` scaled logits, ``-inf`` where filtered out.
        seeds, positions: ``[B]`` int64 (see ``stream_uniform``).
    Returns:
        ``[B]`` token ids.
    """
    u = stream_uniform(seeds.to(filtered.device), positions.to(filtered.device), filtered.shape[-1])
    gumbel = -torch.log(-torch.log(u))
    return (filtered.double() + gumbel).argmax(-1)
