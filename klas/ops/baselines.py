"""Unfused PyTorch formulations of the all-pairs softmax KL, kept as benchmark baselines (and cross-checked in tests).

Neither is used by the dispatcher: ``product`` is fast but cancels catastrophically in float32 for close distributions
(it computes KL as the difference of two nearly equal numbers); ``loop`` is what one writes without this op.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def pairwise_kl_product(a: torch.Tensor, b: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Vectorized float32 product form: (sum P log P)[:, None] - P @ (log Q)^T over flattened samples, / N."""
    la = torch.log_softmax(a.float() / temperature, dim=-1)
    lb = torch.log_softmax(b.float() / temperature, dim=-1)
    pa = la.exp()
    neg_entropy = (pa * la).sum(dim=(1, 2))
    return (neg_entropy[:, None] - pa.flatten(1) @ lb.flatten(1).T) / a.shape[1]


def pairwise_kl_loop(a: torch.Tensor, b: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """One ``F.kl_div`` per pair (log-softmax of each row computed once), float32 [nA, nB]."""
    la = torch.log_softmax(a.float() / temperature, dim=-1)
    lb = torch.log_softmax(b.float() / temperature, dim=-1)
    out = torch.empty(a.shape[0], b.shape[0], dtype=torch.float32, device=a.device)
    for i in range(a.shape[0]):
        for j in range(b.shape[0]):
            out[i, j] = F.kl_div(lb[j], la[i], reduction="batchmean", log_target=True)
    return out
