"""The one record of where a figure was measured, for every stage of klas and the runtime alike.

numpy-free and torch-free: it reports torch (version, CPU threads, CUDA device) only when the calling process has
already imported it, so the runtime never pulls torch in.
"""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=None)
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


@lru_cache(maxsize=None)
def gpu_model() -> str:
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=10, check=True).stdout.strip().splitlines()
            if out:
                return out[0].strip()
        except (subprocess.SubprocessError, OSError):
            pass
    return "unknown gpu"


def machine_info() -> dict:
    """Hardware and software of this process (no user data): host, platform, CPU model, cores, and the versions of
    onnxruntime and torch where the process has loaded them (torch: also its CPU threads and CUDA device)."""
    rec = dict(host=platform.node() or "unknown", platform=platform.platform(), cpu=cpu_model(),
               cores=os.cpu_count() or 0)
    ort = sys.modules.get("onnxruntime")
    if ort is not None:
        rec["onnxruntime"] = getattr(ort, "__version__", "unknown")
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "get_num_threads"):
        rec.update(torch=torch.__version__, threads=torch.get_num_threads(),
                   device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
    return rec
