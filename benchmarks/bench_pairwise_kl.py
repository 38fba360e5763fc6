"""pytest-benchmark of the CPU paths of klas.ops.pairwise_softmax_kl at one KLAS-sized shape:

    pytest benchmarks/bench_pairwise_kl.py --benchmark-only

Providers: the fused C++ kernel (``cpp``), the float64 reference, the vectorized float32 PyTorch product form, the
per-pair F.kl_div loop, and a copy of the inputs (the bandwidth floor). All run at torch's thread count, recorded in
``extra_info`` with the machine. benchmarks/pairwise_kl_sweep.py sweeps shapes and writes JSON + PNG.
"""
from __future__ import annotations

import platform

import pytest
import torch

from klas.ops import available_impls, pairwise_kl_sum
from klas.ops.baselines import pairwise_kl_loop, pairwise_kl_product

SHAPE = (12, 12, 4000, 100)  # nA, nB, N, C: 12 probe blocks per anchor, 100 classes


@pytest.fixture(scope="module")
def inputs():
    n_a, n_b, n, c = SHAPE
    return torch.randn(n_a, n, c) * 3, torch.randn(n_b, n, c) * 3


def _providers():
    return [p for p in ("cpp", "reference", "product", "loop", "floor_copy") if p != "cpp" or "cpp" in
            available_impls("cpu")]


@pytest.mark.parametrize("provider", _providers())
def test_pairwise_kl_cpu(benchmark, inputs, provider):
    a, b = inputs
    dst_a, dst_b = torch.empty_like(a), torch.empty_like(b)
    fn = {"cpp": lambda: pairwise_kl_sum(a, b, impl="cpp"),
          "reference": lambda: pairwise_kl_sum(a, b, impl="reference"),
          "product": lambda: pairwise_kl_product(a, b),
          "loop": lambda: pairwise_kl_loop(a, b),
          "floor_copy": lambda: (dst_a.copy_(a), dst_b.copy_(b))}[provider]
    benchmark.group = "pairwise_kl " + "x".join(map(str, SHAPE))
    benchmark.extra_info.update(machine=platform.processor() or platform.machine(), torch=torch.__version__,
                                threads=torch.get_num_threads(), bytes_in=2 * a.numel() * a.element_size())
    benchmark(fn)
