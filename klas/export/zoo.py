"""What to export: the evaluation's zoo -- the user's untouched anchors (their weights as given), the admitted
configurations (through a model provider: the finetune stage's trained networks) and the cascades over them."""
from __future__ import annotations

from dataclasses import dataclass

from klas.errors import KlasError
from klas.export.member import Member, ModelProvider
from klas.stitch import StitchConfig, StitchedNet


def check_rows(rows: list, where: str) -> list[dict]:
    """The evaluation rows, checked: each has a config {source, i, target, j}, a boolean pareto, a percentage."""
    for k, row in enumerate(rows):
        cfg = row.get("config") if isinstance(row, dict) else None
        if not isinstance(cfg, dict) or not all(key in cfg for key in ("source", "i", "target", "j")):
            raise KlasError(f"{where}: configuration {k} has no config {{source, i, target, j}}")
        if "pareto" in row and not isinstance(row["pareto"], bool):
            raise KlasError(f"{where}: configuration {k}: 'pareto' must be true or false")
        acc = row.get("test_acc")
        if acc is not None and not (isinstance(acc, (int, float)) and 0 <= acc <= 100):
            raise KlasError(f"{where}: configuration {k}: test_acc {acc!r} is not a percentage in [0, 100]")
    return rows


@dataclass(frozen=True)
class ZooItem:
    """One model of the zoo to export: its manifest name, configuration, the evaluation's figures, and whether it
    is an untouched anchor (the weights the user gave, exported as given)."""

    name: str
    config: StitchConfig
    untouched: bool
    row: dict


def zoo_items(zoo: list[dict], where: str) -> list[ZooItem]:
    """The models of the evaluation's zoo (untouched anchors first); cascades are entries over two of them."""
    items = []
    for k, z in enumerate(zoo):
        if z.get("kind") == "cascade":
            continue
        cfg = StitchConfig.from_dict(z.get("config") or {}, f"{where}: zoo[{k}]")
        items.append(ZooItem(z["name"], cfg, z.get("kind") == "anchor", z))
    if not items:
        raise KlasError(f"{where}: the zoo is empty: nothing to export")
    return sorted(items, key=lambda it: not it.untouched)


def cascades(zoo: list[dict]) -> list[dict]:
    """The evaluation zoo's cascade entries."""
    return [z for z in zoo if z.get("kind") == "cascade"]


def members(items: list[ZooItem], provider: ModelProvider, anchors: dict, where: str) -> list[Member]:
    """The members to export: each untouched anchor from ``anchors`` (name -> the view rebuilt from the user's
    weights), every other configuration through ``provider``."""
    out = []
    for it in items:
        if it.untouched:
            if it.config.source not in anchors:
                raise KlasError(f"{where}: untouched anchor {it.name!r} cannot be rebuilt (anchors passed in?)")
            v = anchors[it.config.source]
            out.append(Member(it.config, StitchedNet(v, -1, v, -1, None), it.row, it.name, v))
        else:
            out.append(Member(it.config, provider, it.row, it.name))
    return out
