"""The stage contract. Every stage (``klas/stages/s<N>_<name>.py``) owns exactly three things:

* a frozen config dataclass whose fields are declared with :func:`setting` -- the only place its defaults, ranges,
  choices and help text live; the TOML schema, ``--set`` and every CLI flag are derived from it (``klas.config``);
* a typed, versioned :class:`Artifact` with ``save``/``load`` (written atomically, validated on load with a
  one-line error) and a content digest that downstream stages are keyed on;
* ``run(cfg, ctx) -> artifact``, where ``ctx`` is a :class:`StageContext` (run directory, run-wide settings, the
  family, the stage's cache key).

The pipeline (``klas.pipeline``) alone decides whether a stage is up to date. docs/stages.md has worked examples.
"""
from __future__ import annotations

import hashlib
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, ClassVar

from klas.errors import KlasError


MAX_INT = 2 ** 31 - 1  # the upper bound of every integer setting without its own ``le``


def setting(default: Any, help: str = "", *, ge: float | None = None, gt: float | None = None,
            le: float | None = None, choices: tuple | Callable[[], tuple] | None = None, none: str | None = None,
            key: bool = True):
    """A config field. ``none``: the word that means ``None`` in TOML/CLI (e.g. "all", "auto"); ``choices``: the
    allowed values (or a function returning them, for registries); ``key=False``: the field changes speed, not
    results (threads), so it is left out of the stage's cache key."""
    return field(default=default, metadata=dict(help=help, ge=ge, gt=gt, le=le, choices=choices, none=none, key=key))


def overrides(**changes):
    """Class decorator, applied under ``@dataclass``: the config takes its base's settings with new defaults --
    ``name=default`` or ``name=(default, help)`` -- and keeps their ranges, choices and order. A config that differs
    from another only in defaults says only those (the anchor trainer's recipe and ``klas anchors adapt``'s)."""

    def apply(cls):
        hints, base = {}, {}
        for b in reversed(cls.__mro__[1:]):
            if is_dataclass(b):
                hints.update(typing.get_type_hints(b))
                base.update({f.name: f for f in fields(b)})
        unknown = sorted(set(changes) - set(base))
        if unknown:
            raise TypeError(f"{cls.__name__}: no settings {unknown} to override")
        annotations = dict(cls.__dict__.get("__annotations__", {}))
        for name, new in changes.items():
            default, help = new if isinstance(new, tuple) else (new, base[name].metadata.get("help", ""))
            annotations[name] = hints[name]
            setattr(cls, name, field(default=default, metadata={**base[name].metadata, "help": help}))
        cls.__annotations__ = annotations
        return cls
    return apply


def toml_value(v: Any) -> str:
    """``v`` as a TOML value -- the one writer of config and family files (strings escaped, tuples as arrays)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (str, Path)):
        import json
        return json.dumps(str(v))  # a JSON string is a TOML basic string: the same escapes
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{toml_key(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise KlasError(f"{v!r}: not a TOML value (TOML has no null)" if v is None else
                    f"a {type(v).__name__} is not a TOML value")


def toml_key(k: str) -> str:
    """A bare key where TOML allows one, else a quoted one."""
    import re
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else toml_value(k)


@dataclass(frozen=True)
class Spec:
    """One leaf setting of a config dataclass, as the schema walker sees it."""
    path: tuple[str, ...]  # field names from the section's dataclass down to this leaf
    type: type  # bool, int, float or str
    optional: bool
    default: Any
    meta: dict

    @property
    def dotted(self) -> str:
        return ".".join(self.path)

    @property
    def flag(self) -> str:
        return "--" + "-".join(self.path).replace("_", "-")

    def show(self, value: Any) -> str:
        """How a value is written in TOML and help texts."""
        return toml_value(self.meta.get("none") if value is None else value)

    def allowed(self) -> tuple | None:
        c = self.meta.get("choices")
        return tuple(c()) if callable(c) else c

    def coerce(self, value: Any, label: str) -> Any:
        """``value`` checked against this setting's type, choices and range; a one-line error names ``label`` (the
        file and key, the ``--set`` item or the flag it came from)."""
        flag = label.startswith("--") and not label.startswith("--set")
        bad = f"{label} {value!r}: expected" if flag else f"{label} = {value!r}: expected"
        none = self.meta.get("none")
        if self.optional and (value is None or (none is not None and value == none)):
            return None
        t = self.type
        if t is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, t) or (isinstance(value, bool) and t is not bool):
            alt = f' or "{none}"' if self.optional and none else ""
            raise KlasError(f"{bad} {t.__name__}{alt}")
        allowed = self.allowed()
        if allowed is not None and value not in allowed:
            raise KlasError(f"{bad} one of {', '.join(map(str, allowed))}")
        m = self.meta
        if t in (int, float):
            if value != value or value in (float("inf"), float("-inf")):
                raise KlasError(f"{bad} a finite number")
            if t is int and m.get("le") is None and abs(value) > MAX_INT:  # counts, sizes, seeds: an int32
                raise KlasError(f"{bad} a whole number of at most {MAX_INT:,} (no setting needs more)")
            for op, lim, ok in (("ge", ">=", lambda v, b: v >= b), ("gt", ">", lambda v, b: v > b),
                                ("le", "<=", lambda v, b: v <= b)):
                if m.get(op) is not None and not ok(value, m[op]):
                    alt = f' (or "{none}")' if self.optional and none else ""
                    raise KlasError(f"{bad} {lim} {m[op]}{alt}")
        return value


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def specs(cls, prefix: tuple[str, ...] = ()) -> list[Spec]:
    """Every leaf setting of a config dataclass, nested dataclass fields flattened (``init.method``)."""
    out = []
    hints = _hints(cls)
    for f in fields(cls):
        if f.metadata.get("internal"):
            continue  # set by code, not by users (e.g. a seed derived from the run's)
        hint = hints[f.name]
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        if is_dataclass(hint):
            out += specs(hint, prefix + (f.name,))
            continue
        args = typing.get_args(hint)
        optional = type(None) in args
        base = next(a for a in args if a is not type(None)) if args else hint
        if base not in (bool, int, float, str):
            raise TypeError(f"{cls.__name__}.{f.name}: settings are bool, int, float or str (or None), not {hint}")
        out.append(Spec(prefix + (f.name,), base, optional, default, dict(f.metadata)))
    return out


def build(cls, values: dict[tuple[str, ...], Any], labels: dict[tuple[str, ...], str]):
    """An instance of ``cls`` from ``{path: value}`` (missing paths take their defaults), every value checked;
    ``labels[path]`` says where a value came from, for the error message."""
    by_path = {s.path: s for s in specs(cls)}

    def make(c, prefix):
        kw = {}
        hints = _hints(c)
        for f in fields(c):
            path = prefix + (f.name,)
            if f.metadata.get("internal"):
                continue
            if is_dataclass(hints[f.name]):
                kw[f.name] = make(hints[f.name], path)
            elif path in values:
                kw[f.name] = by_path[path].coerce(values[path], labels.get(path, ".".join(path)))
        return c(**kw)
    return make(cls, ())


def key_fields(cfg) -> dict:
    """The settings of a config that define its results (``key=False`` ones left out), as plain data."""
    hints = _hints(type(cfg))
    out = {}
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        if is_dataclass(hints[f.name]):
            out[f.name] = key_fields(v)
        elif f.metadata.get("key", True) and not f.metadata.get("internal"):
            out[f.name] = v
    return out


def digest(*parts: Any) -> str:
    """Content hash of JSON-able parts (sorted keys): stage keys and artifact digests."""
    import json

    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------- artifacts
@dataclass(frozen=True)
class Artifact:
    """Base of every stage's output: a JSON record (``RECORD``, the dataclass fields plus kind and version) and the
    binary files it names (``FILES``), all in the stage's folder. ``digest(folder)`` hashes every one of them."""

    KIND: ClassVar[str] = ""
    VERSION: ClassVar[int] = 1
    RECORD: ClassVar[str] = ""
    FILES: ClassVar[tuple[str, ...]] = ()
    FOLDER: ClassVar[str] = ""  # the artifact's folder in the run directory ("": the stage's name, KIND)

    def save(self, folder: Path | str) -> None:
        from klas.io import save_json

        save_json(dict(kind=self.KIND, version=self.VERSION, **asdict(self)), Path(folder) / self.RECORD)

    @classmethod
    def load(cls, folder: Path | str):
        from klas.io import load_json

        path = Path(folder) / cls.RECORD
        if not path.is_file():
            raise KlasError(f"{path}: missing; run the {cls.KIND} stage first")
        rec = load_json(path)
        if not isinstance(rec, dict) or rec.get("kind") != cls.KIND:
            raise KlasError(f"{path}: not a {cls.KIND} artifact (kind {rec.get('kind') if isinstance(rec, dict) else None!r})")
        if rec.get("version") != cls.VERSION:
            raise KlasError(f"{path}: {cls.KIND} artifact version {rec.get('version')}, this klas reads "
                            f"version {cls.VERSION}; rerun the {cls.KIND} stage")
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in rec]
        if missing:
            raise KlasError(f"{path}: {cls.KIND} artifact lacks {', '.join(missing)}; rerun the {cls.KIND} stage")
        for f in cls.FILES:
            if not (Path(folder) / f).is_file():
                raise KlasError(f"{Path(folder) / f}: missing; rerun the {cls.KIND} stage")
        return cls(**{n: rec[n] for n in names})

    @classmethod
    def digest(cls, folder: Path | str) -> str | None:
        """sha256 over the record and every file of the artifact; None when any is missing."""
        from klas.io import sha256_file

        h = hashlib.sha256()
        for name in (cls.RECORD,) + tuple(cls.FILES):
            p = Path(folder) / name
            if not p.is_file():
                return None
            h.update(name.encode() + b"\0" + sha256_file(p).encode())
        return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------------------ context
@dataclass
class StageContext:
    """What a stage gets besides its own config: where to write, the run-wide settings, its cache key, and -- built
    on first use -- the family, its task, the data splits, the upstream artifacts, the device and the distributed
    state. A stage reads nothing else: no second API, no other stage's JSON.

    ``family`` is built from ``run`` (the registry name, pretrained/shipped weights or ``run.weights``) unless one is
    passed in (tests, research code).
    """

    run_dir: Any  # klas.rundir.RunDir
    run: Any  # klas.config.RunConfig
    data: Any  # klas.config.DataConfig
    key: str = ""
    progress: bool = True
    prebuilt: Any = None  # a Family built by the caller
    artifacts: dict = field(default_factory=dict)  # artifact class -> instance handed in by the pipeline
    # test and tool hooks by name, e.g. the finetune stage's ``on_step(step)`` (raising there simulates a crash) and
    # ``restart`` (False: refuse to discard checkpoints made under other settings)
    hooks: dict = field(default_factory=dict)

    @classmethod
    def open(cls, run_dir, family, *, seed: int = 0, weights: str | None = None, data=None, key: str = "",
             progress: bool = True, **hooks) -> "StageContext":
        """A context for one stage run outside the pipeline (research code, tests): ``family`` is a registered name
        or an already built Family (then used as it is); ``data`` the ``[data]`` settings (default: all defaults);
        ``hooks`` go to ``ctx.hooks``."""
        from klas.config import DataConfig, RunConfig
        from klas.research import register_all
        from klas.rundir import RunDir

        register_all()  # NOTE: the plug-ins a pipeline run sees (research metrics and methods), outside it too
        name = family if isinstance(family, str) else family.name
        data = data if data is not None else DataConfig()
        rd = run_dir if hasattr(run_dir, "stage") else RunDir(run_dir, name, data.dataset)
        return cls(run_dir=rd, run=RunConfig(family=name, seed=seed, weights=weights), data=data, key=key,
                   progress=progress, prebuilt=None if isinstance(family, str) else family, hooks=hooks)

    @cached_property
    def family(self):
        if self.prebuilt is not None:
            return self.prebuilt
        from klas.families import create_family

        # NOTE: always the pretrained anchors (shipped files, local weights or the hub), in every stage alike
        return create_family(self.run.family, pretrained=True, weights=self.run.weights)

    @property
    def family_cfg(self):
        """The family's definition (``FamilyCfg``), without building its anchors."""
        if self.prebuilt is not None:
            return self.prebuilt.cfg
        from klas.families import get_family_cfg

        return get_family_cfg(self.run.family)

    @cached_property
    def task(self):
        """The family's task plug-in (``klas.tasks``): everything that differs between kinds of model."""
        from klas.tasks import task_of

        return task_of(self.family_cfg)

    @property
    def seed(self) -> int:
        return self.run.seed

    @property
    def dataset(self) -> str:
        """The run's dataset, resolved once: ``[data] dataset``, else the family's own."""
        return self.data.dataset or self.family_cfg.dataset

    def split(self, name: str, *, augment: bool = False, family=None):
        """Split ``name`` (train / val / test) of the run's data, read and batched as the task says, preprocessed for
        ``family`` (default: the run's built family; a registered name reads the preprocessing without building)."""
        return self.task.open_split(family if family is not None else self.family, name, self.data,
                                    dataset=self.dataset, augment=augment)

    def upstream(self, cls):
        """The typed artifact of an upstream stage (``ctx.upstream(SelectionArtifact)``), loaded and validated."""
        if cls not in self.artifacts:
            self.artifacts[cls] = cls.load(self.folder_of(cls))
        return self.artifacts[cls]

    def folder_of(self, cls) -> Path:
        """Where an artifact class lives in this run."""
        return self.run_dir.path / (cls.FOLDER or cls.KIND)

    @property
    def dist(self):
        """The distributed state (``klas.distributed.DistInfo``): joins torchrun's process group on first use."""
        from klas import distributed as kd

        return kd.init()

    @property
    def device(self):
        return self.dist.device

    @property
    def data_root(self) -> str | None:
        return self.data.root

    def folder(self, stage: str) -> Path:
        return self.run_dir.stage(stage)
