"""A family from the config: the ``[family]`` TOML table (or a family file ``[run] family = "path.toml"`` names).

```toml
[family]
name = "my-resnets"            # how runs and zoos call it
dataset = "imagefolder"        # default: imagefolder ([data] root says where)
num_classes = 10               # optional: default the anchors' model_args / timm's pretrained cfg

[family.input]                 # optional; what is not given comes from timm's pretrained cfg of the first anchor
channels = 1
size = 28                      # or [H, W]
mean = [0.2860]
std = [0.3530]
interpolation = "bilinear"
crop_pct = 1.0
crop_mode = "center"

[[family.anchors]]
name = "r8"
arch = "resnet18"              # a timm architecture
model_args = { layers = [1, 1, 1, 1], channels = [8, 16, 32, 64], stem_width = 8 }
weights = "models/r8.safetensors"   # a local file (relative to the TOML), "hf-hub:org/name", "timm" or "timm:<tag>"
```

``parse_family`` checks every key (one-line errors naming the file, the anchor and the key) and returns a
``FamilyCfg``; ``register_config_family`` puts it in the registry so every stage and command of the process builds it
by name like a registered family. ``family_definition`` is the plain-data form written back into a run's
``config.toml`` (paths made absolute) and ``family_digest`` the part of every stage's cache key that covers the
definition and the content (sha256) of every weights file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from klas.errors import KlasError
from klas.contract import toml_key, toml_value
from klas.families._registry import AnchorCfg, FamilyCfg, _FAMILIES, is_hub_id, register_family
from klas_runtime.preprocess import CROP_MODES, INTERPOLATIONS  # what the runtime can repeat

FAMILY_KEYS = ("name", "task", "dataset", "num_classes", "description", "input", "anchors")
ANCHOR_KEYS = ("name", "arch", "model_args", "weights")
INPUT_KEYS = ("channels", "size", "mean", "std", "interpolation", "crop_pct", "crop_mode")


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def parse_family(table: Any, source: str, base: Path | None = None) -> FamilyCfg:
    """A ``[family]`` table -> FamilyCfg. ``source`` names the file in errors; relative weights paths are taken
    from ``base`` (the TOML file's folder; default: the working directory) and made absolute."""
    base = Path(base) if base is not None else Path.cwd()
    where = f"{source}: [family]"
    if not isinstance(table, dict):
        raise KlasError(f"{where} must be a table (name, anchors, ...)")
    _keys_and_name(table, FAMILY_KEYS, where, "name")  # keys and name first: the same line for every task
    from klas.tasks import DEFAULT_TASK, get_task, task_names

    task = table.get("task", DEFAULT_TASK)
    if task not in task_names():
        raise KlasError(f"{where} task = {task!r}: expected one of {', '.join(task_names())}")
    return get_task(task).parse_family(table, source, base)  # each task says what its family table holds


def parse_image_family(table: dict, source: str, base: Path) -> FamilyCfg:
    """The image-classification ``[family]`` table (the module docstring's example)."""
    from klas.tasks import DEFAULT_TASK, get_task

    where = f"{source}: [family]"
    name = _keys_and_name(table, FAMILY_KEYS, where, "name")
    task = table.get("task", DEFAULT_TASK)
    datasets = get_task(task).datasets
    dataset = table.get("dataset", datasets[0] if datasets else None)
    if datasets and dataset not in datasets:
        raise KlasError(f"{where} dataset = {dataset!r}: expected one of {', '.join(datasets)}")
    description = table.get("description", "")
    if not isinstance(description, str):
        raise KlasError(f"{where} description: expected a string")
    num_classes = table.get("num_classes")
    if num_classes is not None and (not isinstance(num_classes, int) or isinstance(num_classes, bool)
                                    or num_classes < 1):
        raise KlasError(f"{where} num_classes = {num_classes!r}: expected an integer >= 1")
    inp = _parse_input(table.get("input", {}), f"{source}: [family.input]")
    raw_anchors = table.get("anchors")
    if not isinstance(raw_anchors, list) or not raw_anchors:
        raise KlasError(f"{where} anchors: expected at least two [[family.anchors]] tables")
    anchors = [_parse_anchor(a, f"{where} anchors[{k}]", base, inp, num_classes) for k, a in enumerate(raw_anchors)]
    if len(anchors) < 2:
        raise KlasError(f"{where} anchors: a family needs at least two anchors to stitch, got one "
                        f"({anchors[0].name!r})")
    names = [a.name for a in anchors]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise KlasError(f"{where} anchors: name {dup!r} is used twice")
    if num_classes is None:
        num_classes = anchors[0].model_args.get("num_classes") or _pretrained(anchors[0]).get("num_classes") or 1000
    channels = inp.get("channels") or anchors[0].model_args.get("in_chans") or 3
    size = inp.get("size") or tuple((_pretrained(anchors[0]).get("input_size") or (3, 224, 224))[1:])
    return FamilyCfg(name=name, anchors=tuple(anchors), input_shape=(int(channels), int(size[0]), int(size[1])),
                     dataset=dataset or "", num_classes=int(num_classes), description=description or f"from {source}",
                     input=inp, source=source, task=task)


def _pretrained(anchor: AnchorCfg) -> dict:
    import timm

    tag = anchor.weights.split(":", 1)[1] if anchor.weights and anchor.weights.startswith("timm:") else None
    try:
        cfg = timm.get_pretrained_cfg(f"{anchor.arch}.{tag}" if tag else anchor.arch)
    except Exception:  # noqa: BLE001
        return {}
    return cfg.to_dict() if cfg is not None else {}


def _parse_input(t: Any, where: str) -> dict:
    if not isinstance(t, dict):
        raise KlasError(f"{where} must be a table ({', '.join(INPUT_KEYS)})")
    out: dict = {}
    for k, v in t.items():
        if k not in INPUT_KEYS:
            raise KlasError(f"{where} {k}: unknown key; keys: {', '.join(INPUT_KEYS)}")
        bad = f"{where} {k} = {v!r}: expected"
        if k == "channels":
            if v not in (1, 3) or isinstance(v, bool):
                raise KlasError(f"{bad} 1 (grayscale) or 3 (RGB)")
            out[k] = int(v)
        elif k == "size":
            size = [v, v] if isinstance(v, int) and not isinstance(v, bool) else v
            if not (isinstance(size, list) and len(size) == 2 and all(isinstance(s, int) and not isinstance(s, bool)
                                                                       and 8 <= s <= 4096 for s in size)):
                raise KlasError(f"{bad} an integer or [H, W] between 8 and 4096")
            out[k] = (int(size[0]), int(size[1]))
        elif k in ("mean", "std"):
            vals = [v] if _num(v) else v
            if not (isinstance(vals, list) and len(vals) in (1, 3) and all(_num(x) for x in vals)) or \
                    (k == "std" and any(x <= 0 for x in vals)):
                raise KlasError(f"{bad} 1 or 3 numbers" + (" > 0" if k == "std" else ""))
            out[k] = tuple(float(x) for x in vals)
        elif k == "interpolation":
            if v not in INTERPOLATIONS:
                raise KlasError(f"{bad} one of {', '.join(INTERPOLATIONS)}")
            out[k] = v
        elif k == "crop_pct":
            if not _num(v) or not 0.1 <= v <= 2.0:
                raise KlasError(f"{bad} a number in [0.1, 2] (1.0: no crop)")
            out[k] = float(v)
        elif k == "crop_mode":
            if v not in CROP_MODES:
                raise KlasError(f"{bad} one of {', '.join(CROP_MODES)}")
            out[k] = v
    c = out.get("channels")
    for k in ("mean", "std"):
        if c is not None and k in out and len(out[k]) not in (1, c):
            raise KlasError(f"{where} {k}: {len(out[k])} values for {c} channels")
    return out


def _keys_and_name(t: dict, keys: tuple[str, ...], where: str, what: str) -> str:
    """A table's keys checked against ``keys`` and its ``name`` (used in paths: non-empty, no '/'), returned."""
    unknown = [k for k in t if k not in keys]
    if unknown:
        raise KlasError(f"{where} {unknown[0]}: unknown key; keys: {', '.join(keys)}")
    name = t.get("name")
    if not isinstance(name, str) or not name.strip() or "/" in name:
        raise KlasError(f"{where} name = {name!r}: expected a non-empty {what} without '/'")
    return name


def _parse_anchor(t: Any, where: str, base: Path, inp: dict, num_classes: int | None) -> AnchorCfg:
    if not isinstance(t, dict):
        raise KlasError(f"{where}: expected a table (name, arch, model_args, weights)")
    name = _keys_and_name(t, ANCHOR_KEYS, where, "anchor name")
    where = f"{where} ({name})"
    arch = t.get("arch")
    if not isinstance(arch, str) or not arch:
        raise KlasError(f"{where} arch: expected a timm architecture name, e.g. resnet18")
    import timm

    if not timm.is_model(arch):
        import difflib
        close = difflib.get_close_matches(arch, timm.list_models(), n=3)
        raise KlasError(f"{where} arch = {arch!r}: unknown timm architecture"
                        + (f" (did you mean {', '.join(close)}?)" if close else ""))
    args = t.get("model_args", {})
    if not isinstance(args, dict):
        raise KlasError(f"{where} model_args: expected a table of timm constructor arguments")
    args = dict(args)
    for key, fam_value, what in (("in_chans", inp.get("channels"), "[family.input] channels"),
                                 ("num_classes", num_classes, "[family] num_classes")):
        if fam_value is None:
            continue
        if key in args and args[key] != fam_value:
            raise KlasError(f"{where} model_args.{key} = {args[key]!r} contradicts {what} = {fam_value!r}")
        args[key] = fam_value
    w = t.get("weights")
    if w is not None:
        if not isinstance(w, str) or not w:
            raise KlasError(f"{where} weights: expected a file path, \"hf-hub:org/name\", \"timm\" or \"timm:<tag>\"")
        if not is_hub_id(w):
            p = Path(w).expanduser()
            p = (p if p.is_absolute() else base / p).resolve()
            if not p.is_file():
                raise KlasError(f"{where} weights = {w!r}: file not found ({p})")
            w = str(p)
    return AnchorCfg(name=name, arch=arch, model_args=args, weights=w)


def register_config_family(cfg: FamilyCfg) -> FamilyCfg:
    """Register a family from a config; a registered family of that name defined in code may not be replaced."""
    old = _FAMILIES.get(cfg.name)
    if old is not None and not old.source:
        raise KlasError(f"{cfg.source}: [family] name = {cfg.name!r}: taken by a registered family; choose another "
                        f"name (or use the registered one with [run] family = {cfg.name!r})")
    return register_family(cfg)


def family_definition(cfg: FamilyCfg) -> dict:
    """The family as a plain ``[family]`` table (absolute weights paths): written into the run's config.toml, so
    every later command of the run rebuilds the same family."""
    out: dict = dict(name=cfg.name, dataset=cfg.dataset, num_classes=cfg.num_classes)
    if cfg.task != "image-classification":  # NOTE: left out by default, so the cache keys of earlier runs hold
        out["task"] = cfg.task
    if cfg.description and cfg.description != f"from {cfg.source}":
        out["description"] = cfg.description
    if cfg.input:
        out["input"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.input.items()}
    out["anchors"] = [dict(name=a.name, arch=a.arch, model_args=dict(a.model_args),
                           **({"weights": a.weights} if a.weights else {})) for a in cfg.anchors]
    return out


_SHA_CACHE: dict[tuple, str] = {}


def file_sha256(path: Path) -> str:
    """sha256 of a weights file, cached by (path, size, mtime): the cache key of every stage reads it."""
    from klas.io import sha256_file

    if path.is_dir():  # a model folder (config.json + safetensors): every file in it, by name
        import hashlib

        h = hashlib.sha256()
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(str(f.relative_to(path)).encode() + b"\0" + file_sha256(f).encode())
        return h.hexdigest()
    st = path.stat()
    k = (str(path), st.st_size, st.st_mtime_ns)
    if k not in _SHA_CACHE:
        _SHA_CACHE[k] = sha256_file(path)
    return _SHA_CACHE[k]


def family_digest(cfg: FamilyCfg) -> dict:
    """What a family from the config contributes to every stage's cache key: its definition and the sha256 of each
    local weights file (hub ids as given), so editing the TOML or replacing a weights file re-runs the stages."""
    files = {a.name: (file_sha256(Path(a.weights)) if a.weights and Path(a.weights).exists() else a.weights)
             for a in cfg.anchors}
    return dict(definition=family_definition(cfg), weights=files)


# --------------------------------------------------------------------------------------------------- TOML out
def render_family(definition: dict) -> str:
    """A ``[family]`` table as TOML text (what ``parse_family`` reads back)."""
    lines = ["[family]"]
    for k, v in definition.items():
        if k not in ("input", "anchors"):
            lines.append(f"{toml_key(k)} = {toml_value(v)}")
    lines.append("")
    if definition.get("input"):
        lines.append("[family.input]")
        lines += [f"{toml_key(k)} = {toml_value(v)}" for k, v in definition["input"].items()]
        lines.append("")
    for a in definition.get("anchors", []):
        lines.append("[[family.anchors]]")
        lines += [f"{toml_key(k)} = {toml_value(v)}" for k, v in a.items()]
        lines.append("")
    return "\n".join(lines)
