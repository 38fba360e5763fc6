"""onnxruntime sessions: execution providers, the hardware they run on here, and sessions from verified bytes.

Shared by picking (``klas_runtime.runtime``), latency measurement (``klas_runtime.profile``) and the exporter;
numpy-free, and onnxruntime is imported only when a session or the provider list is asked for.
"""
from __future__ import annotations

from pathlib import Path

from klas_runtime.errors import ZooError, first_line
from klas_runtime.machine import cpu_model, gpu_model

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
GPU_PROVIDERS = (PROVIDERS["cuda"], PROVIDERS["tensorrt"])


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise ZooError("onnxruntime is not installed: pip install onnxruntime (onnxruntime-gpu for CUDA)") from None
    return onnxruntime


def provider_name(device: str | None) -> str:
    """'cpu' / 'cuda' / a full provider name -> the onnxruntime provider; None picks CUDA when present."""
    available = _ort().get_available_providers()
    if device is None:
        return PROVIDERS["cuda"] if PROVIDERS["cuda"] in available else PROVIDERS["cpu"]
    name = PROVIDERS.get(device.lower(), device)
    if name not in PROVIDERS.values():
        raise ZooError(f"--device/--provider {device!r}: expected one of {', '.join(PROVIDERS)} "
                        f"(or {', '.join(PROVIDERS.values())})")
    if name not in available:
        hint = " (pip install onnxruntime-gpu, or klas[gpu])" if name in GPU_PROVIDERS else ""
        raise ZooError(f"execution provider {name} is not available here; onnxruntime has "
                        f"{', '.join(available)}{hint}")
    return name


def short_provider(name: str) -> str:
    return next((k for k, v in PROVIDERS.items() if v == name), name)


def device_label(provider: str) -> str:
    """The hardware a provider runs on here, e.g. 'cpu: AMD EPYC 7B13' -- what latency figures are keyed by."""
    return f"gpu: {gpu_model()}" if provider in GPU_PROVIDERS else f"cpu: {cpu_model()}"


DEFAULT_THREADS: int | None = None  # intra-op threads of a session that names none (a klas worker process sets 1)


def open_session(model: bytes | str | Path, provider: str | None = None, threads: int | None = None):
    """An InferenceSession on ``provider`` (CPU as fallback for ops CUDA lacks) with ``threads`` intra-op threads
    (0 or None: ``DEFAULT_THREADS``, unset: onnxruntime's default, all cores)."""
    ort = _ort()
    threads = threads or DEFAULT_THREADS
    name = provider_name(provider)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.inter_op_num_threads = 1
    if threads:
        opts.intra_op_num_threads = int(threads)
    opts.log_severity_level = 3
    # NOTE: TensorRT falls back to CUDA, then CPU, for what it cannot build (int8 QDQ and fp16 graphs included)
    fallback = {PROVIDERS["cpu"]: [], PROVIDERS["cuda"]: [PROVIDERS["cpu"]],
                PROVIDERS["tensorrt"]: [PROVIDERS["cuda"], PROVIDERS["cpu"]]}[name]
    providers = [name] + [p for p in fallback if p in ort.get_available_providers()]
    src = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(src, sess_options=opts, providers=providers)


def open_model(data: bytes, where: str, provider: str | None = None, threads: int | None = None):
    """``open_session`` on a model's verified bytes; onnxruntime's own errors (InvalidProtobuf, Fail, ...) become
    one ZooError line naming ``where`` (the file)."""
    try:
        return open_session(data, provider, threads)
    except ZooError:
        raise
    except Exception as e:
        raise ZooError(f"{where}: not a valid ONNX model for onnxruntime ({first_line(e)})") from None
