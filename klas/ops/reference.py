"""Pure-PyTorch reference for the all-pairs softmax KL: always available, accurate, not fast.

KL(P_i || Q_j) = sum_c P_i log P_i - sum_c P_i log Q_j. The second term over all (i, j) is one matrix product of the
flattened P [nA, N*C] with the flattened log Q [nB, N*C]. In float32 that product cancels catastrophically when P and
Q are close (consecutive blocks of one anchor), so the reference does it in float64, in chunks of samples.
Registered as the torch op ``klas::pairwise_kl_sum_reference`` (with a fake kernel) like the fused implementations.
"""
from __future__ import annotations

import torch


def pairwise_softmax_kl_sum_reference(a: torch.Tensor, b: torch.Tensor | None, temperature: float = 1.0,
                                      chunk: int = 4096) -> torch.Tensor:
    """Sum over samples of KL(softmax(a[i,n]/T) || softmax(b[j,n]/T)), as float64 [nA, nB]; ``b=None``: b is a."""
    n_a, n, _ = a.shape
    n_b = n_a if b is None else b.shape[0]
    out = torch.zeros(n_a, n_b, dtype=torch.float64, device=a.device)
    for s in range(0, n, chunk):
        la = torch.log_softmax(a[:, s:s + chunk].double() / temperature, dim=-1)
        lb = la if b is None else torch.log_softmax(b[:, s:s + chunk].double() / temperature, dim=-1)
        pa = la.exp()
        neg_entropy = (pa * la).sum(dim=(1, 2))  # [nA]
        cross = pa.flatten(1) @ lb.flatten(1).T  # [nA, nB]
        out += neg_entropy[:, None] - cross
    return out


def pairwise_softmax_kl_reference(a: torch.Tensor, b: torch.Tensor | None, temperature: float = 1.0) -> torch.Tensor:
    """Mean over samples of KL(softmax(a[i,n]/T) || softmax(b[j,n]/T)) -> float32 [nA, nB]."""
    return (pairwise_softmax_kl_sum_reference(a, b, temperature) / a.shape[1]).float()


@torch.library.custom_op("klas::pairwise_kl_sum_reference", mutates_args=())
def pairwise_kl_sum_reference_op(a: torch.Tensor, b: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """Torch-op form of :func:`pairwise_softmax_kl_sum_reference` (float64 [nA, nB] sum over samples)."""
    return pairwise_softmax_kl_sum_reference(a, b, temperature)


def pairwise_kl_sum_fake(a: torch.Tensor, b: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """The fake (meta) kernel every ``klas::pairwise_kl_sum*`` op shares: a float64 [nA, nB] result."""
    return a.new_empty((a.shape[0], (a if b is None else b).shape[0]), dtype=torch.float64)


pairwise_kl_sum_reference_op.register_fake(pairwise_kl_sum_fake)
