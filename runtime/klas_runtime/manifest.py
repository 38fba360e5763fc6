"""The zoo manifest (``manifest.json``): a versioned schema, validated on every load, with no torch import.

A zoo directory holds one self-contained ``.onnx`` file per model and this manifest, which says for each model what
it is (stitch configuration), what it costs (params, FLOPs per image, measured latency per execution provider /
threads / batch) and how good it is (test accuracy, parity with PyTorch). Deployment hosts read it through
``klas_runtime.runtime`` with numpy + onnxruntime only: standard library here, no torch and no ``klas`` import.

Schema version 2 adds **cascade** entries (``"kind": "cascade"``, no file of their own): two model entries of the
same manifest, the cheaper first, and a threshold -- the second runs on a sample when the first's max softmax
probability is below it. Entries without ``kind`` are models; version-1 manifests (models only) are still read.

Schema version 3 adds **precision variants**: model entries with ``"precision": "fp16"`` or ``"int8"``, a ``parent``
(the float32 model entry they were made from: same configuration, input, output), ``parity`` against that parent and
a ``variant`` block (how it was made, the accuracy it lost); variants that lost too much are listed under the
top-level ``rejected``. An entry without ``precision`` is float32, so version-1 and -2 manifests read unchanged.

Schema version 4 adds the **input geometry** to a model's ``input``: ``resize`` ([h, w] = floor(input size /
crop_pct)), ``interpolation``, ``crop_pct`` and ``crop_mode`` -- timm's evaluation transform, which the runtime
applies (``klas_runtime.preprocess``); without them (versions 1-3): resize to the input size, bilinear, no crop.

Schema version 5 is that of **decoder zoos** (``runtime_entry: "generate"``, task ``causal-lm``): language models
that take token ids and return next-token logits through a KV cache (``klas_runtime.generate``). Their model entries
have their own schema (``DECODER_MODEL``: FLOPs per token at ``flops_context``, ``test_acc`` = 100 / test perplexity,
``input`` / ``output`` / ``decoder`` blocks naming the cache tensors and each layer's KV heads and head width), the
header carries the zoo's ``tokenizer`` file (hashed like a model file) and its ``generation`` settings, and their
precisions are fp32, int8 and int4. Which schema a manifest is held to comes from its runtime entry (``KINDS_BY_ENTRY``:
one ``ManifestKind`` per entry, ``classify`` for every other); image manifests (versions 1-4) read as before.

The header may name the **task** that made the zoo (``klas.tasks.Task.manifest_fields``; served through the entry
``runtime_entry`` names, ``klas_runtime.entries``); without them it is an image classifier's (``classify``).

Trust rules enforced here: a model file must be a plain name inside the zoo folder (no paths, no ``..``, no links
out), and its sha256 must match -- a manifest that was edited by hand or copied next to other files is refused.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from dataclasses import dataclass
from dataclasses import field as _field
from pathlib import Path
from typing import Any, Callable

from klas_runtime.errors import ZooError
from klas_runtime.io import atomic_path, make_zoo_hint
from klas_runtime.onnxbytes import check_onnx_bytes, onnx_facts
from klas_runtime.preprocess import CROP_MODES, CROP_PCT_RANGE, GEOMETRY, INTERPOLATIONS, resize_size

MANIFEST = "manifest.json"
SCHEMA = "klas-zoo"
SCHEMA_VERSION = 4  # of image zoos: 4: input geometry (resize, interpolation, crop); 3: precision variants;
#                     2: cascade entries ("kind": "cascade"); 1 (models only) is still read
DECODER_SCHEMA_VERSION = 5  # decoder zoos (runtime_entry "generate"): tokenizer, generation, KV-cache decoders
MAX_SCHEMA_VERSION = DECODER_SCHEMA_VERSION  # the newest version this runtime reads (of any kind of zoo)
CASCADE_SINCE = 2
VARIANTS_SINCE = 3
GEOMETRY_SINCE = 4
PRECISIONS = ("fp32", "fp16", "int8")  # an entry without "precision" is fp32 (schema versions 1 and 2)
DECODER_PRECISIONS = ("fp32", "int8", "int4")  # decoder zoos: weight-only MatMulNBits at 8 or 4 bits
ALL_PRECISIONS = ("fp32", "fp16", "int8", "int4")  # every precision of any kind of zoo, in display order
KINDS = ("model", "cascade")
METADATA_KEY = "klas"  # ONNX metadata_props key holding the model's own manifest entry (JSON)
# Fields of a model entry that describe the file itself or later measurements, so they cannot live inside the file.
NOT_EMBEDDED = ("file", "sha256", "bytes", "latency")

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]*\.onnx$")
_SAFE_JSON = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]*\.json$")  # a zoo's tokenizer file


# --- a tiny schema language: {key: (types, check or nested schema, required)} ---------------------------------------

def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _nonneg_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _pos_num(v: Any) -> bool:
    return _num(v) and v > 0


def _percent(v: Any) -> bool:
    return _num(v) and 0 <= v <= 100


def _fraction(v: Any) -> bool:
    return _num(v) and 0 <= v <= 1


def _str(v: Any) -> bool:
    return isinstance(v, str) and v != ""


def _block_range(v: Any) -> bool:
    return isinstance(v, list) and len(v) == 2 and all(_nonneg_int(x) for x in v) and v[0] <= v[1]


def _int_or_minus1(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= -1


def _shape(v: Any) -> bool:
    return (isinstance(v, list) and len(v) == 4 and v[0] == "batch"
            and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v[1:]))


def _num_list(v: Any) -> bool:
    return isinstance(v, list) and len(v) > 0 and all(_num(x) for x in v)


def _bool(v: Any) -> bool:
    return isinstance(v, bool)


def _dict(v: Any) -> bool:
    return isinstance(v, dict)


def _str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


MACHINE = {"host": (_str, True), "platform": (_str, True), "cpu": (_str, True), "cores": (_nonneg_int, True),
           "onnxruntime": (_str, True)}
INPUT = {"name": (_str, True), "shape": (_shape, True), "dtype": (lambda v: v == "float32", True),
         "layout": (lambda v: v == "NCHW", True), "color": (lambda v: v in ("grayscale", "rgb"), True),
         "scale": (_pos_num, True), "mean": (_num_list, True), "std": (lambda v: _num_list(v) and min(v) > 0, True),
         # schema version 4 (klas_runtime.preprocess): all four or none (none: straight to the input size)
         "resize": (lambda v: isinstance(v, list) and len(v) == 2 and all(
             isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v), False),
         "interpolation": (lambda v: v in INTERPOLATIONS, False),
         "crop_pct": (lambda v: _num(v) and CROP_PCT_RANGE[0] <= v <= CROP_PCT_RANGE[1], False),
         "crop_mode": (lambda v: v in CROP_MODES, False)}
OUTPUT = {"name": (_str, True), "num_classes": (_nonneg_int, True), "classes": (_str_list, True)}
CONFIG = {"source": (_str, True), "i": (_int_or_minus1, True), "target": (_str, True), "j": (_int_or_minus1, True),
          "anchor": (_bool, True), "source_blocks": (_block_range, True), "target_blocks": (_block_range, True)}
PARITY = {"images": (_nonneg_int, True), "max_abs_diff": (lambda v: _num(v) and v >= 0, True),
          "top1_agreement": (_fraction, True), "atol": (_pos_num, True), "min_agreement": (_fraction, True),
          "reference": (_str, True)}
LATENCY = {"device": (_str, True), "provider": (_str, True), "threads": (_nonneg_int, True),
           "batch": (lambda v: _nonneg_int(v) and v > 0, True), "p50_ms": (_pos_num, True),
           "p90_ms": (_pos_num, True), "p99_ms": (_pos_num, True), "mean_ms": (_pos_num, True),
           "warmup": (_nonneg_int, True), "runs": (lambda v: _nonneg_int(v) and v > 0, True),
           "measured_at": (_str, True), "machine": (MACHINE, True),
           # cascades: what the timed calls were fed ("random" or real images) and the fraction deferred meanwhile
           "inputs": (_str, False), "deferral": (_fraction, False)}
MODEL = {"name": (_str, True), "file": (lambda v: isinstance(v, str) and bool(_SAFE_NAME.match(v)), True),
         "sha256": (lambda v: isinstance(v, str) and bool(_HEX64.match(v)), True), "bytes": (_nonneg_int, True),
         "config": (CONFIG, True), "params": (_nonneg_int, True), "flops": (_nonneg_int, True),
         "test_acc": (_percent, True), "test_acc_source": (_str, True), "input": (INPUT, True),
         "output": (OUTPUT, True), "opset": (_nonneg_int, True), "parity": (PARITY, True),
         "latency": (lambda v: isinstance(v, list), True), "val_acc": (_percent, False),
         "kind": (lambda v: v == "model", False), "precision": (lambda v: v in PRECISIONS, False)}
# A variant (precision fp16 / int8) of a float32 model entry: same configuration, input and output; its parity is
# against that parent (onnxruntime both), and ``variant`` says how it was made and what it lost.
VARIANT_PARITY = {"images": (_nonneg_int, True), "max_abs_diff": (lambda v: _num(v) and v >= 0, True),
                  "top1_agreement": (_fraction, True), "reference": (_str, True)}
VARIANT_INFO = {"method": (_str, True), "parent_test_acc": (_percent, True), "accuracy_loss": (_num, True),
                "max_accuracy_loss": (lambda v: _num(v) and v >= 0, True)}
VARIANT = {**MODEL, "precision": (lambda v: v in PRECISIONS[1:], True), "parent": (_str, True),
           "parity": (VARIANT_PARITY, True), "variant": (VARIANT_INFO, True)}
REJECTED = {"name": (_str, True), "parent": (_str, True), "precision": (lambda v: v in PRECISIONS[1:], True),
            "reason": (_str, True)}
SPLITS = {"val": (_num, True), "test": (_num, True)}
CASCADE = {"name": (_str, True), "kind": (lambda v: v == "cascade", True),
           "members": (lambda v: isinstance(v, list) and len(v) == 2 and all(_str(x) for x in v), True),
           "threshold": (lambda v: _num(v) and 0 < v <= 1, True), "flops": (_nonneg_int, True),
           "flops_avg": (SPLITS, True), "deferral": ({"val": (_fraction, True), "test": (_fraction, True)}, True),
           "params": (_nonneg_int, True), "test_acc": (_percent, True), "val_acc": (_percent, True),
           "test_acc_source": (_str, False), "latency": (lambda v: isinstance(v, list), True)}
TOP = {"schema": (lambda v: v == SCHEMA, True), "schema_version": (_nonneg_int, True), "family": (_str, True),
       "dataset": (_str, True), "klas_version": (_str, True), "created": (_str, True),
       "created_on": (MACHINE, True), "models": (lambda v: isinstance(v, list) and len(v) > 0, True),
       "rejected": (lambda v: isinstance(v, list), False),
       # the task that made the zoo (klas.tasks: Task.manifest_fields); absent before tasks: image classification
       # served by the "classify" runtime entry (klas_runtime.entries)
       "task": (_str, False), "cost_unit": (_str, False), "metric": (_str, False), "runtime_entry": (_str, False)}

_EXPECTED = {"file": "a plain file name ending in .onnx inside the zoo folder (no path separators, no '..')",
             "sha256": "64 lowercase hex digits", "shape": "['batch', C, H, W] with positive ints",
             "test_acc": "a percentage in [0, 100]", "top1_agreement": "a fraction in [0, 1]",
             "schema": f"{SCHEMA!r}", "members": "a list of two model names, the cheaper first",
             "threshold": "a probability in (0, 1]", "val_acc": "a percentage in [0, 100]",
             "deferral": "a fraction in [0, 1]", "kind": "'model' or 'cascade'",
             "precision": "one of " + ", ".join(PRECISIONS) + " (a variant: fp16 or int8)",
             "resize": "[h, w] with positive ints", "interpolation": "one of " + ", ".join(INTERPOLATIONS),
             "crop_pct": f"a number in [{CROP_PCT_RANGE[0]:g}, {CROP_PCT_RANGE[1]:g}] (1.0: no crop)",
             "crop_mode": "one of " + ", ".join(CROP_MODES)}


def _check(obj: Any, schema: dict, where: str, hints: dict | None = None) -> None:
    if not isinstance(obj, dict):
        raise ZooError(f"{where}: expected an object, got {type(obj).__name__}")
    hints = _EXPECTED if hints is None else hints
    for key, (rule, required) in schema.items():
        if key not in obj:
            if required:
                raise ZooError(f"{where}: missing field {key!r}")
            continue
        if isinstance(rule, dict):
            _check(obj[key], rule, f"{where}.{key}", hints)
        elif not rule(obj[key]):
            hint = hints.get(key, "a valid value")
            raise ZooError(f"{where}.{key}: invalid value {json.dumps(obj[key])[:80]} (expected {hint})")


def validate(manifest: Any, where: str = MANIFEST) -> dict:
    """Check ``manifest`` against the schema of its kind of zoo (``manifest_kind``: image zoos, decoder zoos); raise
    a one-line ZooError naming the first bad field."""
    _check(manifest, TOP, where)
    version = manifest["schema_version"]
    if version > MAX_SCHEMA_VERSION:
        raise ZooError(f"{where}: schema version {version} is newer than this klas understands "
                        f"({MAX_SCHEMA_VERSION}); upgrade klas-runtime (or klas)")
    if version < 1:
        raise ZooError(f"{where}: schema version {version} is not a klas zoo version")
    kind = manifest_kind(manifest)
    lo, hi = kind.versions
    if version > hi:
        raise ZooError(f"{where}: schema version {version} is newer than this klas understands ({hi}) for "
                        f"{kind.label} (runtime_entry {kind.entry!r}); upgrade klas-runtime (or klas)")
    if version < lo:
        raise ZooError(f"{where}: {kind.label} (runtime_entry {kind.entry!r}) need schema_version >= {lo} (this "
                        f"manifest says {version}); re-export the zoo")
    _check(manifest, kind.top, where, kind.hints)
    names, files = set(), set()
    for k, entry in enumerate(manifest["models"]):
        at = f"{where}: models[{k}]"
        entry_type = entry_kind(entry, at)
        if entry_type == "cascade":
            if not kind.cascades:
                raise ZooError(f"{at} (cascade {entry.get('name')!r}): {kind.label} have no cascade entries")
            if version < CASCADE_SINCE:
                raise ZooError(f"{at} (cascade {entry.get('name')!r}): cascade entries need schema_version "
                                f">= {CASCADE_SINCE} (this manifest says {version})")
            _check(entry, CASCADE, f"{at} (cascade {entry.get('name')!r})")
        elif precision(entry) != "fp32":
            if version < VARIANTS_SINCE:
                raise ZooError(f"{at} ({entry.get('name')!r}): precision variants need schema_version "
                                f">= {VARIANTS_SINCE} (this manifest says {version})")
            _check(entry, kind.variant, f"{at} ({precision(entry)} variant {entry.get('name')!r})", kind.hints)
        else:
            _check(entry, kind.model, at, kind.hints)
        for r, rec in enumerate(entry["latency"]):
            _check(rec, kind.latency if entry_type == "model" else LATENCY, f"{at}.latency[{r}]", kind.hints)
        if entry["name"] in names or entry.get("file") in files:
            raise ZooError(f"{at}: duplicate model name {entry['name']!r} or file {entry.get('file')!r}")
        names.add(entry["name"])
        if entry_type == "model":
            files.add(entry["file"])
            kind.check_model(entry, manifest, at)
    models = {e["name"]: e for e in manifest["models"] if entry_kind(e) == "model"}
    for k, entry in enumerate(manifest["models"]):
        if entry_kind(entry) == "cascade":
            check_cascade(entry, models, f"{where}: models[{k}] (cascade {entry['name']!r})")
        elif precision(entry) != "fp32":
            check_variant(entry, models, f"{where}: models[{k}] ({precision(entry)} variant {entry['name']!r})",
                          kind.variant_keys)
    for k, rec in enumerate(manifest.get("rejected", [])):
        _check(rec, kind.rejected, f"{where}: rejected[{k}]", kind.hints)
    if kind.check_zoo is not None:
        kind.check_zoo(manifest, where, files)
    return manifest


def _check_image_model(entry: dict, manifest: dict, at: str) -> None:
    """An image model entry's cross-field claims: one mean/std per channel, the input geometry, a class name per
    logit (or none)."""
    spec = entry["input"]
    if len(spec["mean"]) != spec["shape"][1] or len(spec["std"]) != spec["shape"][1]:
        raise ZooError(f"{at}.input: mean/std need one value per channel ({spec['shape'][1]})")
    check_geometry(spec, f"{at}.input")
    out = entry["output"]
    if out["classes"] and len(out["classes"]) != out["num_classes"]:
        raise ZooError(f"{at}.output: {len(out['classes'])} class names for num_classes "
                       f"{out['num_classes']} (expected one name per class, or none)")


def check_geometry(spec: dict, at: str) -> None:
    """The input geometry fields (written since schema version 4; a reader older than that refuses the manifest
    by its version): all four or none, ``color`` agreeing with the channels, and ``resize`` equal to
    floor(input size / crop_pct), as timm derives it."""
    given = [k for k in GEOMETRY if k in spec]
    c, h, w = spec["shape"][1:]
    if (spec["color"] == "grayscale") != (c == 1):
        raise ZooError(f"{at}.color: {spec['color']!r} does not fit {c} input channel(s) (grayscale: 1, rgb: 3)")
    if not given:
        return
    missing = [k for k in GEOMETRY if k not in spec]
    if missing:
        raise ZooError(f"{at}: missing field {missing[0]!r} (resize, interpolation, crop_pct and crop_mode go "
                        f"together)")
    want = resize_size(h, w, spec["crop_pct"])
    if spec["resize"] != want:
        raise ZooError(f"{at}.resize: {spec['resize']} is not floor([{h}, {w}] / crop_pct {spec['crop_pct']:g}) "
                        f"= {want}")


def precision(entry: dict) -> str:
    """'fp32', 'fp16', 'int8' or 'int4' (entries without ``precision``, and cascades, are float32)."""
    return entry.get("precision", "fp32") if isinstance(entry, dict) else "fp32"


IMAGE_VARIANT_KEYS = ("config", "flops", "params", "input", "output")


def check_variant(entry: dict, models: dict[str, dict], at: str, keys: tuple = IMAGE_VARIANT_KEYS) -> None:
    """A variant's claims against its parent: a float32 model entry of this manifest with the same ``keys``
    (image zoos: configuration, FLOPs, params, input and output; decoder zoos also the cache layout) -- a variant
    changes the arithmetic, never the network."""
    parent = models.get(entry["parent"])
    if parent is None or precision(parent) != "fp32":
        raise ZooError(f"{at}: parent {entry['parent']!r} is not a float32 model entry of this manifest")
    for key in keys:
        if entry.get(key) != parent.get(key):
            raise ZooError(f"{at}: {key!r} differs from its parent {entry['parent']!r} "
                            f"({json.dumps(entry.get(key))[:60]} vs {json.dumps(parent.get(key))[:60]})")


def entry_kind(entry: Any, where: str = MANIFEST) -> str:
    """'model' or 'cascade' (an entry without ``kind`` is a model, as in schema version 1)."""
    kind = entry.get("kind", "model") if isinstance(entry, dict) else "model"
    if kind not in KINDS:
        raise ZooError(f"{where} ({entry.get('name')!r}).kind: invalid value {json.dumps(kind)[:80]} "
                        f"(expected 'model' or 'cascade')")
    return kind


def is_cascade(entry: dict) -> bool:
    return entry.get("kind") == "cascade"


def check_cascade(entry: dict, models: dict[str, dict], at: str) -> None:
    """A cascade's claims against its members' entries: two distinct model entries, cheaper first, sharing input
    and classes; worst-case FLOPs and params the members' sums; average FLOPs between the first's and the sum."""
    for key in ("file", "sha256", "bytes"):
        if key in entry:
            raise ZooError(f"{at}: a cascade has no {key!r} of its own (its members' files are verified)")
    first, second = entry["members"]
    if first == second:
        raise ZooError(f"{at}: members must be two distinct models, got {first!r} twice")
    for name in (first, second):
        if name not in models:
            raise ZooError(f"{at}: member {name!r} is not a model entry of this manifest "
                            f"(models: {', '.join(models) or 'none'})")
    a, b = models[first], models[second]
    if not a["flops"] < b["flops"]:
        raise ZooError(f"{at}: members must be listed cheaper first; {first!r} costs {a['flops']} FLOPs, "
                        f"{second!r} {b['flops']}")
    if entry["flops"] != a["flops"] + b["flops"]:
        raise ZooError(f"{at}: flops {entry['flops']} is not the worst case, the sum of its members' flops "
                        f"({a['flops']} + {b['flops']} = {a['flops'] + b['flops']})")
    if entry["params"] != a["params"] + b["params"]:
        raise ZooError(f"{at}: params {entry['params']} is not the sum of its members' params "
                        f"({a['params'] + b['params']})")
    lo, hi = a["flops"], a["flops"] + b["flops"]
    for split, v in entry["flops_avg"].items():
        if not lo * (1 - 1e-9) <= v <= hi * (1 + 1e-9):
            raise ZooError(f"{at}: flops_avg.{split} {v:g} is outside [{lo}, {hi}] (the first member's flops "
                            f"alone, both members')")
    if a["input"] != b["input"]:
        raise ZooError(f"{at}: members {first!r} and {second!r} take different inputs "
                        f"({json.dumps(a['input'])[:60]} vs {json.dumps(b['input'])[:60]}); one image cannot feed both")
    if a["output"]["classes"] != b["output"]["classes"] or a["output"]["num_classes"] != b["output"]["num_classes"]:
        raise ZooError(f"{at}: members {first!r} and {second!r} predict different classes")


@dataclass(frozen=True)
class ManifestKind:
    """The schema of one kind of zoo, chosen by the manifest's ``runtime_entry`` (``KINDS_BY_ENTRY``).

    ``versions``: the schema versions such a manifest may carry; ``model`` / ``variant`` / ``latency`` /
    ``rejected``: the entry schemas; ``top``: header blocks beyond ``TOP``; ``check_model(entry, manifest, at)``:
    a model entry's cross-field claims; ``check_zoo(manifest, where, model_files)``: the header's;
    ``variant_keys``: what a variant shares with its parent; ``files(manifest)``: the hashed files besides the
    models, as (what, {file, sha256, bytes}) pairs -- checked wherever model files are."""

    entry: str
    label: str
    versions: tuple[int, int]
    model: dict
    variant: dict
    latency: dict
    precisions: tuple[str, ...]
    check_model: Callable[[dict, dict, str], None]
    variant_keys: tuple[str, ...]
    rejected: dict = _field(default_factory=lambda: REJECTED)
    top: dict = _field(default_factory=dict)
    hints: dict = _field(default_factory=lambda: _EXPECTED)
    cascades: bool = True
    check_zoo: Callable[[dict, str, set], None] | None = None
    files: Callable[[dict], list] = lambda manifest: []


IMAGE_KIND = ManifestKind("classify", "image zoos", (1, SCHEMA_VERSION), MODEL, VARIANT, LATENCY, PRECISIONS,
                          _check_image_model, IMAGE_VARIANT_KEYS)
# runtime entry -> the schema its manifests follow; another kind registers itself here (``klas_runtime.decoder_schema``
# adds "generate"); an entry not listed (a plug-in's) follows the image schema, as every manifest did before
KINDS_BY_ENTRY: dict[str, ManifestKind] = {"classify": IMAGE_KIND}

def manifest_kind(manifest: dict) -> ManifestKind:
    """The schema ``manifest`` is held to, by its ``runtime_entry`` (absent: ``classify``)."""
    return KINDS_BY_ENTRY.get(manifest.get("runtime_entry", "classify"), IMAGE_KIND)


def is_decoder_zoo(manifest: dict) -> bool:
    return manifest_kind(manifest).entry == "generate"


# --- files -------------------------------------------------------------------------------------------------------

def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _inside(zoo_dir: Path | str, file: str, ok: bool, refusal: str) -> Path:
    """The trust rule of every file a manifest names: ``ok`` (a plain name of the expected kind, else the one-line
    ``refusal``), and a regular file directly inside ``zoo_dir`` (no symlink out)."""
    root = Path(zoo_dir).resolve()
    if not ok:
        raise ZooError(f"{Path(zoo_dir) / MANIFEST}: {refusal} (refusing paths that could point elsewhere)")
    path = root / file
    if path.is_symlink() or path.resolve().parent != root:
        raise ZooError(f"{path}: points outside the zoo folder {root} (symlink); refusing it")
    return path


def model_path(zoo_dir: Path | str, file: str) -> Path:
    """The path of a model file, refusing anything that is not a regular file directly inside ``zoo_dir``."""
    return _inside(zoo_dir, file, bool(_SAFE_NAME.match(file)) and file not in (".", ".."),
                   f"model file {file!r} is not a plain name inside the zoo folder")


def data_path(zoo_dir: Path | str, file: str, what: str = "tokenizer") -> Path:
    """The path of a zoo's non-model file (``what``: the tokenizer), refused unless a plain ``.json`` name of a
    regular file directly inside ``zoo_dir`` (the same trust rule as model files)."""
    return _inside(zoo_dir, file, bool(_SAFE_JSON.match(file)) and file != MANIFEST,
                   f"{what} file {file!r} is not a plain .json name inside the zoo folder")


def read_zoo_file(zoo_dir: Path | str, record: dict, what: str = "tokenizer") -> bytes:
    """The bytes of a hashed non-model file of the zoo (``record``: {file, sha256, bytes}) after checking its size
    and sha256 against the manifest; read once, so what is checked is what is used."""
    path = data_path(zoo_dir, record["file"], what)
    if not path.is_file():
        raise ZooError(f"{path}: {what} file listed in {MANIFEST} is missing" if not path.exists() else
                       f"{path}: {what} file listed in {MANIFEST} is not a regular file")
    try:
        data = read_regular(path)
    except OSError as e:
        raise ZooError(f"{path}: cannot read the {what} file ({e.strerror or e})") from None
    digest = sha256_bytes(data)
    if digest != record["sha256"] or len(data) != record["bytes"]:
        raise ZooError(f"{path}: sha256 {digest[:12]}... ({len(data)} bytes) does not match {MANIFEST} "
                        f"({record['sha256'][:12]}..., {record['bytes']} bytes); the {what} file or the manifest "
                        f"was altered -- re-export the zoo")
    return data


def read_regular(path: Path | str) -> bytes:
    """The bytes of a regular file, opened without following a symlink (no swap between check and read)."""
    import stat

    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))  # FIFO: no wait
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise OSError(0, "not a regular file", str(path))
        return f.read()


def read_model_bytes(zoo_dir: Path | str, entry: dict) -> bytes:
    """A model's bytes after checking its sha256 against the manifest (read once: what is checked is what runs)."""
    path = model_path(zoo_dir, entry["file"])
    if not path.is_file():
        raise ZooError(f"{path}: model file listed in {MANIFEST} is missing" if not path.exists() else
                       f"{path}: model file listed in {MANIFEST} is not a regular file")
    try:
        data = read_regular(path)
    except OSError as e:
        raise ZooError(f"{path}: cannot read the model file ({e.strerror or e})") from None
    digest = sha256_bytes(data)
    if digest != entry["sha256"]:
        raise ZooError(f"{path}: sha256 {digest[:12]}... does not match {MANIFEST} ({entry['sha256'][:12]}...); "
                        f"the file or the manifest was altered -- re-export the zoo")
    check_onnx_bytes(data, path)
    check_file_facts(entry, data, path)
    return data


def check_file_facts(entry: dict, data: bytes, path: Path | str) -> None:
    """The file's own word (from the bytes) against its entry: embedded entry, an image model's I/O names and shapes;
    every reader of model bytes runs it, so another valid model under this name (re-hashed) is refused everywhere."""
    facts = onnx_facts(data, path)
    check_embedded(entry, facts["metadata"], str(path))
    spec, out = entry.get("input"), entry.get("output")
    if not (isinstance(spec, dict) and isinstance(spec.get("shape"), list) and isinstance(out, dict)
            and "num_classes" in out):
        return  # a decoder's inputs and cache tensors: its runtime entry's check_model, on a session
    for what, want_name, want_dims, got in (("input", spec["name"], spec["shape"][1:], facts["inputs"]),
                                            ("output", out["name"], [out["num_classes"]], facts["outputs"])):
        name, dims = got[0] if got else (None, None)
        tail = None if dims is None else dims[len(dims) - len(want_dims):]
        if name != want_name or (tail is not None and any(isinstance(g, int) and g != w
                                                          for g, w in zip(tail, want_dims))):
            raise ZooError(f"{path}: the graph's {what} {name!r} {dims} does not match {MANIFEST} ({want_name!r}, "
                           f"[batch, {', '.join(map(str, want_dims))}]); the file is not this entry's model -- "
                           f"re-export the zoo")


def load_manifest(zoo_dir: Path | str, verify_files: bool = True) -> dict:
    """Read and validate ``ZOO_DIR/manifest.json``; with ``verify_files`` every model file's hash is checked too,
    and those of the zoo's other files (a decoder zoo's tokenizer)."""
    manifest = read_manifest(zoo_dir)
    for entry in manifest["models"]:
        if is_cascade(entry):  # no file of its own: its members are model entries, checked here
            continue
        if verify_files:
            read_model_bytes(zoo_dir, entry)
        else:
            model_path(zoo_dir, entry["file"])
    for what, record in manifest_kind(manifest).files(manifest):
        if verify_files:
            read_zoo_file(zoo_dir, record, what)
        else:
            data_path(zoo_dir, record["file"], what)
    return manifest


def read_manifest(zoo_dir: Path | str) -> dict:
    """Read and validate ``ZOO_DIR/manifest.json`` against the schema, without looking at the model files."""
    path = Path(zoo_dir) / MANIFEST
    if not Path(zoo_dir).is_dir():
        raise ZooError(f"{zoo_dir}: zoo directory not found" if not Path(zoo_dir).exists()
                       else f"{zoo_dir}: is a file, not a zoo directory")
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise ZooError(f"{path}: not a regular file (a symlink or another kind of file); the manifest must be a "
                        f"plain file inside the zoo folder -- refusing it")
    try:
        manifest = json.loads(read_regular(path).decode("utf-8"))
    except FileNotFoundError:
        raise ZooError(f"{path}: not found; {make_zoo_hint(zoo_dir)}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ZooError(f"{path}: not valid JSON ({str(e).splitlines()[0][:120]})") from None
    except OSError as e:
        raise ZooError(f"{path}: cannot read the manifest ({e.strerror or e})") from None
    return validate(manifest, str(path))


def save_manifest(manifest: dict, zoo_dir: Path | str) -> Path:
    """Validate, then write atomically (temp file + rename), so a reader never sees half a manifest."""
    path = Path(zoo_dir) / MANIFEST
    validate(manifest, str(path))
    write_atomic(path, (json.dumps(manifest, indent=2) + "\n").encode())
    return path


def write_atomic(path: Path | str, data: bytes) -> None:
    """Write ``data`` to ``path`` through ``klas_runtime.io.atomic_path`` (temp file in the same folder + rename)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
        os.chmod(tmp, 0o644)


def embedded_entry(entry: dict, manifest: dict) -> dict:
    """What a model's ONNX ``metadata_props`` carries: its own manifest entry (minus file hash and latency, which
    cannot be known inside the file) plus the zoo-level facts needed to read it alone."""
    own = {k: v for k, v in entry.items() if k not in NOT_EMBEDDED}
    own.update(schema=SCHEMA, schema_version=manifest.get("schema_version", SCHEMA_VERSION),
               family=manifest["family"], dataset=manifest["dataset"], klas_version=manifest["klas_version"])
    return own


def check_embedded(entry: dict, metadata: dict[str, str], where: str) -> None:
    """Refuse a model file whose own metadata disagrees with the manifest (e.g. two entries' files swapped and
    hashes re-computed by hand)."""
    raw = metadata.get(METADATA_KEY)
    if raw is None:
        raise ZooError(f"{where}: no {METADATA_KEY!r} metadata in the ONNX file; not exported by klas")
    try:
        own = json.loads(raw)
    except json.JSONDecodeError:
        raise ZooError(f"{where}: unreadable {METADATA_KEY!r} metadata in the ONNX file") from None
    for key in ("name", "config", "flops", "params", "input"):
        mine, theirs = own.get(key), entry.get(key)
        if key == "input" and isinstance(mine, dict) and isinstance(theirs, dict):
            mine = {k: mine.get(k) for k in theirs}  # an older schema's manifest lists fewer input fields
        if mine != theirs:
            raise ZooError(f"{where}: the file's embedded {key!r} ({json.dumps(own.get(key))[:60]}) does not match "
                            f"{MANIFEST} ({json.dumps(entry.get(key))[:60]})")


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
