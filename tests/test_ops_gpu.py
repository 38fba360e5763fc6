"""GPU-only: the CUDA kernel (klas._C built with CUDA) and the compiled Triton kernel on CUDA tensors, against the
independent float64 reference. Skipped without a CUDA device (the only skips in the ops tests).

The suite runs with TRITON_INTERPRET=1 (so that test_ops_triton.py can run the kernel on the CPU); Triton decides
interpreted vs compiled when it is first imported, so the compiled kernel is checked in a fresh process.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from klas.ops import PairwiseKL, dispatch, native, pairwise_softmax_kl
from test_ops_common import HALF_RTOL, assert_kl_close, kl_reference, logits

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CASES = [(3, 5, 7, 13, 1.0), (1, 1, 1, 1, 1.0), (2, 3, 1, 5, 50.0), (40, 33, 50, 1000, 1.0), (24, 24, 64, 1000, 50.0),
         (17, 9, 300, 129, 0.01)]


def check_impl_on_gpu(impl: str, rng: torch.Generator, device: str = "cuda") -> None:
    """Every accuracy and API case for one implementation on ``device`` tensors (also run in a child process)."""
    assert dispatch.resolve_impl(impl, torch.device(device), torch.float32) == impl
    for n_a, n_b, n, c, scale in CASES:
        a, b = logits(rng, n_a, n, c, scale), logits(rng, n_b, n, c, scale)
        assert_kl_close(pairwise_softmax_kl(a.to(device), b.to(device), impl=impl).cpu(), kl_reference(a, b))
    for scale, offset, t in [(1.0, 0.0, 1.0), (50.0, 0.0, 0.7), (1.0, 1000.0, 0.7)]:
        a = logits(rng, 4, 128, 100, scale) + offset
        b = a + 1e-3 * torch.randn(a.shape, generator=rng)
        assert_kl_close(pairwise_softmax_kl(a.to(device), b.to(device), t, impl=impl).cpu(), kl_reference(a, b, t))
    for dtype in (torch.float16, torch.bfloat16):
        a, b = logits(rng, 5, 33, 257, 3.0, dtype), logits(rng, 6, 33, 257, 3.0, dtype)
        got = pairwise_softmax_kl(a.to(device), b.to(device), impl=impl).cpu()
        assert_kl_close(got, kl_reference(a, b), rtol=HALF_RTOL)
    a = logits(rng, 40, 7, 99, 2.0).permute(1, 0, 2)
    b = logits(rng, 3, 80, 198, 2.0)[:, ::2, ::2]
    assert_kl_close(pairwise_softmax_kl(a.to(device), b.to(device), impl=impl).cpu(), kl_reference(a, b))
    a = logits(rng, 6, 50, 300, 3.0)
    self_kl = pairwise_softmax_kl(a.to(device), None, impl=impl).cpu()
    assert torch.all(torch.diagonal(self_kl) == 0)
    assert_kl_close(self_kl, kl_reference(a, None))
    acc = PairwiseKL(6, impl=impl)
    for s in range(0, 50, 16):
        acc.update(a[:, s:s + 16].to(device))
    assert acc.sum.device.type == device
    torch.testing.assert_close(acc.compute().cpu(), self_kl, rtol=1e-5, atol=1e-8)
    for bad in (float("nan"), float("inf"), float("-inf")):
        a = logits(rng, 3, 9, 50)
        a[1, 4, 7] = bad
        with pytest.raises(ValueError, match="non-finite"):
            pairwise_softmax_kl(a.to(device), a.to(device), impl=impl)


def test_cuda_kernel(rng):
    if os.environ.get("KLAS_REQUIRE_EXT") == "1":
        assert native.has_kernel("cuda"), "KLAS_REQUIRE_EXT=1 but klas._C has no CUDA kernel (built without nvcc?)"
    if not native.has_kernel("cuda"):
        pytest.skip("klas._C was built without CUDA kernels")
    check_impl_on_gpu("cuda", rng)
    a, b = logits(rng, 3, 5, 11, 2.0).cuda(), logits(rng, 2, 5, 11, 2.0).cuda()
    torch.library.opcheck(torch.ops.klas.pairwise_kl_sum.default, (a, b, 1.0))
    torch.library.opcheck(torch.ops.klas.pairwise_kl_sum.default, (a, None, 0.5))


def test_triton_kernel_compiled():
    child = (f"import sys, torch; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
             "from test_ops_gpu import check_impl_on_gpu; g = torch.Generator(); g.seed(); "
             "check_impl_on_gpu('triton', g); "
             "from klas.ops import dispatch; "
             "assert dispatch.resolve_impl(None, torch.device('cuda'), torch.float32) == 'triton'; print('ok')")
    env = dict(os.environ, TRITON_INTERPRET="0")
    r = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout[-3000:] + r.stderr[-6000:]
    a = logits(torch.Generator().manual_seed(0), 3, 5, 11, 2.0).cuda()
    assert pairwise_softmax_kl(a, None).device.type == "cuda"  # the in-process default runs too
