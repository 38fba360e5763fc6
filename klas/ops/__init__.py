"""Numerical ops, independent of KLAS: the all-pairs softmax KL, one-shot and streaming.

    pairwise_softmax_kl(a, b, temperature=1.0, impl=None) -> float32 [nA, nB]
        mean over n of KL(softmax(a[i, n] / T) || softmax(b[j, n] / T)), a [nA, N, C] and b [nB, N, C] logits.
    PairwiseKL(n_a, n_b=None, temperature=1.0, impl=None, device=None)
        the same over batches: update(a_chunk, b_chunk=None), compute(); additive state .sum / .count.

Implementations (``IMPLS``), each a torch op with a fake kernel: ``reference`` (PyTorch, float64), ``cpp`` (fused
OpenMP CPU kernel, csrc/), ``cuda`` (csrc/*.cu), ``triton`` (kernels/). See ``klas.ops.dispatch`` and
docs/kernels.md for how one is chosen.
"""
from __future__ import annotations

import torch

from klas.ops.dispatch import IMPLS, available_impls, pairwise_kl_sum, resolve_impl
from klas.ops.reference import pairwise_softmax_kl_reference
from klas.ops.streaming import PairwiseKL


def pairwise_softmax_kl(a: torch.Tensor, b: torch.Tensor | None, temperature: float = 1.0, impl: str | None = None
                        ) -> torch.Tensor:
    """mean_n KL(softmax(a[i, n] / T) || softmax(b[j, n] / T)) for every (i, j): float32 [nA, nB].

    a [nA, N, C] and b [nB, N, C] are logits (float32, float16 or bfloat16; accumulated in float32 and across
    samples in float64). ``b=None`` is a against itself. Raises ValueError on bad shapes, a non-positive
    temperature, N = 0, or non-finite logits.
    """
    if isinstance(a, torch.Tensor) and a.dim() == 3 and a.shape[1] == 0:
        raise ValueError("pairwise_softmax_kl: no samples (N = 0)")
    return (pairwise_kl_sum(a, b, temperature, impl) / a.shape[1]).float()


__all__ = ["IMPLS", "PairwiseKL", "available_impls", "pairwise_kl_sum", "pairwise_softmax_kl",
           "pairwise_softmax_kl_reference", "resolve_impl"]
