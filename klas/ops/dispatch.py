"""Which implementation computes the all-pairs softmax KL, and the one checked entry point that runs it.

Order of preference per device: CUDA tensors triton > cuda > reference; CPU tensors cpp > reference. ``impl=`` or
the environment variable ``KLAS_KL_IMPL`` names one instead. An implementation that cannot run here (extension not
built, no Triton, wrong device) falls back to the next available one with a one-line warning, once per reason;
``KLAS_REQUIRE_EXT=1`` turns a missing extension into an error (CI builds it and must test it).
float64 logits always use the float64 reference: the fused kernels accumulate in float32.
"""
from __future__ import annotations

import math
import os
import warnings
from typing import Callable

import torch

from klas.ops import native, triton_op
from klas.ops.reference import pairwise_kl_sum_reference_op

IMPLS = ("reference", "cpp", "cuda", "triton")
PREFERENCE = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpp", "reference")}
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_warned: set[str] = set()


def _ops() -> dict[str, Callable]:
    return {"reference": pairwise_kl_sum_reference_op, "cpp": native.pairwise_kl_sum_native,
            "cuda": native.pairwise_kl_sum_native, "triton": triton_op.pairwise_kl_sum_triton_op}


def unavailable_reason(impl: str, device_type: str) -> str | None:
    """Why ``impl`` cannot run on tensors of this device type, or None when it can."""
    if impl == "reference":
        return None
    if impl in ("cpp", "cuda"):
        want = "cpu" if impl == "cpp" else "cuda"
        if device_type != want:
            return f"it runs on {want} tensors, not {device_type}"
        if not native.load():
            return f"C++ extension klas._C not built: {native.unavailable_reason()}"
        return None if native.has_kernel(want) else "klas._C was built without CUDA kernels"
    if impl == "triton":
        return triton_op.unavailable_reason(device_type)
    raise ValueError(f"pairwise_softmax_kl: unknown impl {impl!r}; expected one of {', '.join(IMPLS)}")


def available_impls(device: torch.device | str | None = None) -> list[str]:
    """Implementations usable on ``device`` ("cpu", "cuda"), or on any device of this machine when None."""
    types = [torch.device(device).type] if device is not None else ["cpu"] + (["cuda"] if torch.cuda.is_available()
                                                                               else [])
    return [i for i in IMPLS if any(unavailable_reason(i, t) is None for t in types)]


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def resolve_impl(impl: str | None, device: torch.device, dtype: torch.dtype) -> str:
    """The implementation to run: ``impl``, else $KLAS_KL_IMPL, else the device's best; with fallbacks."""
    requested = impl or os.environ.get("KLAS_KL_IMPL") or None
    if requested is not None and requested not in IMPLS:
        if impl:
            raise ValueError(f"pairwise_softmax_kl: unknown impl={requested!r}; expected one of {', '.join(IMPLS)}")
        from klas.errors import BadSetting  # the environment is user input: one line in the CLI

        raise BadSetting(f"KLAS_KL_IMPL={requested!r}: expected one of {', '.join(IMPLS)} (or unset: the device's "
                         f"best)")
    if dtype == torch.float64:
        return "reference"
    order = PREFERENCE.get(device.type, ("reference",))
    wanted = requested or order[0]
    reason = unavailable_reason(wanted, device.type)
    if reason is None:
        return wanted
    if wanted in ("cpp", "cuda") and os.environ.get("KLAS_REQUIRE_EXT") == "1" and not native.load():
        raise RuntimeError(f"pairwise_softmax_kl: KLAS_REQUIRE_EXT=1 but {reason}")
    fallback = next(i for i in order + ("reference",) if i != wanted and unavailable_reason(i, device.type) is None)
    _warn_once(f"klas: pairwise_softmax_kl impl {wanted!r} unavailable ({reason}); using {fallback!r}")
    return fallback


def check_inputs(a: torch.Tensor, b: torch.Tensor | None, temperature: float
                 ) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """Validates shapes, dtypes, devices and temperature; returns (a, b, T) with a common dtype."""
    if not isinstance(a, torch.Tensor) or (b is not None and not isinstance(b, torch.Tensor)):
        raise ValueError("pairwise_softmax_kl: a and b must be tensors")
    shape_b = tuple(a.shape) if b is None else tuple(b.shape)
    if a.dim() != 3 or len(shape_b) != 3 or a.shape[1:] != shape_b[1:]:
        raise ValueError(f"pairwise_softmax_kl: expected a [nA, N, C] and b [nB, N, C] logits, got {tuple(a.shape)} "
                         f"and {shape_b}")
    if a.shape[2] == 0:
        raise ValueError("pairwise_softmax_kl: logits need at least one class (C = 0)")
    for t in (a, b):
        if t is not None and t.dtype not in _DTYPES + (torch.float64,):
            raise ValueError(f"pairwise_softmax_kl: expected float32, float16 or bfloat16 logits, got {t.dtype}")
    if b is not None and b.device != a.device:
        raise ValueError(f"pairwise_softmax_kl: a is on {a.device} but b is on {b.device}")
    if b is not None and b.dtype != a.dtype:
        common = torch.promote_types(a.dtype, b.dtype)
        a, b = a.to(common), b.to(common)
    try:
        t = float(temperature)
    except (TypeError, ValueError):
        raise ValueError(f"pairwise_softmax_kl: temperature must be a number, got {temperature!r}") from None
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"pairwise_softmax_kl: temperature must be a positive finite number, got {temperature!r}")
    return a, b, t


def pairwise_kl_sum(a: torch.Tensor, b: torch.Tensor | None, temperature: float = 1.0, impl: str | None = None
                    ) -> torch.Tensor:
    """Sum over samples of KL(softmax(a[i,n]/T) || softmax(b[j,n]/T)): float64 [nA, nB] on a's device.

    ``b=None`` scores a against itself (its rows are read and normalized once). Raises ValueError for bad shapes,
    dtypes or temperature, and for non-finite logits.
    """
    a, b, t = check_inputs(a, b, temperature)
    n_b = a.shape[0] if b is None else b.shape[0]
    if a.shape[0] == 0 or n_b == 0 or a.shape[1] == 0:
        return torch.zeros(a.shape[0], n_b, dtype=torch.float64, device=a.device)
    name = resolve_impl(impl, a.device, a.dtype)
    out = _ops()[name](a, b, t)
    # Non-finite logits always make their rows' KL inf or nan (see docs/kernels.md), so checking the small result
    # replaces a second pass over the inputs.
    if not bool(torch.isfinite(out).all()):
        raise ValueError("pairwise_softmax_kl: non-finite logits (inf or nan) in the input, or logits / temperature "
                         "overflowing float32")
    return out
