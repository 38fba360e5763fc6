"""``klas anchors ...``: list the registered families, evaluate an embedded family's shipped weights, train the
anchors of an embedded family (``klas.families.trainer``), adapt a family's anchors to a dataset's classes
(``klas.families.adapt``)."""
from __future__ import annotations

import sys
from pathlib import Path


def _list(args) -> int:
    from klas.families import get_family_cfg, list_families

    for name in list_families():
        cfg = get_family_cfg(name)
        kind = "embedded" if cfg.embedded else "timm hub"
        print(f"{name:12s} [{kind}] {cfg.dataset:14s} anchors: {', '.join(a.name for a in cfg.anchors)}")
        if cfg.description:
            print(f"{'':12s} {cfg.description}")
    return 0


def _train(args) -> int:
    from klas.config import from_flags
    from klas.families import get_family_cfg
    from klas.tasks import task_of

    recipe_cls, train = task_of(get_family_cfg(args.family)).anchor_trainer()  # each task trains its own kind
    recipe = from_flags(args, "recipe", recipe_cls)
    card = train(args.family, args.out, recipe, args.data_root, args.anchor, args.threads)
    print(f"[anchors] card: {card}")
    return 0


def _eval(args) -> int:
    from klas.families.trainer import zoo_eval

    zoo_eval(args.family, args.data_root, args.split)
    return 0


def family_order_warnings(rows: list[tuple[str, float, float]], size: str, where: str) -> list[str]:
    """One line (or none) naming every anchor that is larger (``size``: FLOPs or parameters) than a smaller one but
    not more accurate on val -- stitching cannot climb from the smaller to it. ``rows``: (name, size, val acc %)."""
    rows = sorted(rows, key=lambda r: r[1])
    pairs = []
    for k, (name, n, acc) in enumerate(rows):
        worse = [r for r in rows[:k] if r[1] < n and r[2] >= acc]
        if worse:
            small = max(worse, key=lambda r: r[2])
            pairs.append(f"{name} ({_count(n)} {size}) {acc:.2f}% <= {small[0]} ({_count(small[1])} {size}) "
                         f"{small[2]:.2f}%")
    if not pairs:
        return []
    return [f"[family] warning: a larger anchor is not more accurate on val than a smaller one: {'; '.join(pairs)} "
            f"({where}); stitching cannot help between them"]


def _count(n: float) -> str:
    from klas_runtime.budget import format_count

    return format_count(n)


def adapted_family_warnings(folder: Path) -> list[str]:
    """``family_order_warnings`` of a family written by ``klas anchors adapt`` in ``folder``: its record's val
    accuracies, each anchor's parameter count read from its safetensors header (no model is built)."""
    from safetensors import safe_open

    from klas.families.adapt import RECORD
    from klas.io import load_json

    record = folder / RECORD
    if not record.is_file():
        return []
    rows = []
    for e in load_json(record).get("anchors", []):
        f = folder / e["file"]
        if not f.is_file() or e.get("val_acc") is None:
            continue
        with safe_open(str(f), "pt") as t:
            n = sum(_numel(t.get_slice(k).get_shape()) for k in t.keys())
        rows.append((e["name"], n, float(e["val_acc"])))
    return family_order_warnings(rows, "params", f"{record}, after adaptation")


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _adapt(args) -> int:
    import torch

    from klas.config import from_flags, load_config
    from klas.families.adapt import RUN_FILE, AdaptRecipe, adapt_family

    cfg = load_config(args.config, args.set)
    recipe = from_flags(args, "adapt", AdaptRecipe)
    threads = args.threads or cfg.run.threads
    if threads:
        torch.set_num_threads(threads)
    family_file = adapt_family(cfg, args.out, recipe, name=args.name, anchors=args.anchor, data_root=args.data_root)
    if family_file is None:
        return 0
    print(f"[adapt] family: {family_file}\n[adapt] run it: klas run {family_file.parent / RUN_FILE} (or set "
          f"[run] family = \"{family_file}\" in your config, without its [family] section)")
    for line in adapted_family_warnings(family_file.parent):
        print(line, file=sys.stderr)
    return 0


def register(sub) -> None:
    anc = sub.add_parser("anchors", help="anchor families: list, evaluate, train an embedded family's anchors")
    zsub = anc.add_subparsers(dest="anchors_command", required=True, metavar="ANCHORS_COMMAND")
    zl = zsub.add_parser("list", help="registered families and their anchors")
    zl.set_defaults(func=_list)
    ze = zsub.add_parser("eval", help="params, FLOPs and measured accuracy of an embedded family's shipped weights")
    ze.add_argument("family")
    ze.add_argument("--data-root", type=Path, default=None, help="dataset directory (default: the family's)")
    ze.add_argument("--split", default="test", choices=("train", "val", "test"))
    ze.set_defaults(func=_eval)
    zt = zsub.add_parser("train", help="train a family's anchors from scratch with one recipe (resumable)")
    zt.add_argument("family")
    zt.add_argument("--out", type=Path, default=None, help="output directory (default: the package's weights/)")
    zt.add_argument("--anchor", action="append", default=None, help="train only this anchor (repeatable)")
    from klas.config import add_flags
    from klas.families.trainer import Recipe

    add_flags(zt, "recipe", cls=Recipe)
    zt.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    zt.add_argument("--data-root", type=Path, default=None)
    zt.set_defaults(func=_train)
    za = zsub.add_parser("adapt", help="give each anchor a new head for the dataset's classes and finetune them all "
                         "with one recipe (resumable); writes weights + a family TOML for `klas run`")
    za.add_argument("config", nargs="?", type=Path, default=None,
                    help="the run's TOML config (its family and [data]; default: the embedded one)")
    za.add_argument("--out", type=Path, required=True, help="output directory: <anchor>.safetensors, family.toml, "
                    "run.toml, adapt.json (and checkpoints while it runs)")
    za.add_argument("--name", default=None, help="name of the adapted family (default: <family>-adapted)")
    za.add_argument("--anchor", action="append", default=None, help="adapt only this anchor (repeatable)")
    za.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override one setting of the config (repeatable), e.g. --set data.root=/data/mine")
    za.add_argument("--data-root", type=Path, default=None, help="dataset directory (default: the config's [data] root)")
    za.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    from klas.families.adapt import AdaptRecipe

    add_flags(za, "adapt", cls=AdaptRecipe)
    za.set_defaults(func=_adapt)
