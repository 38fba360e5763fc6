"""klas: KL-divergence based Anchor Stitching, packaged for deployment.

family -> probes -> scores -> selection -> finetune -> evaluation -> export -> runtime
"""
__version__ = "0.1.0"

from klas.errors import KlasError

__all__ = ["KlasError", "create_family", "list_families", "__version__"]

# NOTE: torch-using names load on first use (PEP 562), so that ``import klas.runtime`` -- numpy + onnxruntime only,
# for deployment hosts without torch -- does not pull torch in through this package's __init__.
_LAZY = {"create_family": "klas.families", "list_families": "klas.families"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'klas' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
