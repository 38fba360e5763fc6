"""klas-runtime: the torch-free side of klas -- zoo manifests, verification, budget picks, prediction, latency.

numpy + onnxruntime (+ Pillow for images) only; nothing here imports torch, timm, matplotlib or ``klas``, so it
installs alone on deployment hosts (``pip install ./runtime``). The full ``klas`` package depends on it.
"""
__version__ = "0.1.0"

from klas_runtime.errors import ZooError
from klas_runtime import decoder_schema  # noqa: E402,F401  (registers the decoder zoos' schema: runtime_entry "generate")

__all__ = ["ZooError", "__version__"]
