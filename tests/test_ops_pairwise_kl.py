"""klas.ops on the CPU: the reference and the C++ kernel (or, where the extension is not built and not required, the
fallback path) against the independent float64 reference of test_ops_common, plus the API around them."""
from __future__ import annotations

import os
import sys
import warnings

import numpy as np
import pytest
import torch

import klas.ops as ops
from klas.ops import PairwiseKL, dispatch, native, pairwise_softmax_kl
from klas.ops.baselines import pairwise_kl_loop, pairwise_kl_product
from test_ops_common import HALF_RTOL, assert_kl_close, kl_reference, logits

REQUIRE_EXT = os.environ.get("KLAS_REQUIRE_EXT") == "1"


def _cpu_impls() -> list[str]:
    # "cpp" runs the extension when built; otherwise it exercises the warned fallback (and fails under REQUIRE_EXT).
    return ["reference", "cpp"]


@pytest.fixture(autouse=True)
def _quiet_fallback():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="klas: pairwise_softmax_kl impl", category=RuntimeWarning)
        yield


SHAPES = [(3, 5, 7, 13), (1, 1, 1, 1), (2, 3, 1, 5), (4, 6, 9, 37), (5, 4, 11, 100), (6, 7, 5, 129)]


@pytest.mark.parametrize("impl", _cpu_impls())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("scale", [0.01, 1.0, 50.0])
def test_matches_float64_reference(rng, impl, shape, scale):
    n_a, n_b, n, c = shape
    a, b = logits(rng, n_a, n, c, scale), logits(rng, n_b, n, c, scale)
    assert_kl_close(pairwise_softmax_kl(a, b, impl=impl), kl_reference(a, b))


NEAR_IDENTICAL = [(1.0, 0.0, 1.0), (50.0, 0.0, 1.0), (50.0, 0.0, 0.7), (1.0, 1000.0, 0.7)]


@pytest.mark.parametrize("impl", _cpu_impls())
@pytest.mark.parametrize("scale,offset,temperature", NEAR_IDENTICAL)
def test_near_identical_distributions(rng, impl, scale, offset, temperature):
    # b = a + 1e-3 noise gives KL ~ 1e-7 on the matched pairs: the float32 product form loses all digits here. The
    # offset (softmax-invariant) and T != 1 catch kernels that scale by 1/T before subtracting the row max.
    a = logits(rng, 4, 64, 100, scale) + offset
    b = a + 1e-3 * torch.randn(a.shape, generator=rng)
    ref = kl_reference(a, b, temperature)
    assert np.diag(ref).max() < 1e-4  # the case is what it claims to be
    assert_kl_close(pairwise_softmax_kl(a, b, temperature, impl=impl), ref)


def test_product_form_baseline_is_inaccurate_where_the_kernel_is_not(rng):
    # Documents why the fused kernels use the direct form: same data, the fp32 product form misses the tolerance.
    a = logits(rng, 6, 256, 100, 1.0)
    b = a + 1e-4 * torch.randn(a.shape, generator=rng)
    ref = kl_reference(a, b)
    err = np.abs(pairwise_kl_product(a, b).double().numpy() - ref) / (1e-6 * 1e-2 + 1e-4 * np.abs(ref))
    assert err.max() > 1.0
    assert_kl_close(pairwise_kl_loop(a, b), kl_reference(a, b), rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("impl", _cpu_impls())
@pytest.mark.parametrize("temperature", [0.5, 2.5])
def test_temperature(rng, impl, temperature):
    a, b = logits(rng, 3, 6, 21, 4.0), logits(rng, 2, 6, 21, 4.0)
    assert_kl_close(pairwise_softmax_kl(a, b, temperature, impl=impl), kl_reference(a, b, temperature))


@pytest.mark.parametrize("impl", _cpu_impls())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(rng, impl, dtype):
    a, b = logits(rng, 3, 8, 37, 3.0, dtype), logits(rng, 4, 8, 37, 3.0, dtype)
    out = pairwise_softmax_kl(a, b, impl=impl)
    assert out.dtype == torch.float32
    assert_kl_close(out, kl_reference(a, b), rtol=HALF_RTOL)  # reference on the same rounded values


def test_mixed_dtypes_promote(rng):
    a, b = logits(rng, 2, 5, 9, 2.0, torch.bfloat16), logits(rng, 3, 5, 9, 2.0)
    assert_kl_close(pairwise_softmax_kl(a, b), kl_reference(a, b))


def test_float64_inputs_use_the_reference(rng):
    a, b = logits(rng, 2, 5, 9, 2.0, torch.float64), logits(rng, 3, 5, 9, 2.0, torch.float64)
    assert dispatch.resolve_impl("cpp", a.device, a.dtype) == "reference"
    assert_kl_close(pairwise_softmax_kl(a, b, impl="cpp"), kl_reference(a, b), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("impl", _cpu_impls())
def test_non_contiguous_inputs(rng, impl):
    a = logits(rng, 9, 3, 17, 2.0).permute(1, 0, 2)  # [3, 9, 17] view of a sample-major stack
    b = logits(rng, 4, 18, 34, 2.0)[:, ::2, ::2]  # strided samples and classes
    assert not a.is_contiguous() and not b.is_contiguous()
    assert_kl_close(pairwise_softmax_kl(a, b, impl=impl), kl_reference(a, b))


@pytest.mark.parametrize("impl", _cpu_impls())
def test_diagonal_is_zero(rng, impl):
    a = logits(rng, 5, 10, 37, 5.0)
    for out in (pairwise_softmax_kl(a, a.clone(), impl=impl), pairwise_softmax_kl(a, None, impl=impl)):
        assert torch.diagonal(out).abs().max() <= 1e-7
        off = out[~torch.eye(5, dtype=torch.bool)]
        assert off.min() > 1e-3  # distinct random rows are far apart
    if impl == "cpp" and native.load():
        assert torch.all(torch.diagonal(pairwise_softmax_kl(a, a.clone(), impl=impl)) == 0)  # direct form: exact


@pytest.mark.parametrize("impl", _cpu_impls())
def test_streaming_equals_one_shot(rng, impl):
    a, b = logits(rng, 3, 20, 23, 2.0), logits(rng, 5, 20, 23, 2.0)
    acc = PairwiseKL(3, 5, 1.3, impl=impl)
    for s, e in [(0, 3), (3, 4), (4, 13), (13, 20)]:
        acc.update(a[:, s:e], b[:, s:e])
    assert acc.count == 20 and acc.sum.dtype == torch.float64 and acc.sum.shape == (3, 5)
    torch.testing.assert_close(acc.compute(), pairwise_softmax_kl(a, b, 1.3, impl=impl), rtol=1e-6, atol=1e-9)
    assert_kl_close(acc.compute(), kl_reference(a, b, 1.3))


@pytest.mark.parametrize("impl", _cpu_impls())
def test_streaming_self_mode_and_additive_shards(rng, impl):
    a = logits(rng, 4, 12, 19, 2.0)
    self_acc, twice, shard1, shard2 = (PairwiseKL(4, None, impl=impl), PairwiseKL(4, 4, impl=impl),
                                       PairwiseKL(4, impl=impl), PairwiseKL(4, impl=impl))
    self_acc.update(a)
    twice.update(a, a)
    shard1.update(a[:, :5])
    shard2.update(a[:, 5:])
    torch.testing.assert_close(self_acc.compute(), twice.compute(), rtol=1e-6, atol=1e-9)
    merged = (shard1.sum + shard2.sum) / (shard1.count + shard2.count)  # what an all_reduce of the state gives
    torch.testing.assert_close(merged.float(), self_acc.compute(), rtol=1e-6, atol=1e-9)
    assert_kl_close(self_acc.compute(), kl_reference(a, None))
    self_acc.reset()
    assert self_acc.count == 0 and torch.all(self_acc.sum == 0)


def test_streaming_errors(rng):
    acc = PairwiseKL(3, 2)
    with pytest.raises(ValueError, match="no samples"):
        acc.compute()
    with pytest.raises(ValueError, match="b_chunk"):
        acc.update(logits(rng, 3, 4, 5))
    with pytest.raises(ValueError, match=r"a_chunk \[3, B, C\]"):
        acc.update(logits(rng, 2, 4, 5), logits(rng, 2, 4, 5))
    with pytest.raises(ValueError, match=r"b_chunk \[2, B, C\]"):
        acc.update(logits(rng, 3, 4, 5), logits(rng, 3, 4, 5))


@pytest.mark.parametrize("impl", _cpu_impls())
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("side", ["a", "b"])
def test_non_finite_logits_raise(rng, impl, bad, side):
    a, b = logits(rng, 3, 4, 11), logits(rng, 2, 4, 11)
    (a if side == "a" else b)[1, 2, 7] = bad
    with pytest.raises(ValueError, match="non-finite"):
        pairwise_softmax_kl(a, b, impl=impl)
    with pytest.raises(ValueError, match="non-finite"):
        PairwiseKL(3, 2, impl=impl).update(a, b)


def test_bad_arguments_raise(rng):
    a = logits(rng, 2, 4, 5)
    with pytest.raises(ValueError, match=r"\[nA, N, C\]"):
        pairwise_softmax_kl(a, logits(rng, 2, 3, 5))
    with pytest.raises(ValueError, match=r"\[nA, N, C\]"):
        pairwise_softmax_kl(a[0], a[0])
    with pytest.raises(ValueError, match="no samples"):
        pairwise_softmax_kl(a[:, :0], a[:, :0])
    with pytest.raises(ValueError, match="at least one class"):
        pairwise_softmax_kl(a[:, :, :0], a[:, :, :0])
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        pairwise_softmax_kl(a.int(), a.int())
    for t in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            pairwise_softmax_kl(a, a, t)
    with pytest.raises(ValueError, match="unknown impl='fast'"):
        pairwise_softmax_kl(a, a, impl="fast")


def test_empty_rows_give_empty_result(rng):
    a = logits(rng, 0, 4, 5)
    assert pairwise_softmax_kl(a, logits(rng, 3, 4, 5)).shape == (0, 3)


def test_env_var_selects_the_implementation(rng, monkeypatch):
    a = logits(rng, 2, 3, 4)
    monkeypatch.setenv("KLAS_KL_IMPL", "reference")
    assert dispatch.resolve_impl(None, a.device, a.dtype) == "reference"
    assert dispatch.resolve_impl("cpp", a.device, a.dtype) in ("cpp", "reference")  # impl= wins over the env var
    monkeypatch.setenv("KLAS_KL_IMPL", "bogus")
    with pytest.raises(ValueError, match="KLAS_KL_IMPL='bogus'"):
        pairwise_softmax_kl(a, a)


def test_wrong_device_impl_falls_back_with_one_warning(rng):
    a = logits(rng, 2, 3, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dispatch._warned.clear()
        assert dispatch.resolve_impl("cuda", a.device, a.dtype) in ("cpp", "reference")
        assert dispatch.resolve_impl("cuda", a.device, a.dtype) in ("cpp", "reference")
    msgs = [str(w.message) for w in caught]
    assert len(msgs) == 1 and "impl 'cuda' unavailable" in msgs[0] and "\n" not in msgs[0]


@pytest.fixture
def extension_missing(monkeypatch):
    """Simulates an install without the compiled extension: importing klas._C fails."""
    monkeypatch.setitem(sys.modules, "klas._C", None)
    monkeypatch.setattr(native, "_state", {"tried": False, "error": None})
    dispatch._warned.clear()
    yield
    dispatch._warned.clear()


def test_fallback_when_extension_missing(rng, monkeypatch, extension_missing):
    monkeypatch.delenv("KLAS_REQUIRE_EXT", raising=False)
    a, b = logits(rng, 3, 6, 10, 2.0), logits(rng, 2, 6, 10, 2.0)
    assert "cpp" not in ops.available_impls("cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = pairwise_softmax_kl(a, b)
    assert_kl_close(out, kl_reference(a, b))
    msgs = [str(w.message) for w in caught if "klas:" in str(w.message)]
    assert len(msgs) == 1 and "not built" in msgs[0] and "using 'reference'" in msgs[0]


def test_require_ext_fails_loudly_when_missing(rng, monkeypatch, extension_missing):
    monkeypatch.setenv("KLAS_REQUIRE_EXT", "1")
    with pytest.raises(RuntimeError, match="KLAS_REQUIRE_EXT=1"):
        pairwise_softmax_kl(logits(rng, 2, 3, 4), logits(rng, 2, 3, 4))


def test_extension_is_built_when_required():
    """Under KLAS_REQUIRE_EXT=1 (make test) the C++ kernel must be the CPU default; otherwise the fallback is."""
    expected = "cpp" if native.load() else "reference"
    if REQUIRE_EXT:
        assert native.load(), f"KLAS_REQUIRE_EXT=1 but {native.unavailable_reason()}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert dispatch.resolve_impl(None, torch.device("cpu"), torch.float32) == expected
    assert "reference" in ops.available_impls() and ("cpp" in ops.available_impls()) == native.load()
