"""Timing one model, or a cascade of two, under onnxruntime: warm-up, then percentiles of timed calls, as one
manifest latency record of the device it ran on. The low level of ``klas_runtime.profile`` (image models and
cascades) and ``klas_runtime.decoder_profile`` (decoders); it imports no runtime entry.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import numpy as np

from klas_runtime.classify import deferred
from klas_runtime.errors import ZooError
from klas_runtime.machine import machine_info
from klas_runtime.manifest import now
from klas_runtime.session import device_label, open_session, provider_name


def _check_counts(batch: int, warmup: int, runs: int) -> None:
    if batch < 1 or runs < 1 or warmup < 0:
        raise ZooError(f"latency: batch ({batch}) and runs ({runs}) must be >= 1 and warmup ({warmup}) >= 0")


def _time_calls(call: Callable[[int], object], warmup: int, runs: int) -> tuple[dict, list]:
    """``call(k)`` for k = 0 .. warmup - 1 untimed, then ``runs`` timed calls (k = warmup ...): p50/p90/p99/mean
    wall time in ms and what the timed calls returned."""
    for k in range(warmup):
        call(k)
    times, results = np.empty(runs, dtype=np.float64), []
    for k in range(runs):
        t0 = time.perf_counter_ns()
        results.append(call(warmup + k))
        times[k] = (time.perf_counter_ns() - t0) / 1e6
    p50, p90, p99 = np.percentile(times, [50, 90, 99])
    return dict(p50_ms=float(p50), p90_ms=float(p90), p99_ms=float(p99), mean_ms=float(times.mean())), results


def _record(name: str, threads: int, batch: int, stats: dict, warmup: int, runs: int) -> dict:
    """A manifest latency record: the (device, provider, threads, batch) key, the figures, when and where."""
    return dict(device=device_label(name), provider=name, threads=int(threads), batch=int(batch), **stats,
                warmup=int(warmup), runs=int(runs), measured_at=now(), machine=machine_info())


def measure_latency(session, batch: int = 1, warmup: int = 20, runs: int = 200, seed: int = 0) -> dict:
    """Per-call wall time of ``session.run`` on a fixed random batch: p50/p90/p99/mean in ms after ``warmup`` calls.

    The input is random normal data of the model's declared shape: latency of these dense networks does not
    depend on the values, and a fixed array keeps allocation out of the timed region.
    """
    _check_counts(batch, warmup, runs)
    inp = session.get_inputs()[0]
    shape = [batch] + [int(d) for d in inp.shape[1:]]
    feed = {inp.name: np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)}

    def call(k: int) -> None:
        session.run(None, feed)

    return _time_calls(call, warmup, runs)[0]


def latency_record(model: bytes | str | Path, provider: str, threads: int, batch: int, warmup: int,
                   runs: int) -> dict:
    """One manifest latency record: figures plus the (device, provider, threads, batch) key and when/where."""
    name = provider_name(provider)
    stats = measure_latency(open_session(model, name, threads), batch, warmup, runs)
    return _record(name, threads, batch, stats, warmup, runs)


RANDOM_NOTE = ("random normal inputs: their deferral rate is not that of real data, so neither is this latency; "
               "profile with real images (klas profile --images ..., or inputs=) for figures to budget on")
RANDOM_POOL = 64  # random samples a cascade is timed on (cycled), so the deferral varies between calls as on data


def _batches(x: np.ndarray, batch: int, limit: int) -> list[np.ndarray]:
    """Consecutive batches of ``x`` (wrapping around), at most ``limit`` of them, contiguous float32."""
    n = max(1, min(math.ceil(len(x) / batch), limit))
    return [np.ascontiguousarray(np.take(x, np.arange(k * batch, (k + 1) * batch) % len(x), axis=0),
                                 dtype=np.float32) for k in range(n)]


def measure_cascade_latency(first, second, threshold: float, batch: int = 1, warmup: int = 20, runs: int = 200,
                            inputs: np.ndarray | None = None, seed: int = 0) -> dict:
    """Per-call wall time of a cascade: ``first`` on the batch, softmax, then ``second`` on the samples whose max
    probability is below ``threshold`` (as ``CascadeChoice.predict`` does). Calls cycle through consecutive batches
    of ``inputs`` (normalized [N, C, H, W]), or of a fixed pool of random normal samples when None; returns
    p50/p90/p99/mean ms and the fraction of samples deferred during the timed calls."""
    _check_counts(batch, warmup, runs)
    inp, inp2 = first.get_inputs()[0], second.get_inputs()[0]
    out, out2 = [first.get_outputs()[0].name], [second.get_outputs()[0].name]
    chw = [int(d) for d in inp.shape[1:]]
    if inputs is None:
        inputs = np.random.default_rng(seed).standard_normal([max(batch, RANDOM_POOL)] + chw, dtype=np.float32)
    inputs = np.asarray(inputs)
    if inputs.ndim != 4 or list(inputs.shape[1:]) != chw or len(inputs) < 1:
        raise ZooError(f"cascade latency: inputs of shape {tuple(inputs.shape)} do not match the members' input "
                       f"[batch, {', '.join(map(str, chw))}]")
    batches = _batches(inputs, batch, warmup + runs)

    def call(k: int) -> int:
        x = batches[k % len(batches)]
        sent = deferred(first.run(out, {inp.name: x})[0], threshold)
        if sent.any():
            second.run(out2, {inp2.name: x[sent]})
        return int(sent.sum())

    stats, sent = _time_calls(call, warmup, runs)
    return dict(**stats, deferral=sum(sent) / (runs * batch))


def cascade_latency_record(first: bytes | str | Path, second: bytes | str | Path, threshold: float, provider: str,
                           threads: int, batch: int, warmup: int, runs: int, inputs: np.ndarray | None = None,
                           inputs_label: str | None = None) -> dict:
    """One manifest latency record of a cascade (the members' ONNX bytes or paths, cheaper first): the same fields
    as a model's, plus ``inputs`` (``"random"``, or ``inputs_label`` / "N provided images" for real ones) and the
    ``deferral`` seen while timing; a random-input record carries a ``note`` that its deferral is not real data's."""
    name = provider_name(provider)
    s1, s2 = open_session(first, name, threads), open_session(second, name, threads)
    rec = _record(name, threads, batch, measure_cascade_latency(s1, s2, threshold, batch, warmup, runs, inputs),
                  warmup, runs)
    if inputs is None:
        rec.update(inputs="random", note=RANDOM_NOTE)
    else:
        rec["inputs"] = inputs_label or f"{len(inputs)} provided images"
    return rec


# --- decoders ---------------------------------------------------------------------------------------------------------
