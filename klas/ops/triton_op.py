"""The Triton kernel (kernels/pairwise_kl.py) as the torch op ``klas::pairwise_kl_sum_triton``.

The kernels package (``klas.kernels``, installed from kernels/) and Triton are imported on first call only: importing
klas never needs a GPU or Triton. On CPU tensors the op runs only under Triton's interpreter (``TRITON_INTERPRET=1``),
which is how its tests run in CI.
"""
from __future__ import annotations

import importlib.util
import os
import sys

import torch

from klas.ops.reference import pairwise_kl_sum_fake


def unavailable_reason(device_type: str) -> str | None:
    """Why the Triton kernel cannot run on this device type (None when it can)."""
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed"
    if importlib.util.find_spec("klas.kernels") is None:
        return "the kernels package klas.kernels (kernels/) is not importable; reinstall klas with `pip install -e .`"
    if device_type == "cuda":
        return None if torch.cuda.is_available() else "CUDA is not available"
    if device_type == "cpu":
        interpret = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
        if not interpret:
            return "Triton runs CPU tensors only under TRITON_INTERPRET=1"
        return None if _imported_for_interpreter() else "TRITON_INTERPRET=1 was set after Triton was imported"
    return f"Triton does not support {device_type} tensors"


def _imported_for_interpreter() -> bool:
    """Triton builds its standard library (tl.sum, tl.zeros, ...) for the interpreter only if TRITON_INTERPRET was
    set when it was first imported; a kernel interpreted later would fail inside tl.sum."""
    lang = sys.modules.get("triton.language")
    if lang is None:
        return True  # not imported yet: it will be, in interpreter mode
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(lang.zeros, InterpretedFunction)


@torch.library.custom_op("klas::pairwise_kl_sum_triton", mutates_args=())
def pairwise_kl_sum_triton_op(a: torch.Tensor, b: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """float64 [nA, nB] sum over samples of KL(softmax(a[i,n]/T) || softmax(b[j,n]/T)), fused Triton kernel."""
    from klas.kernels.pairwise_kl import pairwise_kl_sum_triton

    return pairwise_kl_sum_triton(a, b, temperature)


pairwise_kl_sum_triton_op.register_fake(pairwise_kl_sum_fake)
