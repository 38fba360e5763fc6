"""Every implementation is a registered torch op with a fake kernel: torch.library.opcheck checks the schema, the
autograd registration, the fake (meta) kernel against the real one, and tracing under torch.compile's AOT
dispatcher with dynamic shapes."""
from __future__ import annotations

import warnings

import pytest
import torch

from klas.ops import dispatch, native
from test_ops_common import logits



def _op(impl: str, monkeypatch) -> torch._ops.OpOverload:
    """The torch op the dispatcher runs for ``impl`` on CPU tensors (its fallback where it cannot run here)."""
    if impl == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        name = dispatch.resolve_impl(impl, torch.device("cpu"), torch.float32)
    return {"reference": torch.ops.klas.pairwise_kl_sum_reference.default,
            "triton": torch.ops.klas.pairwise_kl_sum_triton.default,
            "cpp": torch.ops.klas.pairwise_kl_sum.default if native.load() else None}[name]


@pytest.mark.parametrize("impl", ["reference", "cpp", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(rng, monkeypatch, impl, dtype):
    op = _op(impl, monkeypatch)
    a, b = logits(rng, 3, 5, 11, 2.0, dtype), logits(rng, 2, 5, 11, 2.0, dtype)
    for args in ((a, b, 1.0), (a, None, 0.7), (a.permute(1, 0, 2).contiguous().permute(1, 0, 2), b, 2.0)):
        torch.library.opcheck(op, args)
    fake = torch._subclasses.fake_tensor.FakeTensorMode()
    with fake:
        out = op(fake.from_tensor(a), fake.from_tensor(b), 1.0)
    assert out.shape == (3, 2) and out.dtype == torch.float64
