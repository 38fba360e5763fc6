"""Deployment runtime: pick the most accurate zoo model that fits a budget, and run it -- numpy + onnxruntime only.

A deployment host gets a zoo folder (ONNX files + ``manifest.json``) and a budget: FLOPs per image, milliseconds
on its execution provider, a minimum accuracy. ``Zoo.pick`` answers with the best model that fits and an
``onnxruntime.InferenceSession`` for it, or a one-line error naming the cheapest model when nothing fits. The
manifest and every file hash are checked on load; this module never imports torch (deployment hosts lack it).
``verify_zoo`` lists every problem of a zoo (hash, ONNX validity, embedded metadata, input/output names).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from klas_runtime.errors import ZooError
from klas_runtime.manifest import MANIFEST, check_embedded, load_manifest, read_manifest, read_model_bytes
from klas_runtime.profile import device_label, open_session, provider_name, short_provider

_SUFFIX = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
_COUNT = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([KMGTkmgt]?)\s*$")
STATS = ("p50", "p90", "p99", "mean")


def parse_count(text: str | float | int, flag: str = "--max-flops") -> float:
    """'40M' -> 4e7; suffixes K/M/G/T (powers of 1000, case-insensitive); plain numbers pass through."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        m = _COUNT.match(str(text))
        if not m:
            raise ZooError(f"{flag} {text!r}: expected a number with an optional K/M/G suffix, e.g. 40M")
        value = float(m.group(1)) * _SUFFIX[m.group(2).upper()]
    if value < 0:
        raise ZooError(f"{flag} {text!r}: must not be negative")
    return value


def format_count(n: float) -> str:
    """4e7 -> '40.0M' (three significant figures, as budgets are read)."""
    for suffix, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{suffix}"
    return f"{n:.3g}"


@dataclass
class Choice:
    """The picked model: its manifest entry, a session for it and why it was chosen."""

    entry: dict
    session: object
    reason: str
    provider: str
    latency_ms: float | None = None
    latency_record: dict | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.entry["name"]

    def run(self, x: np.ndarray) -> np.ndarray:
        """Logits [N, classes] for normalized input [N, C, H, W] (float32)."""
        x = check_input(x, self.entry["input"], self.name)
        return self.session.run([self.entry["output"]["name"]], {self.entry["input"]["name"]: x})[0]

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(top-1 class index [N], softmax probabilities [N, classes])."""
        logits = self.run(x).astype(np.float64)
        z = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs = z / z.sum(axis=1, keepdims=True)
        return probs.argmax(axis=1), probs


def check_input(x: np.ndarray, spec: dict, name: str = "model") -> np.ndarray:
    """Refuse an input whose shape differs from the model's [batch, C, H, W], in one line naming both shapes."""
    x = np.asarray(x)
    want = spec["shape"][1:]
    if x.ndim != 4 or list(x.shape[1:]) != want or x.shape[0] < 1:
        raise ZooError(f"{name}: input shape {tuple(x.shape)} does not match the model input "
                        f"[batch, {', '.join(map(str, want))}] ({spec['color']} {want[1]}x{want[2]}, {spec['layout']})")
    if not np.issubdtype(x.dtype, np.floating):
        raise ZooError(f"{name}: input dtype {x.dtype} is not floating point; pass normalized float32 "
                        f"(see klas_runtime.runtime.load_image)")
    return np.ascontiguousarray(x, dtype=np.float32)


def load_image(path: Path | str, spec: dict) -> np.ndarray:
    """An image file -> [1, C, H, W] float32 as the model expects: grayscale/RGB, resized, scaled, normalized."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise ZooError("Pillow is needed to read images: pip install pillow") from None
    _, c, h, w = spec["shape"]
    try:
        with Image.open(path) as img:
            img = img.convert("L" if spec["color"] == "grayscale" else "RGB")
            if img.size != (w, h):
                img = img.resize((w, h), Image.BILINEAR)
            arr = np.asarray(img, dtype=np.float32)
    except FileNotFoundError:
        raise ZooError(f"{path}: image not found") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ZooError(f"{path}: not a readable image ({e})") from None
    arr = arr.reshape(h, w, -1).transpose(2, 0, 1)[:c] * np.float32(spec["scale"])
    mean = np.asarray(spec["mean"], dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(spec["std"], dtype=np.float32).reshape(-1, 1, 1)
    return ((arr - mean) / std)[None].astype(np.float32)


class Zoo:
    """A zoo folder: the validated manifest, hash-checked model files, budget queries."""

    def __init__(self, path: Path | str, verify: bool = True):
        self.path = Path(path)
        self.manifest = load_manifest(self.path, verify_files=verify)

    @property
    def models(self) -> list[dict]:
        return self.manifest["models"]

    def __len__(self) -> int:
        return len(self.models)

    def __getitem__(self, name: str) -> dict:
        for m in self.models:
            if m["name"] == name:
                return m
        raise ZooError(f"{self.path}: no model {name!r}; models: {', '.join(m['name'] for m in self.models)}")

    def session(self, entry: dict | str, device: str | None = None, threads: int | None = None):
        """An InferenceSession for one model, from bytes whose hash was checked just now."""
        entry = self[entry] if isinstance(entry, str) else entry
        session = open_session(read_model_bytes(self.path, entry), provider_name(device), threads)
        check_embedded(entry, session.get_modelmeta().custom_metadata_map, str(self.path / entry["file"]))
        return session

    def latency(self, entry: dict, provider: str, batch: int = 1, threads: int | None = None,
                stat: str = "p90") -> tuple[float, dict] | None:
        """The model's measured latency for (provider, batch[, threads]): this device's figure when it has one,
        else another device's; the fastest thread setting when ``threads`` is None. None when never measured."""
        if stat not in STATS:
            raise ZooError(f"latency statistic {stat!r}: expected one of {', '.join(STATS)}")
        recs = [r for r in entry["latency"] if r["provider"] == provider and r["batch"] == batch
                and (threads is None or r["threads"] == threads)]
        here = [r for r in recs if r["device"] == device_label(provider)]
        recs = here or recs
        if not recs:
            return None
        best = min(recs, key=lambda r: r[f"{stat}_ms"])
        return best[f"{stat}_ms"], best

    def pick(self, max_flops: float | str | None = None, max_latency_ms: float | None = None,
             device: str | None = None, min_accuracy: float | None = None, threads: int | None = None,
             batch: int = 1, stat: str = "p90", with_session: bool = True) -> Choice:
        """The most accurate model within every given budget (ties: fewer FLOPs), with a session on ``device``.

        Budgets are inclusive (a model costing exactly ``max_flops`` fits). Latency uses the manifest's ``stat``
        percentile for ``device``'s provider and ``batch``; measure with ``klas-runtime profile`` first.
        """
        provider = provider_name(device)
        flops_cap = parse_count(max_flops) if max_flops is not None else None
        lat = {m["name"]: self.latency(m, provider, batch, threads, stat) for m in self.models}
        tests = []
        if flops_cap is not None:
            tests.append(("flops", lambda m: m["flops"] <= flops_cap))
        if max_latency_ms is not None:
            tests.append(("latency", lambda m: lat[m["name"]] is not None and lat[m["name"]][0] <= max_latency_ms))
        if min_accuracy is not None:
            tests.append(("accuracy", lambda m: m["test_acc"] >= min_accuracy))
        fits = [m for m in self.models if all(t(m) for _, t in tests)]
        where = f"{short_provider(provider)}, batch {batch}" + (f", {threads} thread(s)" if threads else "")
        budget = _budget_text(flops_cap, max_latency_ms, min_accuracy, stat, where)
        if not fits:
            raise ZooError(self._nothing_fits(tests, lat, flops_cap, max_latency_ms, min_accuracy, stat, where,
                                               budget))
        best = max(fits, key=lambda m: (m["test_acc"], -m["flops"], m["name"]))
        latency = lat[best["name"]]
        reason = self._reason(best, fits, latency, stat, where, budget)
        use_threads = latency[1]["threads"] if (latency and max_latency_ms is not None) else threads
        session = self.session(best, provider, use_threads) if with_session else None
        return Choice(best, session, reason, provider, latency[0] if latency else None,
                      latency[1] if latency else None)

    def _nothing_fits(self, tests, lat, flops_cap, max_latency_ms, min_accuracy, stat, where, budget) -> str:
        cheapest = min(self.models, key=lambda m: (m["flops"], m["name"]))
        if flops_cap is not None and cheapest["flops"] > flops_cap:
            return (f"max_flops {format_count(flops_cap)} is below the cheapest model, {cheapest['name']} "
                    f"({format_count(cheapest['flops'])} FLOPs)")
        if max_latency_ms is not None:
            measured = [m for m in self.models if lat[m["name"]] is not None]
            if not measured:
                return (f"no model in this zoo has a latency measured for {where}; "
                        f"run `klas-runtime profile ZOO_DIR --provider ... --batch ...` first")
            fastest = min(measured, key=lambda m: lat[m["name"]][0])
            if lat[fastest["name"]][0] > max_latency_ms:
                return (f"max_latency_ms {max_latency_ms:g} is below the fastest model, {fastest['name']} "
                        f"({stat} {lat[fastest['name']][0]:.3g} ms on {where})")
        if min_accuracy is not None:
            top = max(self.models, key=lambda m: m["test_acc"])
            if top["test_acc"] < min_accuracy:
                return (f"min_accuracy {min_accuracy:g}% is above the most accurate model, {top['name']} "
                        f"({top['test_acc']:.2f}%)")
        return (f"no single model meets {budget} together (each budget alone is met by some model; "
                f"the cheapest is {cheapest['name']}, {format_count(cheapest['flops'])} FLOPs, "
                f"{cheapest['test_acc']:.2f}%)")

    def _reason(self, best, fits, latency, stat, where, budget) -> str:
        parts = [f"{best['name']}: test accuracy {best['test_acc']:.2f}%, {format_count(best['flops'])} FLOPs, "
                 f"{format_count(best['params'])} params"]
        if latency:
            parts.append(f"{stat} {latency[0]:.3g} ms on {where} ({latency[1]['threads']} thread(s), "
                         f"{latency[1]['device']})")
        parts.append(f"most accurate of {len(fits)}/{len(self)} models within {budget}")
        better = [m for m in self.models if m["test_acc"] > best["test_acc"]]
        if better:
            nxt = min(better, key=lambda m: (m["flops"], -m["test_acc"]))
            parts.append(f"the next more accurate, {nxt['name']} ({nxt['test_acc']:.2f}%), needs "
                         f"{format_count(nxt['flops'])} FLOPs")
        return "; ".join(parts)


def verify_zoo(zoo_dir: Path | str) -> list[str]:
    """Every problem of a zoo, one line each (empty when sound): per model file, that it is a plain name in the
    folder, exists, matches its sha256, loads in onnxruntime as an ONNX model, carries an embedded entry that agrees
    with the manifest, and has the input / output names and shapes the manifest gives. A manifest that is missing or
    fails the schema raises ZooError (nothing else can be checked then)."""
    root = Path(zoo_dir)
    manifest = read_manifest(root)
    problems = []
    for entry in manifest["models"]:
        where = str(root / entry["file"])
        try:
            data = read_model_bytes(root, entry)
        except ZooError as e:
            problems.append(str(e))
            continue
        try:
            session = open_session(data, "cpu", 1)
        except ZooError:
            raise  # onnxruntime missing: not a problem of this zoo
        except Exception as e:  # onnxruntime's own errors (InvalidProtobuf, Fail, ...)
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            problems.append(f"{where}: not a valid ONNX model for onnxruntime ({first})")
            continue
        try:
            check_embedded(entry, session.get_modelmeta().custom_metadata_map, where)
            _check_signature(session, entry, where)
        except ZooError as e:
            problems.append(str(e))
    return problems


def _check_signature(session, entry: dict, where: str) -> None:
    inputs, outputs = session.get_inputs(), session.get_outputs()
    spec, out = entry["input"], entry["output"]
    if len(inputs) != 1 or inputs[0].name != spec["name"] or list(inputs[0].shape[1:]) != spec["shape"][1:]:
        got = ", ".join(f"{i.name}{list(i.shape)}" for i in inputs)
        raise ZooError(f"{where}: model inputs {got} do not match {MANIFEST} "
                       f"({spec['name']}{spec['shape']})")
    if out["name"] not in [o.name for o in outputs]:
        raise ZooError(f"{where}: no output {out['name']!r} (the file has {', '.join(o.name for o in outputs)})")


def _budget_text(flops_cap, max_latency_ms, min_accuracy, stat, where) -> str:
    parts = []
    if flops_cap is not None:
        parts.append(f"max_flops={format_count(flops_cap)}")
    if max_latency_ms is not None:
        parts.append(f"max_latency_ms={max_latency_ms:g} ({stat}, {where})")
    if min_accuracy is not None:
        parts.append(f"min_accuracy={min_accuracy:g}%")
    return ", ".join(parts) if parts else "no budget"
