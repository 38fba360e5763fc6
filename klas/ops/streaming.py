"""Streaming all-pairs KL: feed batches of samples, read the mean at the end.

The state is additive -- ``sum`` (float64 [nA, nB], sum over samples of the per-sample KL) and ``count`` (samples
seen) -- so accumulators of disjoint shards can be combined (``torch.distributed.all_reduce`` on ``sum`` plus the
sum of ``count``) before ``compute()``. Memory is O(nA * nB) plus one batch; no logits are retained.
"""
from __future__ import annotations

import torch

from klas.ops.dispatch import pairwise_kl_sum


class PairwiseKL:
    """Accumulates mean_n KL(softmax(a[i, n] / T) || softmax(b[j, n] / T)) over batches of samples.

    Args:
        n_a: rows of a (the P side).
        n_b: rows of b (the Q side); None scores a against itself (``update(a_chunk)``).
        temperature: softmax temperature T > 0.
        impl: implementation name (see ``klas.ops.IMPLS``); None picks the best for the chunks' device.
        device: where ``sum`` lives; None follows the first chunk.
    """

    def __init__(self, n_a: int, n_b: int | None = None, temperature: float = 1.0, impl: str | None = None,
                 device: torch.device | str | None = None):
        self.n_a, self.n_b = int(n_a), int(n_a if n_b is None else n_b)
        self.temperature, self.impl = temperature, impl
        self._follow_device = device is None
        self.sum = torch.zeros(self.n_a, self.n_b, dtype=torch.float64, device=device)
        self.count = 0

    def update(self, a_chunk: torch.Tensor, b_chunk: torch.Tensor | None = None) -> None:
        """Adds a batch: a_chunk [n_a, B, C] and b_chunk [n_b, B, C] (None: a_chunk against itself)."""
        if a_chunk.dim() != 3 or a_chunk.shape[0] != self.n_a:
            raise ValueError(f"PairwiseKL.update: expected a_chunk [{self.n_a}, B, C], got {tuple(a_chunk.shape)}")
        if b_chunk is None and self.n_b != self.n_a:
            raise ValueError(f"PairwiseKL.update: b_chunk [{self.n_b}, B, C] is required (n_b != n_a)")
        if b_chunk is not None and (b_chunk.dim() != 3 or b_chunk.shape[0] != self.n_b):
            raise ValueError(f"PairwiseKL.update: expected b_chunk [{self.n_b}, B, C], got {tuple(b_chunk.shape)}")
        if self._follow_device and self.count == 0 and self.sum.device != a_chunk.device:
            self.sum = self.sum.to(a_chunk.device)
        part = pairwise_kl_sum(a_chunk, b_chunk, self.temperature, self.impl)
        self.sum += part.to(self.sum.device)
        self.count += a_chunk.shape[1]

    def compute(self) -> torch.Tensor:
        """The float32 [n_a, n_b] mean over all samples seen."""
        if self.count == 0:
            raise ValueError("PairwiseKL.compute: no samples were given to update()")
        return (self.sum / self.count).float()

    def reset(self) -> None:
        self.sum.zero_()
        self.count = 0
