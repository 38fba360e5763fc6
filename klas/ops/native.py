"""The compiled extension ``klas._C`` (csrc/): loaded lazily, with the fake kernel of ``klas::pairwise_kl_sum``.

The extension is optional (``pip install`` without a compiler, or ``KLAS_NO_EXT=1``): ``load()`` never raises, it
records why the extension is missing so that the dispatcher can fall back with a one-line warning.
"""
from __future__ import annotations

import importlib
import sys

import torch

from klas.ops.reference import pairwise_kl_sum_fake

OP_NAME = "klas::pairwise_kl_sum"
_state: dict = {"tried": False, "error": None}
_fake_registered = False


def load() -> bool:
    """Import ``klas._C`` once (registering its torch op); True when it is usable."""
    if not _state["tried"]:
        _state["tried"] = True
        try:
            importlib.import_module("klas._C")
        except (ImportError, OSError) as e:  # not built, or built against another torch
            _state["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        else:
            _register_fake()
    return _state["error"] is None


def _register_fake() -> None:
    global _fake_registered
    if not _fake_registered:
        torch.library.register_fake(OP_NAME)(pairwise_kl_sum_fake)
        _fake_registered = True


def unavailable_reason() -> str | None:
    """Why the extension cannot be used (None when it can)."""
    return None if load() else _state["error"]


def has_kernel(device_type: str) -> bool:
    """Whether ``klas::pairwise_kl_sum`` has a kernel for this device type ("cpu" or "cuda")."""
    if not load():
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(OP_NAME, key)


def pairwise_kl_sum_native(a: torch.Tensor, b: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """float64 [nA, nB] sum over samples, by the C++ (CPU tensors) or CUDA (CUDA tensors) kernel."""
    return torch.ops.klas.pairwise_kl_sum(a, b, temperature)


# The C++ library names this module as the home of its fake kernel (set_python_module): torch imports it when the op
# meets a fake tensor, and the import alone must then register the kernel.
if sys.modules.get("klas._C") is not None:
    _register_fake()
