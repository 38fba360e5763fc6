"""The float64 NumPy reference that every klas.ops implementation is tested against, and tests of that reference.

The reference is written from the definition (direct form, per pair), independently of klas.ops; it is itself
checked against a closed form and a scalar loop so that the implementation tests rest on something verified.
"""
from __future__ import annotations

import math
import os

# Triton's interpreter only works if TRITON_INTERPRET=1 is set before Triton is first imported (its standard library
# is built at import). `make test` sets it for the whole run; this covers running the ops tests on their own.
os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest
import torch

FP32_RTOL, FP32_ATOL = 1e-4, 1e-6
HALF_RTOL = 1e-2


def _log_softmax(x: np.ndarray) -> np.ndarray:
    y = x - x.max(axis=-1, keepdims=True)
    return y - np.log(np.exp(y).sum(axis=-1, keepdims=True))


def kl_reference(a: torch.Tensor, b: torch.Tensor | None, temperature: float = 1.0) -> np.ndarray:
    """mean_n KL(softmax(a[i, n] / T) || softmax(b[j, n] / T)) in float64 on the tensors' (rounded) values."""
    a64 = a.detach().cpu().double().numpy() / temperature
    b64 = a64 if b is None else b.detach().cpu().double().numpy() / temperature
    la, lb = _log_softmax(a64), _log_softmax(b64)
    out = np.empty((a64.shape[0], b64.shape[0]))
    for i in range(a64.shape[0]):  # one row of pairs at a time keeps memory at nB * N * C
        out[i] = (np.exp(la[i])[None] * (la[i][None] - lb)).sum(axis=-1).mean(axis=-1)
    return out


def assert_kl_close(got: torch.Tensor, ref: np.ndarray, rtol: float = FP32_RTOL, atol: float = FP32_ATOL) -> None:
    """|got - ref| <= atol + rtol |ref| everywhere, and never negative beyond atol (KL >= 0)."""
    g = got.detach().cpu().double().numpy()
    assert g.shape == ref.shape, (g.shape, ref.shape)
    excess = np.abs(g - ref) - (atol + rtol * np.abs(ref))
    worst = np.unravel_index(np.argmax(excess), excess.shape)
    assert excess.max() <= 0, f"at {worst}: got {g[worst]!r}, reference {ref[worst]!r} (beyond by {excess.max():.3g})"
    assert g.min() >= -atol, f"negative KL {g.min()!r}"


def logits(rng: torch.Generator, n: int, samples: int, classes: int, scale: float = 1.0,
           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (torch.randn(n, samples, classes, generator=rng, dtype=torch.float64) * scale).to(dtype)


def test_reference_matches_two_class_closed_form(rng):
    # softmax([0, x]) = (1 - s(x), s(x)) with s the logistic function; KL of two Bernoullis in closed form.
    x = torch.randn(1, 5, 1, generator=rng, dtype=torch.float64) * 3
    y = torch.randn(1, 5, 1, generator=rng, dtype=torch.float64) * 3
    a, b = torch.cat([torch.zeros_like(x), x], -1), torch.cat([torch.zeros_like(y), y], -1)
    p, q = torch.sigmoid(x).flatten().tolist(), torch.sigmoid(y).flatten().tolist()
    want = sum(pi * math.log(pi / qi) + (1 - pi) * math.log((1 - pi) / (1 - qi)) for pi, qi in zip(p, q)) / 5
    assert kl_reference(a, b)[0, 0] == pytest.approx(want, rel=1e-12, abs=1e-15)


def test_reference_matches_scalar_loop(rng):
    a, b, t = logits(rng, 2, 3, 4, 2.0), logits(rng, 3, 3, 4, 2.0), 0.7
    ref = kl_reference(a, b, t)
    for i in range(2):
        for j in range(3):
            total = 0.0
            for n in range(3):
                za = sum(math.exp(v / t) for v in a[i, n].tolist())
                zb = sum(math.exp(v / t) for v in b[j, n].tolist())
                for va, vb in zip(a[i, n].tolist(), b[j, n].tolist()):
                    p, q = math.exp(va / t) / za, math.exp(vb / t) / zb
                    total += p * math.log(p / q)
            assert ref[i, j] == pytest.approx(total / 3, rel=1e-10)


def test_assert_kl_close_rejects_errors(rng):
    ref = kl_reference(logits(rng, 2, 4, 5), logits(rng, 3, 4, 5))
    assert_kl_close(torch.from_numpy(ref), ref)
    with pytest.raises(AssertionError):
        assert_kl_close(torch.from_numpy(ref * (1 + 3 * FP32_RTOL) + 2 * FP32_ATOL), ref)
    with pytest.raises(AssertionError):
        assert_kl_close(torch.from_numpy(ref - ref - 2 * FP32_ATOL), np.zeros_like(ref) - 2 * FP32_ATOL)
