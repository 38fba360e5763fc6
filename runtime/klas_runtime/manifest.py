"""The zoo manifest (``manifest.json``): a versioned schema, validated on every load, with no torch import.

A zoo directory holds one self-contained ``.onnx`` file per model and this manifest, which says for each model what
it is (stitch configuration), what it costs (params, FLOPs per image, measured latency per execution provider /
threads / batch) and how good it is (test accuracy, parity with PyTorch). Deployment hosts read it through
``klas_runtime.runtime`` with numpy + onnxruntime only: standard library here, no torch and no ``klas`` import.

Schema version 2 adds **cascade** entries (``"kind": "cascade"``, no file of their own): two model entries of the
same manifest, the cheaper first, and a threshold -- the second runs on a sample when the first's max softmax
probability is below it. Entries without ``kind`` are models; version-1 manifests (models only) are still read.

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
from pathlib import Path
from typing import Any

from klas_runtime.errors import ZooError
from klas_runtime.io import atomic_path

MANIFEST = "manifest.json"
SCHEMA = "klas-zoo"
SCHEMA_VERSION = 2  # 2: cascade entries ("kind": "cascade"); 1 (models only) is still read
CASCADE_SINCE = 2
KINDS = ("model", "cascade")
METADATA_KEY = "klas"  # ONNX metadata_props key holding the model's own manifest entry (JSON)
# Fields of a model entry that describe the file itself or later measurements, so they cannot live inside the file.
NOT_EMBEDDED = ("file", "sha256", "bytes", "latency")

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]*\.onnx$")


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
         "scale": (_pos_num, True), "mean": (_num_list, True), "std": (lambda v: _num_list(v) and min(v) > 0, True)}
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
         "kind": (lambda v: v == "model", False)}
SPLITS = {"val": (_num, True), "test": (_num, True)}
CASCADE = {"name": (_str, True), "kind": (lambda v: v == "cascade", True),
           "members": (lambda v: isinstance(v, list) and len(v) == 2 and all(_str(x) for x in v), True),
           "threshold": (lambda v: _num(v) and 0 < v <= 1, True), "flops": (_nonneg_int, True),
           "flops_avg": (SPLITS, True), "deferral": ({"val": (_fraction, True), "test": (_fraction, True)}, True),
           "params": (_nonneg_int, True), "test_acc": (_percent, True), "val_acc": (_percent, True),
           "test_acc_source": (_str, False), "latency": (lambda v: isinstance(v, list), True)}
TOP = {"schema": (lambda v: v == SCHEMA, True), "schema_version": (_nonneg_int, True), "family": (_str, True),
       "dataset": (_str, True), "klas_version": (_str, True), "created": (_str, True),
       "created_on": (MACHINE, True), "models": (lambda v: isinstance(v, list) and len(v) > 0, True)}

_EXPECTED = {"file": "a plain file name ending in .onnx inside the zoo folder (no path separators, no '..')",
             "sha256": "64 lowercase hex digits", "shape": "['batch', C, H, W] with positive ints",
             "test_acc": "a percentage in [0, 100]", "top1_agreement": "a fraction in [0, 1]",
             "schema": f"{SCHEMA!r}", "members": "a list of two model names, the cheaper first",
             "threshold": "a probability in (0, 1]", "val_acc": "a percentage in [0, 100]",
             "deferral": "a fraction in [0, 1]", "kind": "'model' or 'cascade'"}


def _check(obj: Any, schema: dict, where: str) -> None:
    if not isinstance(obj, dict):
        raise ZooError(f"{where}: expected an object, got {type(obj).__name__}")
    for key, (rule, required) in schema.items():
        if key not in obj:
            if required:
                raise ZooError(f"{where}: missing field {key!r}")
            continue
        if isinstance(rule, dict):
            _check(obj[key], rule, f"{where}.{key}")
        elif not rule(obj[key]):
            hint = _EXPECTED.get(key, "a valid value")
            raise ZooError(f"{where}.{key}: invalid value {json.dumps(obj[key])[:80]} (expected {hint})")


def validate(manifest: Any, where: str = MANIFEST) -> dict:
    """Check ``manifest`` against the schema; raise a one-line ZooError naming the first bad field."""
    _check(manifest, TOP, where)
    if manifest["schema_version"] > SCHEMA_VERSION:
        raise ZooError(f"{where}: schema version {manifest['schema_version']} is newer than this klas understands "
                        f"({SCHEMA_VERSION}); upgrade klas-runtime (or klas)")
    if manifest["schema_version"] < 1:
        raise ZooError(f"{where}: schema version {manifest['schema_version']} is not a klas zoo version")
    names, files = set(), set()
    for k, entry in enumerate(manifest["models"]):
        at = f"{where}: models[{k}]"
        kind = entry_kind(entry, at)
        if kind == "cascade":
            if manifest["schema_version"] < CASCADE_SINCE:
                raise ZooError(f"{at} (cascade {entry.get('name')!r}): cascade entries need schema_version "
                                f">= {CASCADE_SINCE} (this manifest says {manifest['schema_version']})")
            _check(entry, CASCADE, f"{at} (cascade {entry.get('name')!r})")
        else:
            _check(entry, MODEL, at)
        for r, rec in enumerate(entry["latency"]):
            _check(rec, LATENCY, f"{at}.latency[{r}]")
        if entry["name"] in names or entry.get("file") in files:
            raise ZooError(f"{at}: duplicate model name {entry['name']!r} or file {entry.get('file')!r}")
        names.add(entry["name"])
        if kind == "model":
            files.add(entry["file"])
            spec = entry["input"]
            if len(spec["mean"]) != spec["shape"][1] or len(spec["std"]) != spec["shape"][1]:
                raise ZooError(f"{at}.input: mean/std need one value per channel ({spec['shape'][1]})")
    models = {e["name"]: e for e in manifest["models"] if entry_kind(e) == "model"}
    for k, entry in enumerate(manifest["models"]):
        if entry_kind(entry) == "cascade":
            check_cascade(entry, models, f"{where}: models[{k}] (cascade {entry['name']!r})")
    return manifest


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


# --- files -------------------------------------------------------------------------------------------------------

def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def model_path(zoo_dir: Path | str, file: str) -> Path:
    """The path of a model file, refusing anything that is not a regular file directly inside ``zoo_dir``."""
    root = Path(zoo_dir).resolve()
    if not _SAFE_NAME.match(file) or file in (".", ".."):
        raise ZooError(f"{Path(zoo_dir) / MANIFEST}: model file {file!r} is not a plain name inside the zoo folder "
                        f"(refusing paths that could point elsewhere)")
    path = root / file
    if path.is_symlink() or path.resolve().parent != root:
        raise ZooError(f"{path}: points outside the zoo folder {root} (symlink); refusing it")
    return path


def read_model_bytes(zoo_dir: Path | str, entry: dict) -> bytes:
    """A model's bytes after checking its sha256 against the manifest (read once: what is checked is what runs)."""
    path = model_path(zoo_dir, entry["file"])
    if not path.is_file():
        raise ZooError(f"{path}: model file listed in {MANIFEST} is missing")
    data = path.read_bytes()
    digest = sha256_bytes(data)
    if digest != entry["sha256"]:
        raise ZooError(f"{path}: sha256 {digest[:12]}... does not match {MANIFEST} ({entry['sha256'][:12]}...); "
                        f"the file or the manifest was altered -- re-export the zoo")
    return data


def load_manifest(zoo_dir: Path | str, verify_files: bool = True) -> dict:
    """Read and validate ``ZOO_DIR/manifest.json``; with ``verify_files`` every model file's hash is checked too."""
    manifest = read_manifest(zoo_dir)
    for entry in manifest["models"]:
        if is_cascade(entry):  # no file of its own: its members are model entries, checked here
            continue
        if verify_files:
            read_model_bytes(zoo_dir, entry)
        else:
            model_path(zoo_dir, entry["file"])
    return manifest


def read_manifest(zoo_dir: Path | str) -> dict:
    """Read and validate ``ZOO_DIR/manifest.json`` against the schema, without looking at the model files."""
    path = Path(zoo_dir) / MANIFEST
    if not Path(zoo_dir).is_dir():
        raise ZooError(f"{zoo_dir}: zoo directory not found")
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ZooError(f"{path}: not found; make a zoo with `klas export RUN_DIR --out {zoo_dir}`") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ZooError(f"{path}: not valid JSON ({e})") from None
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
        if own.get(key) != entry.get(key):
            raise ZooError(f"{where}: the file's embedded {key!r} ({json.dumps(own.get(key))[:60]}) does not match "
                            f"{MANIFEST} ({json.dumps(entry.get(key))[:60]})")


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
