"""The Triton kernel (kernels/pairwise_kl.py) on the CPU, under Triton's interpreter (TRITON_INTERPRET=1), against
the independent float64 reference. Shapes stay small: the interpreter runs each program in NumPy."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from klas.ops import PairwiseKL, dispatch, pairwise_softmax_kl
from test_ops_common import HALF_RTOL, assert_kl_close, kl_reference, logits


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("KLAS_KL_IMPL", raising=False)


def _triton(a, b, temperature=1.0):
    assert dispatch.resolve_impl("triton", a.device, a.dtype) == "triton"
    return pairwise_softmax_kl(a, b, temperature, impl="triton")


@pytest.mark.parametrize("shape", [(3, 5, 7, 13), (1, 1, 1, 1), (2, 3, 1, 5), (4, 6, 3, 37), (2, 3, 2, 129),
                                   (33, 2, 2, 6)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("scale", [0.01, 1.0, 50.0])
def test_matches_float64_reference(rng, shape, scale):
    n_a, n_b, n, c = shape  # 33 rows: two row tiles, the second mostly padding
    a, b = logits(rng, n_a, n, c, scale), logits(rng, n_b, n, c, scale)
    assert_kl_close(_triton(a, b), kl_reference(a, b))


@pytest.mark.parametrize("scale,offset,temperature", [(1.0, 0.0, 1.0), (50.0, 0.0, 0.7), (1.0, 1000.0, 0.7)])
def test_near_identical_distributions(rng, scale, offset, temperature):
    a = logits(rng, 3, 6, 100, scale) + offset
    b = a + 1e-3 * torch.randn(a.shape, generator=rng)
    assert_kl_close(_triton(a, b, temperature), kl_reference(a, b, temperature))


def test_temperature_and_non_contiguous(rng):
    a = logits(rng, 3, 5, 19, 4.0).permute(1, 0, 2)  # [5, 3, 19] view of a sample-major stack
    b = logits(rng, 2, 6, 38, 4.0)[:, ::2, ::2]
    assert_kl_close(_triton(a, b, 0.6), kl_reference(a, b, 0.6))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(rng, dtype):
    a, b = logits(rng, 3, 4, 37, 3.0, dtype), logits(rng, 2, 4, 37, 3.0, dtype)
    assert_kl_close(_triton(a, b), kl_reference(a, b), rtol=HALF_RTOL)


def test_self_mode_diagonal_and_streaming(rng):
    a = logits(rng, 4, 6, 21, 3.0)
    one_shot = _triton(a, None)
    assert torch.all(torch.diagonal(one_shot) == 0)
    assert_kl_close(one_shot, kl_reference(a, None))
    acc = PairwiseKL(4, impl="triton")
    acc.update(a[:, :2])
    acc.update(a[:, 2:])
    torch.testing.assert_close(acc.compute(), one_shot, rtol=1e-6, atol=1e-9)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NumPy, inside the interpreter
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_logits_raise(rng, bad):
    a, b = logits(rng, 2, 3, 9), logits(rng, 3, 3, 9)
    b[2, 1, 4] = bad
    with pytest.raises(ValueError, match="non-finite"):
        _triton(a, b)


def test_needs_the_interpreter_on_cpu(rng, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    a = logits(rng, 2, 2, 3)
    assert "TRITON_INTERPRET" in dispatch.unavailable_reason("triton", "cpu")
    with pytest.warns(RuntimeWarning, match="impl 'triton' unavailable"):
        dispatch._warned.clear()
        assert dispatch.resolve_impl("triton", a.device, a.dtype) in ("cpp", "reference")


_COMPILE = """
import sys
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile
from klas.kernels.pairwise_kl import _kernel
fn = _kernel(False)
for dtype, (bi, bj, bc) in [("fp32", (32, 32, 8)), ("bf16", (2, 2, 4))]:
    sig = {n: "constexpr" if n.startswith("BLOCK") else "fp32" if n == "inv_t" else
           ("*fp32" if n == "out_ptr" else "*" + dtype) if n.endswith("_ptr") else "i32" for n in fn.arg_names}
    src = ASTSource(fn=fn, signature=sig, constexprs={"BLOCK_I": bi, "BLOCK_J": bj, "BLOCK_C": bc})
    kernel = compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
    assert "cubin" in kernel.asm and kernel.metadata.shared >= 0
print("compiled")
"""


def test_kernel_compiles_for_the_gpu(tmp_path):
    # No GPU needed: Triton lowers the kernel to an sm_90 cubin with its bundled ptxas, catching GPU-only compile
    # errors (types, loop-carried values) that the interpreter does not see. Fresh process: no interpreter there.
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path))
    r = subprocess.run([sys.executable, "-c", _COMPILE], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "compiled" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]
