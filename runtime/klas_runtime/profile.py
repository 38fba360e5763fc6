"""Latency of zoo models under onnxruntime: sessions, percentiles after warm-up, and the device they were taken on.

FLOPs rank models on paper; deployment budgets are in milliseconds on one machine with one execution provider,
thread count and batch size. ``klas-runtime profile`` (= ``klas profile``) re-measures a zoo on the host it runs on
and adds that device's figures to the manifest, so one zoo carries latency tables for every machine it was profiled
on.
A cascade's latency depends on what it is fed (how many samples go on to its second member), so it is timed on
real images when the caller has them (``inputs``: the exporter passes test images, ``klas profile --images``
image files) and otherwise on random normal inputs, which its record says (``"inputs": "random"``): their deferral
rate is not that of real data.
numpy + onnxruntime only (used by ``klas.stages.s6_export`` and ``klas-runtime profile``); sessions and providers
are ``klas_runtime.session``'s, the machine record ``klas_runtime.machine``'s.

Decoders (``generation_latency_record``) are timed as they are used, on random in-vocabulary token ids: time to
first token (prefill + the first greedy pick) over a sweep of prompt lengths, milliseconds per output token over the
decode steps after a prompt of ``prompt_tokens``, tokens per second, and the peak memory of a fresh process
(``measure_peak_memory``). ``profile_zoo`` measures each entry the way the zoo's runtime entry says
(``RuntimeEntry.profile``); image zoos as always.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from klas_runtime.classify import deferred
from klas_runtime.entries import runtime_entry
from klas_runtime.errors import ZooError
from klas_runtime.io import atomic_path
from klas_runtime.machine import machine_info
from klas_runtime.manifest import (is_cascade, load_manifest, now, read_model_bytes, save_manifest, sha256_bytes,
                                   write_atomic)
from klas_runtime.preprocess import load_image
from klas_runtime.session import device_label, open_session, provider_name, short_provider


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
    (``python -m klas_runtime._memprobe``): its maximum resident set size (``getrusage(RUSAGE_SELF).ru_maxrss``)
    after reading the model's bytes, opening an onnxruntime session on them and generating ``new_tokens`` at
    ``batch`` after random prompts of ``prompt_tokens``, minus that maximum right after importing numpy,
    onnxruntime and klas_runtime. So it counts what serving the model adds -- the file's bytes, the session's
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


def _input_kind(rec: dict) -> str:
    return "random" if rec.get("inputs") == "random" else "data"


def merge_latency(records: list[dict], new: dict) -> list[dict]:
    """Replace the record with the same (device, provider, threads, batch) key, or append. A cascade's figures on
    random inputs and on real images are kept side by side (the runtime prefers the real ones)."""
    key = ("device", "provider", "threads", "batch")
    same = tuple(new[k] for k in key) + (_input_kind(new),)
    kept = [r for r in records if tuple(r[k] for k in key) + (_input_kind(r),) != same]
    return kept + [new]


def profile_zoo(zoo_dir: Path | str, providers: list[str] | None = None, threads: list[int] | None = None,
                batches: list[int] | None = None, warmup: int | None = None, runs: int | None = None,
                models: list[str] | None = None, progress: bool = True,
                inputs: np.ndarray | Sequence[str | Path] | None = None, inputs_label: str | None = None,
                **options) -> dict:
    """Measure every model and cascade of a zoo on this machine and rewrite its manifest atomically with the new
    figures. ``inputs`` -- normalized images [N, C, H, W], or image files (read with each cascade's input spec) --
    feed the cascades (models' latency does not depend on the values: random inputs); without them cascades get
    random inputs and records that say so.

    A zoo whose runtime entry measures its own way (``RuntimeEntry.profile``: decoder zoos,
    ``generation_latency_record``) gets its records from there, with ``options`` (decoders: ``prompt_lengths``,
    ``prompt_tokens``, ``new_tokens``, ``memory``). ``warmup`` / ``runs`` default to the entry's
    ``profile_defaults`` (image zoos: 20 / 200 calls; decoders: 1 / 5 generations)."""
    manifest = load_manifest(zoo_dir, verify_files=True)
    rt = runtime_entry(manifest, zoo_dir)
    given = {k: v for k, v in options.items() if v is not None}
    if given and rt.profile is None:
        raise ZooError(f"{', '.join('--' + k.replace('_', '-') for k in given)}: {zoo_dir} is a zoo of runtime entry "
                       f"{rt.name!r}, which has no prompts to sweep (decoder zoos only)")
    warmup = rt.profile_defaults[0] if warmup is None else warmup
    runs = rt.profile_defaults[1] if runs is None else runs
    names = [provider_name(p) for p in (providers or [None])]
    threads, batches = threads or [1], batches or [1]
    if any(t < 0 for t in threads) or any(b < 1 for b in batches):
        raise ZooError(f"--threads {threads} must be >= 0 and --batch {batches} >= 1")
    chosen = [m for m in manifest["models"] if models is None or m["name"] in models]
    if models is not None and len(chosen) != len(set(models)):
        known = ", ".join(m["name"] for m in manifest["models"])
        raise ZooError(f"{zoo_dir}: unknown model in {models}; models: {known}")
    by_name, loaded = {m["name"]: m for m in manifest["models"]}, {}
    jobs = [(m, p, t, b) for m in chosen for p in names for t in threads for b in batches]
    for entry, p, t, b in _progress(jobs, progress):
        if rt.profile is not None:
            rec = rt.profile(zoo_dir, manifest, entry, p, t, b, warmup, runs, **given)
        elif is_cascade(entry):
            first, second = (by_name[n] for n in entry["members"])
            x, label = _cascade_inputs(inputs, inputs_label, first["input"], loaded)
            rec = cascade_latency_record(read_model_bytes(zoo_dir, first), read_model_bytes(zoo_dir, second),
                                         entry["threshold"], p, t, b, warmup, runs, x, label)
        else:
            rec = latency_record(read_model_bytes(zoo_dir, entry), p, t, b, warmup, runs)
        entry["latency"] = merge_latency(entry["latency"], rec)
    save_manifest(manifest, zoo_dir)
    return manifest


def _cascade_inputs(inputs, label: str | None, spec: dict, loaded: dict) -> tuple[np.ndarray | None, str | None]:
    """``inputs`` as a normalized array for a cascade whose members take ``spec``: image files are read with it
    (once per spec: ``loaded`` caches them)."""
    if inputs is None or isinstance(inputs, np.ndarray):
        return inputs, label
    paths = list(inputs)
    if not paths:
        return None, label
    key = json.dumps(spec, sort_keys=True)
    if key not in loaded:
        loaded[key] = np.concatenate([load_image(f, spec) for f in paths])
    return loaded[key], label or f"{len(paths)} image files"


def _progress(jobs: list, show: bool):
    """A tqdm bar where tqdm is installed (klas has it; the runtime alone need not), else the plain list."""
    if show:
        try:
            from tqdm import tqdm
        except ImportError:
            return jobs
        return tqdm(jobs, desc="profile", unit="run")
    return jobs


# --- per-device fronts --------------------------------------------------------------------------------------------

FRONT_STATS = ("p50", "p90", "p99")
MARKERS = {"fp32": "o", "fp16": "s", "int8": "^", "int4": "v", "cascade": "D"}


def device_key(provider: str) -> str:
    """This machine's key for ``provider``: the hardware label its latency records carry plus the provider, e.g.
    'cpu: Intel(R) Xeon(R) Processor | CPUExecutionProvider'; threads and batch are the records' own fields."""
    name = provider_name(provider)
    return f"{device_label(name)} | {name}"


def record_key(rec: dict) -> str:
    return f"{rec['device']} | {rec['provider']}"


def device_slug(key: str) -> str:
    """A file-name-safe form of a device key ('cpu-intel-r-xeon-r-processor-cpu')."""
    device, _, provider = key.partition(" | ")
    return re.sub(r"[^a-z0-9]+", "-", f"{device} {short_provider(provider)}".lower()).strip("-") or "device"


def pareto_front(points: list[tuple[str, float, float]]) -> list[str]:
    """Names of the (name, latency, accuracy) points no other point beats: lower-or-equal latency and higher-or-equal
    accuracy, one of them strictly. Sorted by latency."""
    front = [p for p in points if not any(q[1] <= p[1] and q[2] >= p[2] and (q[1], q[2]) != (p[1], p[2])
                                          for q in points)]
    return [p[0] for p in sorted(front, key=lambda p: (p[1], -p[2], p[0]))]


def entry_precision(entry: dict) -> str:
    return "cascade" if is_cascade(entry) else entry.get("precision", "fp32")


def device_profile(manifest: dict, provider: str, stat: str = "p90", key: str | None = None) -> dict:
    """This device's latency table and fronts from the manifest's records: for every (threads, batch) measured on
    ``key`` (default: this machine with ``provider``), each entry's accuracy, size and p50/p90/p99/mean, and the
    accuracy-vs-``stat`` front. Records of other devices are not mixed in."""
    if stat not in FRONT_STATS:
        raise ZooError(f"--percentile {stat!r}: expected one of {', '.join(FRONT_STATS)}")
    key = key or device_key(provider)
    settings: dict[tuple[int, int], list[dict]] = {}
    machine = None
    for entry in manifest["models"]:
        recs = [r for r in entry["latency"] if record_key(r) == key]
        by_setting: dict[tuple[int, int], dict] = {}
        for r in recs:  # a cascade measured on real images and on random ones: the real ones
            k = (r["threads"], r["batch"])
            if k not in by_setting or (by_setting[k].get("inputs") == "random" and r.get("inputs") != "random"):
                by_setting[k] = r
        for k, r in by_setting.items():
            machine = machine or r["machine"]
            row = dict(name=entry["name"], precision=entry_precision(entry), parent=entry.get("parent"),
                       test_acc=entry["test_acc"], bytes=entry.get("bytes"), flops=entry["flops"],
                       **{f"{s}_ms": r[f"{s}_ms"] for s in (*FRONT_STATS, "mean")}, measured_at=r["measured_at"])
            if is_cascade(entry):
                row.update(members=entry["members"], inputs=r.get("inputs", "data"))
            settings.setdefault(k, []).append(row)
    tables = []
    for (threads, batch), rows in sorted(settings.items()):
        front = pareto_front([(r["name"], r[f"{stat}_ms"], r["test_acc"]) for r in rows])
        for r in rows:
            r["front"] = r["name"] in front
        tables.append(dict(threads=threads, batch=batch, front=front,
                           entries=sorted(rows, key=lambda r: (r[f"{stat}_ms"], r["name"]))))
    return dict(device=key, provider=key.partition(" | ")[2], stat=stat, machine=machine, created=now(),
                settings=tables)


def write_device_profile(zoo_dir: Path | str, manifest: dict, provider: str | None, stat: str = "p90") -> list[Path]:
    """``ZOO/profile-<device>.json`` (``device_profile``) and, where matplotlib is installed, ``.png`` beside it:
    accuracy vs measured ``stat`` latency, one panel per (threads, batch), fp32 / fp16 / int8 / cascades with
    their own markers, the front drawn. Returns the files written."""
    prof = device_profile(manifest, provider_name(provider), stat)
    if not prof["settings"]:
        return []
    base = Path(zoo_dir) / f"profile-{device_slug(prof['device'])}"
    write_atomic(base.with_suffix(".json"), (json.dumps(prof, indent=2) + "\n").encode())
    written = [base.with_suffix(".json")]
    try:
        import matplotlib
    except ImportError:
        return written
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = prof["settings"]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.8), squeeze=False)
    for ax, table in zip(axes[0], panels):
        rows = table["entries"]
        for prec, marker in MARKERS.items():
            pts = [r for r in rows if r["precision"] == prec]
            if pts:
                ax.scatter([r[f"{stat}_ms"] for r in pts], [r["test_acc"] for r in pts], marker=marker, s=46,
                           label=prec, zorder=3, edgecolors="black", linewidths=0.5)
        front = [next(r for r in rows if r["name"] == n) for n in table["front"]]
        ax.step([r[f"{stat}_ms"] for r in front], [r["test_acc"] for r in front], where="post", color="grey",
                lw=1, zorder=2, label="front")
        for r in rows:
            ax.annotate(r["name"].replace(f"{manifest['family']}-", ""), (r[f"{stat}_ms"], r["test_acc"]),
                        fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel(f"{stat} latency per batch (ms, log)")
        ax.set_ylabel(f"test accuracy (%), {manifest['dataset']}")
        ax.set_title(f"{table['threads']} thread(s), batch {table['batch']}", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{manifest['family']} zoo on {prof['device']}", fontsize=10)
    fig.tight_layout()
    with atomic_path(base.with_suffix(".png")) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return written + [base.with_suffix(".png")]
