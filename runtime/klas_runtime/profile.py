"""Latency of zoo models under onnxruntime: sessions, percentiles after warm-up, and the device they were taken on.

FLOPs rank models on paper; deployment budgets are in milliseconds on one machine with one execution provider,
thread count and batch size. ``klas-runtime profile`` (= ``klas profile``) re-measures a zoo on the host it runs on
and adds that device's figures to the manifest, so one zoo carries latency tables for every machine it was profiled
on.
A cascade's latency depends on what it is fed (how many samples go on to its second member), so it is timed on
real images when the caller has them (``inputs``: the exporter passes test images, ``klas profile --images``
image files) and otherwise on random normal inputs, which its record says (``"inputs": "random"``): their deferral
rate is not that of real data.
numpy + onnxruntime only (``klas-runtime profile``); the timing itself is ``klas_runtime.timing``'s, sessions and
providers ``klas_runtime.session``'s, the machine record ``klas_runtime.machine``'s.

Decoders (``klas_runtime.decoder_profile``) are timed as they are used, on random in-vocabulary token ids: time to
first token (prefill + the first greedy pick) over a sweep of prompt lengths, milliseconds per output token over the
decode steps after a prompt of ``prompt_tokens``, tokens per second, and the peak memory of a fresh process
(``measure_peak_memory``). ``profile_zoo`` measures each entry the way the zoo's runtime entry says
(``RuntimeEntry.profile``); image zoos as always.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from klas_runtime.entries import runtime_entry
from klas_runtime.errors import ZooError
from klas_runtime.io import atomic_path, zoo_lock
from klas_runtime.manifest import (is_cascade, load_manifest, now, read_manifest, read_model_bytes, save_manifest,
                                   write_atomic)
from klas_runtime.preprocess import load_image
from klas_runtime.session import device_label, provider_name, short_provider
from klas_runtime.timing import cascade_latency_record, latency_record


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
    fresh: dict[str, list[dict]] = {}  # name -> the records measured now (merged into the manifest of the moment)
    # every file read (and checked) once, now: what is measured is the zoo that was loaded, even if an export
    # swaps in another one meanwhile (its records are then not written: merge_into_zoo)
    blobs = {} if rt.profile is not None else {
        m["name"]: read_model_bytes(zoo_dir, m) for m in manifest["models"] if not is_cascade(m)
        and (m in chosen or any(m["name"] in c["members"] for c in chosen if is_cascade(c)))}
    for entry, p, t, b in _progress(jobs, progress):
        if rt.profile is not None:
            rec = rt.profile(zoo_dir, manifest, entry, p, t, b, warmup, runs, **given)
        elif is_cascade(entry):
            first, second = (by_name[n] for n in entry["members"])
            x, label = _cascade_inputs(inputs, inputs_label, first["input"], loaded)
            rec = cascade_latency_record(blobs[first["name"]], blobs[second["name"]], entry["threshold"], p, t, b,
                                         warmup, runs, x, label)
        else:
            rec = latency_record(blobs[entry["name"]], p, t, b, warmup, runs)
        entry["latency"] = merge_latency(entry["latency"], rec)
        fresh.setdefault(entry["name"], []).append(rec)
    return merge_into_zoo(zoo_dir, manifest, fresh)


def measured_identity(entry: dict, by_name: dict) -> tuple:
    """What a latency record was measured on: a model's file hash; a cascade's threshold and its members' hashes."""
    if is_cascade(entry):
        return ("cascade", entry["threshold"], tuple(by_name.get(m, {}).get("sha256") for m in entry["members"]))
    return ("model", entry.get("sha256"))


def merge_into_zoo(zoo_dir: Path | str, measured: dict, fresh: dict[str, list[dict]], say=print) -> dict:
    """Write the latency records ``fresh`` ({name: records}, measured on the entries of ``measured``) into the
    zoo's manifest as it is *now*: under the zoo's lock, the manifest is read again and each record merged into
    the entry of the same name that still has the same file (sha256; cascades: threshold and members' files).
    Records of entries another writer changed meanwhile (a re-export) are not written, and one line says so;
    another profile's records are kept."""
    by_old = {m["name"]: m for m in measured["models"]}
    with zoo_lock(zoo_dir, say=say):
        current = read_manifest(zoo_dir)
        by_new = {m["name"]: m for m in current["models"]}
        stale = []
        for name in sorted(fresh):
            old, new = by_old[name], by_new.get(name)
            if new is None or measured_identity(old, by_old) != measured_identity(new, by_new):
                stale.append(name)
                continue
            for rec in fresh[name]:
                new["latency"] = merge_latency(new["latency"], rec)
        if stale:
            say(f"[profile] {Path(zoo_dir)}: {len(stale)} entr{'y' if len(stale) == 1 else 'ies'} changed while "
                f"being measured (the zoo was re-exported): {', '.join(stale[:4])}{' ...' if len(stale) > 4 else ''}"
                f"; their figures were not written -- run the same command again to measure the new files",
                flush=True)
        save_manifest(current, zoo_dir)
    return current


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
