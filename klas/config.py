"""The run configuration: one TOML file, every field with a default, validated with one-line errors.

The schema *is* the default config (``DEFAULTS``): a section per pipeline stage, each field's type is the type of its
default. ``klas/configs/fmnist-deit.toml`` is the embedded default and spells every field out with a comment.
"""
from __future__ import annotations

import copy
import hashlib
import json
import tomllib
from pathlib import Path

from klas.errors import KlasError

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "fmnist-deit.toml"

DEFAULTS: dict[str, dict] = {
    "run": {"family": "fmnist-deit", "seed": 0, "threads": 0},
    "data": {"dataset": "", "root": ""},
    "probes": {"epochs": 4, "batch_size": 256, "lr": 1e-2, "train_subset": 0},
    "scores": {"batch_size": 500, "temperature": 1.0, "impl": "", "val_subset": 0, "score_form": ""},
    "selection": {"method": "klas", "tau": 0.05, "num_buckets": 0, "anchor_rule": ""},
    "supernet": {"epochs": 1, "steps_per_epoch": 0, "batch_size": 128, "lr": 5e-4, "train_subset": 0,
                 "init": "ls", "sampling": "balanced"},
    "evaluation": {"test_subset": 0, "latency_repeats": 30, "threads": 1},
    "export": {"opset": 18, "parity_images": 10000, "threads": 1, "batch": 1},
}


def _check_type(section: str, key: str, value, default, source: str):
    ok = isinstance(value, type(default)) and not (isinstance(value, bool) and not isinstance(default, bool))
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)  # 1 is a fine float
    if not ok:
        raise KlasError(f"{source}: [{section}] {key} = {value!r}: expected {type(default).__name__}")
    return value


def validate(raw: dict, source: str = "config") -> dict:
    """Merge ``raw`` over the defaults; unknown sections/keys and wrong types are one-line errors."""
    cfg = copy.deepcopy(DEFAULTS)
    for section, values in raw.items():
        if section not in DEFAULTS:
            raise KlasError(f"{source}: unknown section [{section}]; sections: {', '.join(DEFAULTS)}")
        if not isinstance(values, dict):
            raise KlasError(f"{source}: [{section}] must be a table of keys")
        for key, value in values.items():
            if key not in DEFAULTS[section]:
                raise KlasError(f"{source}: unknown key [{section}] {key}; keys: {', '.join(DEFAULTS[section])}")
            cfg[section][key] = _check_type(section, key, value, DEFAULTS[section][key], source)
    _check_values(cfg, source)
    return cfg


def _check_values(cfg: dict, source: str) -> None:
    from klas.families import list_families

    if cfg["run"]["family"] not in list_families():
        raise KlasError(f"{source}: [run] family = {cfg['run']['family']!r}: expected one of "
                        f"{', '.join(list_families())}")
    if cfg["selection"]["tau"] < 0:
        raise KlasError(f"{source}: [selection] tau = {cfg['selection']['tau']}: expected >= 0")
    for section, key in (("probes", "epochs"), ("probes", "batch_size"), ("scores", "batch_size"),
                         ("supernet", "batch_size"), ("supernet", "epochs"), ("export", "threads"),
                         ("export", "batch"), ("evaluation", "threads")):
        if cfg[section][key] <= 0:
            raise KlasError(f"{source}: [{section}] {key} = {cfg[section][key]}: expected > 0")
    root = cfg["data"]["root"]
    if root and not Path(root).is_dir():
        raise KlasError(f"{source}: [data] root = {root!r}: directory not found")


def load_config(path: Path | str | None = None, overrides: dict | None = None) -> dict:
    """Read and validate a TOML config (default: the embedded one), then apply ``{section: {key: value}}``."""
    path = Path(path) if path else DEFAULT_CONFIG
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise KlasError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise KlasError(f"{path}: invalid TOML ({e})") from None
    for section, values in (overrides or {}).items():
        raw.setdefault(section, {}).update(values)
    return validate(raw, str(path))


def section_hash(*parts) -> str:
    """Content hash of config sections and upstream hashes: a stage re-runs exactly when this changes."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
