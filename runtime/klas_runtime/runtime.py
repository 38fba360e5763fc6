"""Deployment runtime: pick the most accurate zoo model that fits a budget, and run it -- numpy + onnxruntime only.

A deployment host gets a zoo folder (ONNX files + ``manifest.json``) and a budget: FLOPs per image, milliseconds
on its execution provider, a minimum accuracy. ``Zoo.pick`` answers with the best model that fits and an
``onnxruntime.InferenceSession`` for it, or a one-line error naming the cheapest model when nothing fits. The
manifest and every file hash are checked on load; this module never imports torch (deployment hosts lack it).
``verify_zoo`` lists every problem of a zoo (hash, ONNX validity, embedded metadata, input/output names).

Cascades (two models and a max-softmax threshold) are candidates like models: ``pick`` may answer with one, and
its ``CascadeChoice`` is used exactly like a model's ``Choice`` (``predict``, ``run``, ``input``, ``classes``).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from klas_runtime.errors import ZooError
from klas_runtime.manifest import (MANIFEST, PRECISIONS, check_embedded, is_cascade, load_manifest,
                                   read_manifest, read_model_bytes)
from klas_runtime.manifest import precision as precision_of
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


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (what ``predict`` and the cascade's threshold test use)."""
    z = np.asarray(logits, dtype=np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


@dataclass
class Choice:
    """The picked model: its manifest entry, a session for it and why it was chosen.

    A picked cascade is a ``CascadeChoice`` with the same attributes and methods, so callers need not tell them
    apart: ``predict``/``run`` take the same input, ``input``/``classes`` say what that input and output are,
    ``files`` the ONNX files it runs and ``members`` which model answers (``predict_detailed``)."""

    entry: dict
    session: object
    reason: str
    provider: str
    latency_ms: float | None = None
    latency_record: dict | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.entry["name"]

    @property
    def kind(self) -> str:
        return "model"

    @property
    def input(self) -> dict:
        """The input spec (``load_image(path, choice.input)``)."""
        return self.entry["input"]

    @property
    def classes(self) -> list[str]:
        return self.entry["output"]["classes"]

    @property
    def files(self) -> list[str]:
        return [self.entry["file"]]

    @property
    def members(self) -> list[str]:
        """The models that may answer: this one."""
        return [self.name]

    def run(self, x: np.ndarray) -> np.ndarray:
        """Logits [N, classes] for normalized input [N, C, H, W] (float32)."""
        x = check_input(x, self.entry["input"], self.name)
        return self.session.run([self.entry["output"]["name"]], {self.entry["input"]["name"]: x})[0]

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(top-1 class index [N], softmax probabilities [N, classes])."""
        labels, probs, _ = self.predict_detailed(x)
        return labels, probs

    def predict_detailed(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``predict`` plus, per sample, the index into ``members`` of the model that answered (here always 0)."""
        probs = softmax(self.run(x))
        return probs.argmax(axis=1), probs, np.zeros(len(probs), dtype=np.int64)


@dataclass
class CascadeChoice(Choice):
    """A picked cascade: the first (cheaper) member answers every sample whose max softmax probability is at least
    ``threshold``; the second runs only on the others. ``session`` is the pair of member sessions (None without
    sessions); ``parts`` the members' own ``Choice`` objects."""

    parts: tuple = ()

    @property
    def kind(self) -> str:
        return "cascade"

    @property
    def threshold(self) -> float:
        return float(self.entry["threshold"])

    @property
    def input(self) -> dict:
        return self.parts[0].entry["input"]  # the same for both members (validated)

    @property
    def classes(self) -> list[str]:
        return self.parts[0].entry["output"]["classes"]

    @property
    def files(self) -> list[str]:
        return [p.entry["file"] for p in self.parts]

    @property
    def members(self) -> list[str]:
        return list(self.entry["members"])

    def run(self, x: np.ndarray) -> np.ndarray:
        """Logits [N, classes] of whichever member answered each sample."""
        return self._route(x)[0]

    def predict_detailed(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        logits, answered = self._route(x)
        probs = softmax(logits)
        return probs.argmax(axis=1), probs, answered

    def _route(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        first, second = self.parts
        if first.session is None:
            raise ZooError(f"{self.name}: picked without sessions (with_session=False); nothing to run")
        x = check_input(x, first.entry["input"], self.name)
        logits = first.run(x)
        deferred = softmax(logits).max(axis=1) < self.threshold
        if deferred.any():
            logits = logits.copy()
            logits[deferred] = second.run(x[deferred])
        return logits, deferred.astype(np.int64)


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


# Decoding limit for input images (width x height): a small file may declare a huge image (a decompression bomb).
MAX_IMAGE_PIXELS = int(os.environ.get("KLAS_MAX_IMAGE_PIXELS", 50_000_000))


def open_checked_image(path: Path | str, max_pixels: int | None = None):
    """``PIL.Image.open`` refusing, before decoding, an image larger than ``max_pixels`` (default
    ``MAX_IMAGE_PIXELS``, env ``KLAS_MAX_IMAGE_PIXELS``) and anything Pillow cannot identify: one-line ZooError."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise ZooError("Pillow is needed to read images: pip install pillow") from None
    limit = MAX_IMAGE_PIXELS if max_pixels is None else int(max_pixels)
    try:
        img = Image.open(path)
    except FileNotFoundError:
        raise ZooError(f"{path}: image not found") from None
    except IsADirectoryError:
        raise ZooError(f"{path}: is a directory, not an image") from None
    except Image.DecompressionBombError:
        raise ZooError(f"{path}: image declares more pixels than Pillow's decompression-bomb limit; refusing to "
                       f"decode it") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ZooError(f"{path}: not a readable image ({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})"
                       ) from None
    w, h = img.size
    if w * h > limit:
        img.close()
        raise ZooError(f"{path}: image of {w}x{h} = {w * h:,} pixels exceeds the limit of {limit:,} "
                       f"(KLAS_MAX_IMAGE_PIXELS); refusing to decode it")
    return img


def load_image(path: Path | str, spec: dict) -> np.ndarray:
    """An image file -> [1, C, H, W] float32 as the model expects: converted to grayscale/RGB, resized and centre
    cropped with the spec's interpolation, crop_pct and crop_mode (timm's evaluation transform; older manifests:
    straight to the input size), scaled, normalized (``klas_runtime.preprocess``). Images above
    ``MAX_IMAGE_PIXELS`` are refused before decoding."""
    from klas_runtime.preprocess import preprocess

    opened = open_checked_image(path)  # Pillow present, the file identified, within the pixel limit
    from PIL import Image, UnidentifiedImageError

    try:
        with opened as img:
            x = preprocess(img, spec)
    except FileNotFoundError:
        raise ZooError(f"{path}: image not found") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ZooError(f"{path}: not a readable image ({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})"
                       ) from None
    except ZooError as e:
        raise ZooError(f"{path}: {e}") from None
    return x[None]


class Zoo:
    """A zoo folder: the validated manifest, hash-checked model files, budget queries.

    ``entries`` are all candidates in manifest order (models and cascades), ``models`` the model entries (one ONNX
    file each), ``cascades`` the cascade entries (two of those models and a threshold)."""

    def __init__(self, path: Path | str, verify: bool = True):
        self.path = Path(path)
        self.manifest = load_manifest(self.path, verify_files=verify)

    @property
    def entries(self) -> list[dict]:
        return self.manifest["models"]

    @property
    def models(self) -> list[dict]:
        return [e for e in self.entries if not is_cascade(e)]

    @property
    def cascades(self) -> list[dict]:
        return [e for e in self.entries if is_cascade(e)]

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, name: str) -> dict:
        for m in self.entries:
            if m["name"] == name:
                return m
        raise ZooError(f"{self.path}: no model {name!r}; models: {', '.join(m['name'] for m in self.entries)}")

    def session(self, entry: dict | str, device: str | None = None, threads: int | None = None):
        """An InferenceSession for one model, from bytes whose hash was checked just now."""
        entry = self[entry] if isinstance(entry, str) else entry
        if is_cascade(entry):
            raise ZooError(f"{entry['name']}: a cascade has no file (and no session) of its own; use "
                           f"Zoo.open({entry['name']!r}), which opens both members")
        data = read_model_bytes(self.path, entry)  # hash and ONNX structure checked (no external data)
        try:
            session = open_session(data, provider_name(device), threads)
        except ZooError:
            raise
        except Exception as e:  # onnxruntime's own errors (InvalidProtobuf, Fail, ...): one line naming the file
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise ZooError(f"{self.path / entry['file']}: not a valid ONNX model for onnxruntime ({first})") from None
        check_embedded(entry, session.get_modelmeta().custom_metadata_map, str(self.path / entry["file"]))
        return session

    def open(self, entry: dict | str, device: str | None = None, threads: int | None = None,
             with_session: bool = True, reason: str = "chosen by name") -> Choice:
        """A model's ``Choice`` or a cascade's ``CascadeChoice`` (sessions of both members) for one entry."""
        entry = self[entry] if isinstance(entry, str) else entry
        provider = provider_name(device)
        if is_cascade(entry):
            parts = tuple(self.open(name, provider, threads, with_session, reason=f"member of {entry['name']}")
                          for name in entry["members"])
            sessions = tuple(p.session for p in parts) if with_session else None
            return CascadeChoice(entry, sessions, reason, provider, parts=parts)
        return Choice(entry, self.session(entry, provider, threads) if with_session else None, reason, provider)

    @staticmethod
    def cost(entry: dict, by_average: bool = False) -> float:
        """FLOPs per image a FLOPs budget is checked against: ``flops`` (a cascade's worst case, both members) or,
        with ``by_average``, a cascade's average on validation data (``flops_avg.val``; the threshold was chosen
        there). A model's cost is its ``flops`` either way."""
        return float(entry["flops_avg"]["val"]) if (by_average and is_cascade(entry)) else entry["flops"]

    def latency(self, entry: dict, provider: str, batch: int = 1, threads: int | None = None,
                stat: str = "p90") -> tuple[float, dict] | None:
        """The entry's latency measured on this device (hardware label and provider) for (batch[, threads]); the
        fastest thread setting when ``threads`` is None. None when never measured here: figures of other machines
        are not used (``klas profile`` measures this one). A cascade's latency depends on its inputs: figures
        taken on real images win over ones on random inputs."""
        if stat not in STATS:
            raise ZooError(f"latency statistic {stat!r}: expected one of {', '.join(STATS)}")
        recs = [r for r in entry["latency"] if r["provider"] == provider and r["batch"] == batch
                and (threads is None or r["threads"] == threads) and r["device"] == device_label(provider)]
        recs = [r for r in recs if r.get("inputs") != "random"] or recs
        if not recs:
            return None
        best = min(recs, key=lambda r: r[f"{stat}_ms"])
        return best[f"{stat}_ms"], best

    def pick(self, max_flops: float | str | None = None, max_latency_ms: float | None = None,
             device: str | None = None, min_accuracy: float | None = None, threads: int | None = None,
             batch: int = 1, stat: str = "p90", with_session: bool = True, by_average: bool = False,
             precision: str | list[str] | tuple | None = None) -> Choice:
        """The most accurate model or cascade within every given budget (ties: lower cost, then float32 before a
        variant), with sessions on ``device``; ``precision`` ('fp32', 'fp16', 'int8', a list or a comma-separated
        string of them; cascades count as fp32) restricts the candidates.

        Budgets are inclusive (a model costing exactly ``max_flops`` fits). A cascade's FLOPs are its worst case
        (both members on every sample) unless ``by_average``, then its average on validation data. Latency uses the
        manifest's ``stat`` percentile measured on this device (its hardware and ``device``'s provider) at
        ``batch`` (a cascade's own records); measure with ``klas profile`` first.
        """
        provider = provider_name(device)
        flops_cap = parse_count(max_flops) if max_flops is not None else None
        wanted = _precisions(precision)
        lat = {m["name"]: self.latency(m, provider, batch, threads, stat) for m in self.entries}

        def cost(m):
            return self.cost(m, by_average)

        tests = []
        if flops_cap is not None:
            tests.append(("flops", lambda m: cost(m) <= flops_cap))
        if max_latency_ms is not None:
            tests.append(("latency", lambda m: lat[m["name"]] is not None and lat[m["name"]][0] <= max_latency_ms))
        if min_accuracy is not None:
            tests.append(("accuracy", lambda m: m["test_acc"] >= min_accuracy))
        pool = [m for m in self.entries if wanted is None or precision_of(m) in wanted]
        if not pool:
            have = sorted({precision_of(m) for m in self.entries}, key=PRECISIONS.index)
            raise ZooError(f"--precision {','.join(wanted)}: this zoo has no such entry (its precisions: "
                           f"{', '.join(have)}); re-export with `klas export --precisions ...`")
        fits = [m for m in pool if all(t(m) for _, t in tests)]
        where = f"{short_provider(provider)}, batch {batch}" + (f", {threads} thread(s)" if threads else "")
        budget = _budget_text(flops_cap, max_latency_ms, min_accuracy, stat, where, by_average and self.cascades)
        if wanted is not None:
            budget += f", precision {'/'.join(wanted)}"
        if not fits:
            raise ZooError(self._nothing_fits(lat, flops_cap, max_latency_ms, min_accuracy, stat, where, budget,
                                               cost, pool, provider, batch, threads))
        best = max(fits, key=lambda m: (m["test_acc"], -cost(m), precision_of(m) == "fp32", m["name"]))
        latency = lat[best["name"]]
        reason = self._reason(best, fits, latency, stat, where, budget, cost, by_average, flops_cap)
        use_threads = latency[1]["threads"] if (latency and max_latency_ms is not None) else threads
        choice = self.open(best, provider, use_threads, with_session, reason)
        choice.latency_ms, choice.latency_record = (latency[0], latency[1]) if latency else (None, None)
        return choice

    def _nothing_fits(self, lat, flops_cap, max_latency_ms, min_accuracy, stat, where, budget, cost, pool=None,
                      provider=None, batch=1, threads=None) -> str:
        pool = self.entries if pool is None else pool
        cheapest = min(pool, key=lambda m: (cost(m), m["name"]))
        if flops_cap is not None and cost(cheapest) > flops_cap:
            return (f"max_flops {format_count(flops_cap)} is below the cheapest model, {cheapest['name']} "
                    f"({format_count(cost(cheapest))} FLOPs)")
        if max_latency_ms is not None:
            measured = [m for m in pool if lat[m["name"]] is not None]
            if not measured:
                sp = short_provider(provider) if provider else "cpu"
                return (f"no entry of this zoo has a latency measured on this device ({device_label(provider)}, "
                        f"{where}); measure it with `klas profile {self.path} --provider {sp} --threads "
                        f"{threads or 1} --batch {batch}`")
            fastest = min(measured, key=lambda m: lat[m["name"]][0])
            if lat[fastest["name"]][0] > max_latency_ms:
                return (f"max_latency_ms {max_latency_ms:g} is below the fastest model, {fastest['name']} "
                        f"({stat} {lat[fastest['name']][0]:.3g} ms on {where})")
        if min_accuracy is not None:
            top = max(pool, key=lambda m: m["test_acc"])
            if top["test_acc"] < min_accuracy:
                return (f"min_accuracy {min_accuracy:g}% is above the most accurate model, {top['name']} "
                        f"({top['test_acc']:.2f}%)")
        return (f"no single model meets {budget} together (each budget alone is met by some model; "
                f"the cheapest is {cheapest['name']}, {format_count(cost(cheapest))} FLOPs, "
                f"{cheapest['test_acc']:.2f}%)")

    def _reason(self, best, fits, latency, stat, where, budget, cost, by_average, flops_cap) -> str:
        if is_cascade(best):
            first, second = best["members"]
            d, fa = best["deferral"], best["flops_avg"]
            parts = [f"cascade {best['name']}: {first} answers, {second} runs on the samples whose max softmax "
                     f"probability from {first} is below the threshold {best['threshold']:g} (deferred: "
                     f"{d['val']:.1%} of val, {d['test']:.1%} of test)",
                     f"test accuracy {best['test_acc']:.2f}%, {format_count(best['flops'])} FLOPs worst case "
                     f"(both members), {format_count(fa['val'])} on average on val ({format_count(fa['test'])} on "
                     f"test), {format_count(best['params'])} params"]
            if flops_cap is not None:
                parts.append("FLOPs budget checked against its average on validation data (the data its threshold "
                             "was chosen on; by_average)" if by_average else
                             "FLOPs budget checked against its worst case (by_average / --by-average would use its "
                             "average on validation data)")
        else:
            variant = (f" ({best['precision']} variant of {best['parent']})" if precision_of(best) != "fp32"
                       else "")
            parts = [f"{best['name']}{variant}: test accuracy {best['test_acc']:.2f}%, "
                     f"{format_count(best['flops'])} FLOPs, {format_count(best['params'])} params"]
        if latency:
            inputs = f", {latency[1]['inputs']} inputs" if is_cascade(best) and latency[1].get("inputs") else ""
            parts.append(f"{stat} {latency[0]:.3g} ms on {where} ({latency[1]['threads']} thread(s), "
                         f"{latency[1]['device']}{inputs})")
        what = "models and cascades" if self.cascades else "models"
        parts.append(f"most accurate of {len(fits)}/{len(self)} {what} within {budget}")
        better = [m for m in self.entries if m["test_acc"] > best["test_acc"]]
        if better:
            nxt = min(better, key=lambda m: (cost(m), -m["test_acc"]))
            avg = " on average on val" if by_average and is_cascade(nxt) else ""
            parts.append(f"the next more accurate, {nxt['name']} ({nxt['test_acc']:.2f}%), needs "
                         f"{format_count(cost(nxt))} FLOPs{avg}")
        if flops_cap is not None and not by_average:
            avg_fit = [m for m in better if is_cascade(m) and self.cost(m, True) <= flops_cap < m["flops"]]
            if avg_fit:
                top = max(avg_fit, key=lambda m: (m["test_acc"], -self.cost(m, True)))
                parts.append(f"cascade {top['name']} ({top['test_acc']:.2f}%) would fit by its average FLOPs on "
                             f"val, {format_count(self.cost(top, True))} (by_average / --by-average)")
        return "; ".join(parts)


def verify_zoo(zoo_dir: Path | str) -> list[str]:
    """Every problem of a zoo, one line each (empty when sound): per model file, that it is a plain name in the
    folder, exists, matches its sha256, loads in onnxruntime as an ONNX model, carries an embedded entry that agrees
    with the manifest, and has the input / output names and shapes the manifest gives. Per cascade (whose claims
    against its members the schema already checked): that both members passed, and that the composite runs on a
    small random batch (both members, [N, classes] each). A manifest that is missing or fails the schema raises
    ZooError (nothing else can be checked then)."""
    root = Path(zoo_dir)
    manifest = read_manifest(root)
    problems, sessions = [], {}
    for entry in manifest["models"]:
        if is_cascade(entry):
            continue
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
            sessions[entry["name"]] = session
        except ZooError as e:
            problems.append(str(e))
    models = {e["name"]: e for e in manifest["models"] if not is_cascade(e)}
    for entry in manifest["models"]:
        if is_cascade(entry):
            problems += _check_cascade_runs(entry, models, sessions, root)
    return problems


def _check_cascade_runs(entry: dict, models: dict, sessions: dict, root: Path) -> list[str]:
    where = f"{root / MANIFEST}: cascade {entry['name']!r}"
    bad = [m for m in entry["members"] if m not in sessions]
    if bad:
        return [f"{where}: member {m!r} failed verification (its file's problem is listed above)" for m in bad]
    parts = tuple(Choice(models[m], sessions[m], "verify", "CPUExecutionProvider") for m in entry["members"])
    spec, classes = parts[0].entry["input"], parts[0].entry["output"]["num_classes"]
    x = np.random.default_rng(0).standard_normal([2] + spec["shape"][1:]).astype(np.float32)
    try:
        for p in parts:  # both members, whatever the threshold routes to
            if p.run(x).shape != (2, classes):
                return [f"{where}: member {p.name!r} gives logits of shape {p.run(x).shape}, not (2, {classes})"]
        labels, probs = CascadeChoice(entry, tuple(sessions[m] for m in entry["members"]), "verify",
                                      "CPUExecutionProvider", parts=parts).predict(x)
        if probs.shape != (2, classes):
            return [f"{where}: the composite gives probabilities of shape {probs.shape}, not (2, {classes})"]
    except ZooError as e:
        return [f"{where}: {e}"]
    except Exception as e:  # onnxruntime's own errors
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        return [f"{where}: does not run ({first})"]
    return []


def _check_signature(session, entry: dict, where: str) -> None:
    inputs, outputs = session.get_inputs(), session.get_outputs()
    spec, out = entry["input"], entry["output"]
    if len(inputs) != 1 or inputs[0].name != spec["name"] or list(inputs[0].shape[1:]) != spec["shape"][1:]:
        got = ", ".join(f"{i.name}{list(i.shape)}" for i in inputs)
        raise ZooError(f"{where}: model inputs {got} do not match {MANIFEST} "
                       f"({spec['name']}{spec['shape']})")
    if out["name"] not in [o.name for o in outputs]:
        raise ZooError(f"{where}: no output {out['name']!r} (the file has {', '.join(o.name for o in outputs)})")


def _precisions(value) -> tuple[str, ...] | None:
    """None, 'int8', 'fp32,int8' or a list of them -> the precisions asked for (checked)."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else [p for v in value for p in str(v).split(",")]
    got = [p.strip().lower() for p in items if p.strip()]
    bad = [p for p in got if p not in PRECISIONS]
    if bad or not got:
        raise ZooError(f"--precision {value!r}: expected one or more of {', '.join(PRECISIONS)}")
    return tuple(p for p in PRECISIONS if p in got)


def _budget_text(flops_cap, max_latency_ms, min_accuracy, stat, where, by_average=False) -> str:
    parts = []
    if flops_cap is not None:
        parts.append(f"max_flops={format_count(flops_cap)}" + (" (cascades: average on val)" if by_average else ""))
    if max_latency_ms is not None:
        parts.append(f"max_latency_ms={max_latency_ms:g} ({stat}, {where})")
    if min_accuracy is not None:
        parts.append(f"min_accuracy={min_accuracy:g}%")
    return ", ".join(parts) if parts else "no budget"
