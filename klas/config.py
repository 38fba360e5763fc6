"""The run configuration: TOML <-> the stages' config dataclasses.

A config has one section per stage (``[probes]``, ``[scores]``, ... named and ordered as ``klas.stages.STAGES``)
plus ``[run]`` and ``[data]`` (below); nested dataclass fields are sub-tables (``[finetune.init]``). Nothing here
holds a default: every default, range and choice lives on its dataclass field (``klas.contract.setting``);
``klas config`` prints the whole schema as a commented TOML file. Every value -- from the file, from ``--set`` or
from a single-stage command's flag -- is checked when the config is loaded, before any stage runs, and an error
names the key and where its value came from.
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from klas.contract import Spec, build, setting, specs
from klas.errors import KlasError, file_error

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "fmnist-deit.toml"


def _families() -> tuple[str, ...]:
    from klas.families import list_families

    return tuple(list_families())


@dataclass(frozen=True)
class RunConfig:
    """Run-wide settings: which family, the seed of every random choice, CPU threads."""

    family: str = setting("fmnist-deit", "family to stitch: a registered name (`klas anchors list`), the [family] "
                          "section's, or a family file (path ending in .toml, relative to the config)",
                          choices=_families)
    seed: int = setting(0, "seed of every random choice (data order, inits, sampling)", ge=0)
    threads: int | None = setting(None, "torch CPU threads", ge=1, none="auto", key=False)
    weights: str | None = setting(None, "directory of <anchor>.safetensors/.pth files instead of the family's own "
                                  "pretrained weights", none="default")


def _dataset_names() -> tuple[str, ...]:
    from klas.tasks import dataset_names

    return dataset_names()


@dataclass(frozen=True)
class DataConfig:
    """Which dataset and where: by default the family's own dataset at its default location."""

    dataset: str | None = setting(None, "dataset name", none="family", choices=_dataset_names)
    root: str | None = setting(None, "dataset directory", none="default")
    prompts: str | None = setting(None, "prompt/reference pairs (jsonl: prompt + reference, or TruthfulQA's "
                                  "question + best_answer) for language models: 60 % join the training text, 40 % "
                                  "are continued and scored by ROUGE (none: pairs cut from the test documents)",
                                  none="none")
    workers: int = setting(2, "DataLoader worker processes that read and transform images from disk (0: in the "
                           "main process)", ge=0, key=False)
    in_memory: str = setting("auto", "hold a split in memory as uint8 at the family's input size (the fast path; "
                             "same batches as streaming) or stream it from disk: auto = in memory when it fits "
                             "memory_mb and training augmentation is light", choices=("auto", "yes", "no"),
                             key=False)
    memory_mb: int = setting(1024, "largest split (uint8 at the input size) held in memory when in_memory = auto",
                             ge=0, key=False)
    train_transform: str = setting("auto", "training augmentation of finetuning: light = random shifts of up to 2 "
                                   "px and flips on whole uint8 batches; timm = timm's train transform (random "
                                   "resized crop, flip, colour jitter) per image; auto = light for inputs up to 64 "
                                   "px, timm above", choices=("auto", "light", "timm"))


def sections() -> dict[str, type]:
    """Section name -> config dataclass, in pipeline order."""
    from klas.stages import stage_modules

    return {"run": RunConfig, "data": DataConfig, **{m.NAME: m.CONFIG for m in stage_modules()}}


class Config:
    """A loaded, checked configuration: ``cfg.probes`` is a ``ProbesConfig``, ``cfg.run`` a ``RunConfig``, ...;
    ``cfg.origin`` maps ``section.key`` to where its value came from."""

    def __init__(self, values: dict[str, Any], origin: dict[str, str], family: Any = None):
        self._values = values
        self.origin = origin
        self.family_cfg = family  # a FamilyCfg from the [family] section / a family file, else None

    @property
    def family_key(self) -> dict | None:
        """The family definition and its weights files' digests (cache key part); None for registered families."""
        if self.family_cfg is None:
            return None
        from klas.families.user import family_digest

        return family_digest(self.family_cfg)

    def __getattr__(self, name: str):
        try:
            return self.__dict__["_values"][name]
        except KeyError:
            raise AttributeError(name) from None

    def __getitem__(self, name: str):
        return self._values[name]

    def __eq__(self, other) -> bool:
        return isinstance(other, Config) and self._values == other._values

    def to_toml(self, comments: bool = False) -> str:
        text = render_toml(self._values, comments)
        if self.family_cfg is not None:
            from klas.families.user import family_definition, render_family

            text += ("# the family, from " + self.family_cfg.source + "\n" if comments else "") + \
                render_family(family_definition(self.family_cfg))
        return text


def _flatten(table: dict, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out = {}
    for k, v in table.items():
        if isinstance(v, dict):
            out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


class _Layers:
    """Values by (section, path), each remembering where it came from; later layers override earlier ones."""

    def __init__(self):
        self.values: dict[str, dict[tuple[str, ...], Any]] = {}
        self.labels: dict[str, dict[tuple[str, ...], str]] = {}

    def add(self, section: str, path: tuple[str, ...], value: Any, label: str, schema: dict[str, type]) -> None:
        if section not in schema:
            raise KlasError(f"{label}: unknown section [{section}]; sections: {', '.join(schema)}")
        known = {s.path: s for s in specs(schema[section])}
        if path not in known:
            if any(p[:len(path)] == path for p in known):
                raise KlasError(f"{label}: [{section}] {'.'.join(path)} is a table of keys, not a value")
            keys = ", ".join(".".join(p) for p in known)
            raise KlasError(f"{label}: unknown key [{section}] {'.'.join(path)}; keys: {keys}")
        self.values.setdefault(section, {})[path] = value
        self.labels.setdefault(section, {})[path] = label

    def add_toml(self, raw: dict, source: str, schema: dict[str, type]) -> None:
        for section, table in raw.items():
            if section not in schema:
                raise KlasError(f"{source}: unknown section [{section}]; sections: {', '.join(schema)}")
            if not isinstance(table, dict):
                raise KlasError(f"{source}: [{section}] must be a table of keys")
            for path, value in _flatten(table).items():
                self.add(section, path, value, f"{source}: [{section}] {'.'.join(path)}", schema)


def parse_set(item: str) -> tuple[str, tuple[str, ...], Any]:
    """``section.key=value`` (the value parsed as TOML: 3, 0.1, "text", true; a bare word is a string)."""
    key, eq, value = item.partition("=")
    parts = tuple(p.strip() for p in key.strip().split("."))
    if not eq or len(parts) < 2 or not all(parts):
        raise KlasError(f"--set {item!r}: expected section.key=value, e.g. --set probes.epochs=2")
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()
    return parts[0], parts[1:], parsed


def read_toml(path: Path | str) -> dict:
    path = Path(path)
    try:
        return tomllib.loads(path.read_text())
    except OSError as e:
        raise file_error(path, e, "a TOML config file") from None
    except UnicodeDecodeError:
        raise KlasError(f"{path}: not a text file, expected a TOML config file") from None
    except tomllib.TOMLDecodeError as e:
        raise KlasError(f"{path}: invalid TOML ({e})") from None


def load_config(path: Path | str | None = None, sets: list[str] | None = None,
                flags: dict[tuple[str, tuple[str, ...]], tuple[Any, str]] | None = None,
                raw: dict | None = None) -> Config:
    """The checked config: defaults <- TOML file (default: the embedded one) or ``raw`` <- ``--set`` items <-
    ``flags`` ({(section, path): (value, flag name)}, from a single-stage command)."""
    from klas.research import register_all

    register_all()  # NOTE: the research metrics and selection methods are choices of the scores/selection settings
    schema = sections()
    layers = _Layers()
    if raw is not None:
        raw, source, base = dict(raw), "config", None
    else:
        path = Path(path) if path else DEFAULT_CONFIG
        raw, source, base = read_toml(path), str(path), path.parent
    family_table = raw.pop("family", None)
    layers.add_toml(raw, source, schema)
    for item in sets or []:
        section, key, value = parse_set(item)
        layers.add(section, key, value, f"--set {section}.{'.'.join(key)}", schema)
    for (section, key), (value, flag) in (flags or {}).items():
        layers.add(section, key, value, flag, schema)
    family = _config_family(layers, family_table, source, base)
    values = {name: build(cls, layers.values.get(name, {}), layers.labels.get(name, {}))
              for name, cls in schema.items()}
    origin = {f"{s}.{'.'.join(p)}": lab for s, labs in layers.labels.items() for p, lab in labs.items()}
    return Config(values, origin, family)


def _config_family(layers: _Layers, table: Any, source: str, base: Path | None):
    """A family defined by the config -- the ``[family]`` section, or ``[run] family = "file.toml"`` (relative to
    the config's folder) -- parsed, checked and registered; ``[run] family`` is set to its name. None otherwise."""
    from klas.families.user import parse_family, register_config_family

    given = layers.values.get("run", {}).get(("family",))
    label = layers.labels.get("run", {}).get(("family",), "[run] family")
    if isinstance(given, str) and given.endswith(".toml"):
        if table is not None:
            raise KlasError(f"{label} = {given!r}: the config has a [family] section too; give one or the other")
        f = Path(given).expanduser()
        if not f.is_absolute() and not label.startswith("--") and base is not None:
            f = base / f
        doc = read_toml(f)
        table, source, base = doc.get("family", doc), str(f), f.parent
    elif table is not None and given is not None and given != (table.get("name") if isinstance(table, dict) else None):
        raise KlasError(f"{label} = {given!r}: the [family] section of {source} defines "
                        f"{table.get('name') if isinstance(table, dict) else None!r}; drop one of them")
    if table is None:
        return None
    cfg = register_config_family(parse_family(table, source, base))
    layers.values.setdefault("run", {})[("family",)] = cfg.name
    layers.labels.setdefault("run", {})[("family",)] = f"{source}: [family] name"
    return cfg


def render_toml(values: dict[str, Any] | None = None, comments: bool = True) -> str:
    """A config as TOML (``values``: section -> dataclass; default: every default), each key with its help."""
    schema = sections()
    values = values or {name: cls() for name, cls in schema.items()}
    lines: list[str] = []
    for name, cls in schema.items():
        obj = values[name]
        groups: dict[tuple[str, ...], list[Spec]] = {}
        for s in specs(cls):
            groups.setdefault(s.path[:-1], []).append(s)
        for sub, leaves in groups.items():
            head = ".".join((name,) + sub)
            if comments and not sub and (cls.__doc__ or "").strip():
                lines.append("# " + (cls.__doc__ or "").strip().splitlines()[0])
            lines.append(f"[{head}]")
            for s in leaves:
                v = obj
                for p in s.path:
                    v = getattr(v, p)
                if comments:
                    extra = []
                    allowed = s.allowed()
                    if allowed:
                        extra.append("one of " + ", ".join(map(str, allowed)))
                    if s.optional and s.meta.get("none"):
                        extra.append(f'or "{s.meta["none"]}"')
                    lines.append(f"# {s.meta.get('help', '')}" + (f" ({'; '.join(extra)})" if extra else ""))
                lines.append(f"{s.path[-1]} = {s.show(v)}")
            lines.append("")
    return "\n".join(lines)



# --------------------------------------------------------------------------------------------------- CLI flags
def _parse_flag(text: str) -> Any:
    """A flag's text as a TOML value (3, 0.1, true) or, failing that, the bare string ("all", "ls")."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def add_flags(parser, section: str, exclude: tuple[str, ...] = (), prefix: str = "", cls: type | None = None) -> None:
    """One flag per setting of ``section``'s dataclass (or of ``cls``, a settings dataclass outside the run config,
    e.g. the anchor trainer's recipe; nested ones prefixed: ``--init-method``; all of them with ``prefix`` where two
    sections share a command), help and default from the field; the parsed value is only a candidate -- it is
    checked like any other when the config is built."""
    import argparse

    cls = cls or sections()[section]
    group = parser.add_argument_group(f"[{section}] settings" + ("" if cls is not sections().get(section) else
                                      " (default: the run's config.toml, else the defaults)"))
    for s in specs(cls):
        if s.dotted in exclude:
            continue
        allowed = s.allowed()
        extra = (f"; one of {', '.join(map(str, allowed))}" if allowed else "") + \
            (f'; or "{s.meta["none"]}"' if s.optional and s.meta.get("none") and s.default is not None else "")
        kw = dict(dest="__".join(("cfg", section) + s.path), default=argparse.SUPPRESS,
                  help=f"{s.meta.get('help', '')} (default: {s.show(s.default)}{extra})")
        flag = "--" + prefix + s.flag[2:]
        if s.type is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        else:
            group.add_argument(flag, type=_parse_flag, metavar=s.type.__name__.upper(), **kw)


def flag_values(args, section: str, prefix: str = "", cls: type | None = None
                ) -> dict[tuple[str, tuple[str, ...]], tuple[Any, str]]:
    """The settings given as flags: {(section, path): (value, "--flag")}."""
    out = {}
    for s in specs(cls or sections()[section]):
        dest = "__".join(("cfg", section) + s.path)
        if hasattr(args, dest):
            out[(section, s.path)] = (getattr(args, dest), "--" + prefix + s.flag[2:])
    return out


def from_flags(args, section: str, cls: type):
    """An instance of a settings dataclass outside the run config (e.g. the anchor trainer's ``Recipe``) from its
    flags, every value checked."""
    given = flag_values(args, section, cls=cls)
    return build(cls, {p: v for (_, p), (v, _) in given.items()}, {p: f for (_, p), (_, f) in given.items()})
