"""Latency of zoo models under onnxruntime: sessions, percentiles after warm-up, and the device they were taken on.

FLOPs rank models on paper; deployment budgets are in milliseconds on one machine with one execution provider,
thread count and batch size. ``klas-runtime profile`` (= ``klas profile``) re-measures a zoo on the host it runs on
and adds that device's figures to the manifest, so one zoo carries latency tables for every machine it was profiled
on.
numpy + onnxruntime only (shared by ``klas.stages.s6_export`` and ``klas_runtime.runtime``).
"""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import time
from functools import lru_cache
from pathlib import Path

import numpy as np

from klas_runtime.errors import ZooError
from klas_runtime.manifest import load_manifest, now, read_model_bytes, save_manifest

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


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
        hint = " (pip install onnxruntime-gpu, or klas[gpu])" if name == PROVIDERS["cuda"] else ""
        raise ZooError(f"execution provider {name} is not available here; onnxruntime has "
                        f"{', '.join(available)}{hint}")
    return name


def short_provider(name: str) -> str:
    return next((k for k, v in PROVIDERS.items() if v == name), name)


@lru_cache(maxsize=None)
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


@lru_cache(maxsize=None)
def _gpu_model() -> str:
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=10, check=True).stdout.strip().splitlines()
            if out:
                return out[0].strip()
        except (subprocess.SubprocessError, OSError):
            pass
    return "unknown gpu"


def device_label(provider: str) -> str:
    """The hardware a provider runs on here, e.g. 'cpu: AMD EPYC 7B13' -- what latency figures are keyed by."""
    return f"gpu: {_gpu_model()}" if provider == PROVIDERS["cuda"] else f"cpu: {_cpu_model()}"


def machine_info() -> dict:
    """Where a measurement was taken (hardware and software, no user data)."""
    return dict(host=platform.node() or "unknown", platform=platform.platform(), cpu=_cpu_model(),
                cores=os.cpu_count() or 0, onnxruntime=_ort().__version__)


def open_session(model: bytes | str | Path, provider: str | None = None, threads: int | None = None):
    """An InferenceSession on ``provider`` (CPU as fallback for ops CUDA lacks) with ``threads`` intra-op threads
    (0 or None: onnxruntime's default, all cores)."""
    ort = _ort()
    name = provider_name(provider)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.inter_op_num_threads = 1
    if threads:
        opts.intra_op_num_threads = int(threads)
    opts.log_severity_level = 3
    providers = [name] if name == PROVIDERS["cpu"] else [name, PROVIDERS["cpu"]]
    src = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(src, sess_options=opts, providers=providers)


def measure_latency(session, batch: int = 1, warmup: int = 20, runs: int = 200, seed: int = 0) -> dict:
    """Per-call wall time of ``session.run`` on a fixed random batch: p50/p90/p99/mean in ms after ``warmup`` calls.

    The input is random normal data of the model's declared shape: latency of these dense networks does not
    depend on the values, and a fixed array keeps allocation out of the timed region.
    """
    if batch < 1 or runs < 1 or warmup < 0:
        raise ZooError(f"latency: batch ({batch}) and runs ({runs}) must be >= 1 and warmup ({warmup}) >= 0")
    inp = session.get_inputs()[0]
    shape = [batch] + [int(d) for d in inp.shape[1:]]
    x = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
    feed = {inp.name: x}
    for _ in range(warmup):
        session.run(None, feed)
    times = np.empty(runs, dtype=np.float64)
    for k in range(runs):
        t0 = time.perf_counter_ns()
        session.run(None, feed)
        times[k] = (time.perf_counter_ns() - t0) / 1e6
    p50, p90, p99 = np.percentile(times, [50, 90, 99])
    return dict(p50_ms=float(p50), p90_ms=float(p90), p99_ms=float(p99), mean_ms=float(times.mean()))


def latency_record(model: bytes | str | Path, provider: str, threads: int, batch: int, warmup: int,
                   runs: int) -> dict:
    """One manifest latency record: figures plus the (device, provider, threads, batch) key and when/where."""
    name = provider_name(provider)
    session = open_session(model, name, threads)
    stats = measure_latency(session, batch, warmup, runs)
    return dict(device=device_label(name), provider=name, threads=int(threads), batch=int(batch), **stats,
                warmup=int(warmup), runs=int(runs), measured_at=now(), machine=machine_info())


def merge_latency(records: list[dict], new: dict) -> list[dict]:
    """Replace the record with the same (device, provider, threads, batch) key, or append."""
    key = ("device", "provider", "threads", "batch")
    kept = [r for r in records if tuple(r[k] for k in key) != tuple(new[k] for k in key)]
    return kept + [new]


def profile_zoo(zoo_dir: Path | str, providers: list[str] | None = None, threads: list[int] | None = None,
                batches: list[int] | None = None, warmup: int = 20, runs: int = 200,
                models: list[str] | None = None, progress: bool = True) -> dict:
    """Measure every model of a zoo on this machine and rewrite its manifest atomically with the new figures."""
    manifest = load_manifest(zoo_dir, verify_files=True)
    names = [provider_name(p) for p in (providers or [None])]
    threads, batches = threads or [1], batches or [1]
    if any(t < 0 for t in threads) or any(b < 1 for b in batches):
        raise ZooError(f"--threads {threads} must be >= 0 and --batch {batches} >= 1")
    chosen = [m for m in manifest["models"] if models is None or m["name"] in models]
    if models is not None and len(chosen) != len(set(models)):
        known = ", ".join(m["name"] for m in manifest["models"])
        raise ZooError(f"{zoo_dir}: unknown model in {models}; models: {known}")
    jobs = [(m, p, t, b) for m in chosen for p in names for t in threads for b in batches]
    for entry, p, t, b in _progress(jobs, progress):
        rec = latency_record(read_model_bytes(zoo_dir, entry), p, t, b, warmup, runs)
        entry["latency"] = merge_latency(entry["latency"], rec)
    save_manifest(manifest, zoo_dir)
    return manifest


def _progress(jobs: list, show: bool):
    """A tqdm bar where tqdm is installed (klas has it; the runtime alone need not), else the plain list."""
    if show:
        try:
            from tqdm import tqdm
        except ImportError:
            return jobs
        return tqdm(jobs, desc="profile", unit="run")
    return jobs
