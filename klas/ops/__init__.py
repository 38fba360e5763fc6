"""Numerical ops, independent of KLAS: the all-pairs softmax-KL (one-shot and streaming).

PLACEHOLDER until the kernel issue lands: only the PyTorch reference exists; the public names below are final.
"""
from __future__ import annotations

import torch

from klas.ops.reference import pairwise_softmax_kl_reference, pairwise_softmax_kl_sum_reference


def _check(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.dim() != 3 or b.dim() != 3 or a.shape[1:] != b.shape[1:]:
        raise ValueError(f"pairwise_softmax_kl: expected a [nA, N, C] and b [nB, N, C], got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise ValueError("pairwise_softmax_kl: non-finite logits (inf or nan) in the input")


def pairwise_softmax_kl(a: torch.Tensor, b: torch.Tensor, temperature: float = 1.0, impl: str | None = None
                        ) -> torch.Tensor:
    """mean_n KL(softmax(a[i, n] / T) || softmax(b[j, n] / T)) for every (i, j): float32 [nA, nB]."""
    _check(a, b)
    return pairwise_softmax_kl_reference(a, b, temperature)


class PairwiseKL:
    """Streaming all-pairs KL: ``update(a_chunk, b_chunk)`` per batch of samples, then ``compute()``.

    State is additive (a float64 sum [nA, nB] and a sample count), so shards of a split can be summed
    (e.g. ``all_reduce``) before ``compute``. ``update(a_chunk)`` with no ``b_chunk`` scores a against itself.
    """

    def __init__(self, n_a: int, n_b: int | None = None, temperature: float = 1.0, impl: str | None = None,
                 device: torch.device | str | None = None):
        self.n_a, self.n_b = n_a, n_b if n_b is not None else n_a
        self.temperature, self.impl = temperature, impl
        self.sum = torch.zeros(self.n_a, self.n_b, dtype=torch.float64, device=device)
        self.count = 0

    def update(self, a_chunk: torch.Tensor, b_chunk: torch.Tensor | None = None) -> None:
        b_chunk = a_chunk if b_chunk is None else b_chunk
        _check(a_chunk, b_chunk)
        self.sum += pairwise_softmax_kl_sum_reference(a_chunk, b_chunk, self.temperature).to(self.sum.device)
        self.count += a_chunk.shape[1]

    def compute(self) -> torch.Tensor:
        if self.count == 0:
            raise ValueError("PairwiseKL.compute: no samples were given to update()")
        return (self.sum / self.count).float()


__all__ = ["pairwise_softmax_kl", "PairwiseKL", "pairwise_softmax_kl_reference"]
