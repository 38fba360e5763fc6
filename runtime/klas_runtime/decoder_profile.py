"""Decoders timed as they are used: time to first token over a sweep of prompt lengths, milliseconds per output
token over the decode steps, tokens per second, and the peak memory of a fresh process -- one manifest latency
record per (provider, threads, batch), through ``klas_runtime.generate.Decoder`` on random in-vocabulary ids. The
``generate`` runtime entry's ``profile`` hook (``klas-runtime profile`` on a decoder zoo) and the exporter use it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from klas_runtime.errors import ZooError
from klas_runtime.manifest import read_model_bytes, sha256_bytes
from klas_runtime.session import open_session, provider_name
from klas_runtime.timing import _check_counts, _record

PROMPT_LENGTHS = (16, 64, 128)  # the default sweep of time to first token
MEMPROBE_TIMEOUT_S = 900


def _positive_ints(values, flag: str) -> list[int]:
    values = list(values)
    if not values or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1 for v in values):
        raise ZooError(f"{flag} {values}: expected one or more integers >= 1")
    return sorted(set(int(v) for v in values))


def generation_latency_record(model: bytes | str | Path, entry: dict, provider: str, threads: int, batch: int, *,
                              generation: dict | None = None, prompt_lengths=PROMPT_LENGTHS, prompt_tokens: int = 64,
                              new_tokens: int = 32, warmup: int = 1, runs: int = 5, seed: int = 0,
                              memory: bool = True, model_file: str | Path | None = None) -> dict:
    """One manifest latency record of a decoder entry (``model``: its ONNX bytes or path) on this machine, timed
    through ``klas_runtime.generate.Decoder`` on random in-vocabulary token ids (no stop ids), greedy:

    - ``ttft_ms``: per swept prompt length (``prompt_lengths`` that leave room for one new token in
      ``generation.max_context``; the others are skipped), the p50 over ``runs`` of prefill + first token;
    - ``p50_ms`` / ``p90_ms`` / ``p99_ms`` / ``mean_ms``: per output token, over all ``new_tokens`` decode steps
      (forward pass with the cache + pick) of ``runs`` generations after a prompt of ``prompt_tokens`` (lowered to
      fit the context; the record's ``prompt_tokens`` says what was used);
    - ``tokens_per_s``: ``batch * new_tokens`` over the median decode time of one generation;
    - ``peak_memory_mb`` (``memory``): ``measure_peak_memory`` at the largest swept length, in a fresh process.

    ``warmup`` untimed generations come first. The record has the image records' key and fields (device,
    provider, threads, batch, warmup, runs, measured_at, machine) so merging and picking treat both alike."""
    from klas_runtime.generate import Decoder, sample

    _check_counts(batch, warmup, runs)
    lengths = _positive_ints(prompt_lengths, "--prompt-lengths")
    new_tokens, prompt_tokens = (_positive_ints([new_tokens], "--new-tokens")[0],
                                 _positive_ints([prompt_tokens], "--prompt-tokens")[0])
    gen = dict(generation or {})
    ctx = gen.get("max_context")
    fit = [n for n in lengths if ctx is None or n + 1 <= ctx]
    if not fit:
        raise ZooError(f"--prompt-lengths {lengths}: none leaves room for a new token in the models' context "
                       f"(generation.max_context {ctx})")
    decode_at = prompt_tokens if ctx is None else min(prompt_tokens, ctx - new_tokens - 1)
    if decode_at < 1:
        raise ZooError(f"--new-tokens {new_tokens}: one prompt token + {new_tokens + 1} generated do not fit the "
                       f"models' context (generation.max_context {ctx})")
    name = provider_name(provider)
    decoder = Decoder(open_session(model, name, threads), entry, {**gen, "eos_token_id": []})
    rng = np.random.default_rng(seed)
    vocab = decoder.vocab

    def prompts(n: int) -> list[list[int]]:
        return rng.integers(0, vocab, size=(batch, n)).tolist()

    ttft: dict[int, list[float]] = {n: [] for n in fit}
    steps, totals = [], []
    for k in range(warmup + runs):
        timed = k >= warmup
        for n in fit:
            ids = prompts(n)
            t0 = time.perf_counter_ns()
            sample(decoder.prefill(ids).logits, rng)
            if timed:
                ttft[n].append((time.perf_counter_ns() - t0) / 1e6)
        state = decoder.prefill(prompts(decode_at))
        token = sample(state.logits, rng)
        total = 0.0
        for _ in range(new_tokens):
            t0 = time.perf_counter_ns()
            decoder.advance(state, token)
            token = sample(state.logits, rng)
            dt = (time.perf_counter_ns() - t0) / 1e6
            if timed:
                steps.append(dt)
                total += dt
        if timed:
            totals.append(total)
    times = np.asarray(steps)
    p50, p90, p99 = np.percentile(times, [50, 90, 99])
    stats = dict(p50_ms=float(p50), p90_ms=float(p90), p99_ms=float(p99), mean_ms=float(times.mean()))
    rec = _record(name, threads, batch, stats, warmup, runs)
    rec.update(prompt_tokens=int(decode_at), new_tokens=int(new_tokens),
               ttft_ms={str(n): float(np.median(v)) for n, v in ttft.items()},
               tokens_per_s=float(batch * new_tokens / (np.median(totals) / 1e3)))
    if memory:
        longest = fit[-1]
        rec["peak_memory_mb"] = measure_peak_memory(model_file if model_file is not None else model, entry, gen,
                                                    name, threads, batch, longest,
                                                    new_tokens if ctx is None else min(new_tokens, ctx - longest),
                                                    sha256=sha256_bytes(model) if isinstance(model, bytes) else None)
    return rec


def measure_peak_memory(model: bytes | str | Path, entry: dict, generation: dict | None, provider: str,
                        threads: int, batch: int, prompt_tokens: int, new_tokens: int, *, sha256: str | None = None,
                        seed: int = 0, timeout: float = MEMPROBE_TIMEOUT_S) -> float:
    """Peak memory (MB = 2**20 bytes) of generating with one decoder, measured in a fresh process
    (``python -m klas_runtime._memprobe``): the peak resident set size after reading the model's bytes, opening an
    onnxruntime session on them and generating ``new_tokens`` at ``batch`` after random prompts of
    ``prompt_tokens``, minus the resident set right after importing numpy, onnxruntime and klas_runtime (Linux: the
    high-water mark is reset there, so the imports' transient peak does not hide a small model; elsewhere the
    difference of ``ru_maxrss``). So it counts what serving the model adds -- the file's bytes, the session's
    weights and arena, the KV cache and activations -- and not the interpreter and libraries; a fresh process
    keeps other models and earlier measurements out. ``model``: the ONNX bytes (written to a temp file for the
    child) or a path (``sha256``: the hash the child checks it against; bytes are hashed here)."""
    tmp = None
    if isinstance(model, bytes):
        sha256 = sha256 or sha256_bytes(model)
        fd, tmp = tempfile.mkstemp(prefix="klas-memprobe-", suffix=".onnx")
        with os.fdopen(fd, "wb") as f:
            f.write(model)
        path = tmp
    else:
        path = str(model)
    spec = dict(model=path, sha256=sha256, entry=entry, generation=generation or {}, provider=provider,
                threads=int(threads), batch=int(batch), prompt_tokens=int(prompt_tokens),
                new_tokens=int(new_tokens), seed=int(seed))
    env = dict(os.environ)
    here = str(Path(__file__).resolve().parents[1])  # the folder holding klas_runtime, for the child's imports
    env["PYTHONPATH"] = here + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        r = subprocess.run([sys.executable, "-m", "klas_runtime._memprobe"], input=json.dumps(spec),
                           capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise ZooError(f"peak memory of {entry['name']}: the probe process ran past {timeout:g} s") from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    lines = r.stdout.strip().splitlines()
    if r.returncode != 0 or not lines:
        why = (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1][:200]
        raise ZooError(f"peak memory of {entry['name']}: the probe process failed ({why})")
    out = json.loads(lines[-1])
    return max(0.0, float(out["peak_mb"]) - float(out["baseline_mb"]))


def profile(zoo_dir: Path | str, manifest: dict, entry: dict, provider: str, threads: int, batch: int,
            warmup: int, runs: int, **options) -> dict:
    """``profile_zoo``'s measurement of one decoder entry: ``generation_latency_record`` on
    its verified file (options: ``prompt_lengths``, ``prompt_tokens``, ``new_tokens``, ``memory``)."""
    from klas_runtime.manifest import model_path

    data = read_model_bytes(zoo_dir, entry)
    opts = {k: v for k, v in options.items() if v is not None}
    return generation_latency_record(data, entry, provider, threads, batch, warmup=warmup, runs=runs,
                                     generation=manifest["generation"],
                                     model_file=model_path(zoo_dir, entry["file"]), **opts)
