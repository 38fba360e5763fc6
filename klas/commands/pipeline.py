"""``klas run [CONFIG]``: every stage from the family to a shippable zoo; ``klas config``: the settings schema."""
from __future__ import annotations

import sys
from pathlib import Path


def _run(args) -> int:
    from klas.config import load_config
    from klas.pipeline import apply_run_settings, run_pipeline
    from klas.summary import print_summary

    cfg = load_config(args.config, args.set)
    apply_run_settings(cfg)
    early = family_warnings(cfg, args.run_dir)

    def warn() -> None:  # to stderr: stdout stays the stage plan / summary that scripts read
        for line in early:
            print(line, file=sys.stderr)

    run_pipeline(cfg, args.run_dir, dry_run=args.dry_run, until=args.until, on_start=warn)
    if not args.dry_run and args.until in (None, "export"):
        print_summary(args.run_dir)
    if not early and not args.dry_run:  # first known now: the evaluation measured the untouched anchors on val
        for line in evaluated_family_warnings(args.run_dir):
            print(line, file=sys.stderr)
    return 0


def family_warnings(cfg, run_dir: Path) -> list[str]:
    """At the start of a run, from what is already known without building a model: the adaptation record beside
    a family file written by ``klas anchors adapt``, else this run directory's earlier evaluation, else an
    embedded family's model card."""
    from klas.commands.anchors import adapted_family_warnings

    source = getattr(cfg.family_cfg, "source", None)  # the family file a config's [run] family named
    path = Path(source) if isinstance(source, str) else None
    if path is not None and path.suffix == ".toml" and path.is_file():
        found = adapted_family_warnings(path.parent)
        if found:
            return found
    return evaluated_family_warnings(run_dir) or carded_family_warnings(cfg)


def carded_family_warnings(cfg) -> list[str]:
    """``family_order_warnings`` of an embedded family's model card (FLOPs and val accuracy of the shipped
    weights), known before any stage runs."""
    from klas.commands.anchors import family_order_warnings
    from klas.families import get_family_cfg
    from klas.families._registry import _EMBEDDED_WEIGHTS
    from klas.families.trainer import card_file
    from klas.io import load_json

    try:
        fam = cfg.family_cfg or get_family_cfg(cfg.run.family)
        if not fam.embedded:
            return []
        path = card_file(_EMBEDDED_WEIGHTS, fam.name)
        card = load_json(path)
    except Exception:  # noqa: BLE001 -- no card, or a family the run itself will report on
        return []
    names = {a.name for a in fam.anchors}
    rows = [(e["name"], e["flops"], e["val_acc"]) for e in card.get("anchors", [])
            if e.get("name") in names and isinstance(e.get("flops"), (int, float))
            and isinstance(e.get("val_acc"), (int, float))]
    return family_order_warnings(rows, "FLOPs", f"{path}, the family's card")


def evaluated_family_warnings(run_dir: Path) -> list[str]:
    """``family_order_warnings`` of the untouched anchors' FLOPs and val accuracy in the run's evaluation record
    (where an embedded or hub family's val accuracy is first known)."""
    from klas.commands.anchors import family_order_warnings
    from klas.stages.s5_evaluation import EvaluationArtifact

    folder = Path(run_dir) / "evaluation"
    if not (folder / EvaluationArtifact.RECORD).is_file():
        return []
    try:
        ev = EvaluationArtifact.load(folder)
    except Exception:  # noqa: BLE001 -- a stale or foreign record: the run itself will say what is wrong
        return []
    rows = [(u["key"], u["flops"], u["val_acc"]) for u in ev.untouched if u.get("val_acc") is not None]
    return family_order_warnings(rows, "FLOPs", f"{folder / EvaluationArtifact.RECORD}, untouched anchors")


def _config(args) -> int:
    from klas.config import load_config, render_toml

    if args.config is None and not args.set:
        print(render_toml(), end="")
    else:
        print(load_config(args.config, args.set).to_toml(comments=True), end="")
    return 0


def register(sub) -> None:
    from klas.stages import STAGES

    p = sub.add_parser("run", help="the whole pipeline on a config: probes -> ... -> ONNX zoo (resumable, cached)")
    p.add_argument("config", nargs="?", type=Path, default=None,
                   help="TOML config (default: the embedded klas/configs/fmnist-deit.toml)")
    p.add_argument("--run-dir", type=Path, default=Path("runs/demo"), help="run directory (default: runs/demo)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one setting (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print what would run and why; run and write nothing")
    p.add_argument("--until", default=None, choices=STAGES, help="stop after this stage")
    p.set_defaults(func=_run)

    c = sub.add_parser("config", help="print every setting with its default and help (or a config, checked)")
    c.add_argument("config", nargs="?", type=Path, default=None, help="a TOML config to check and print in full")
    c.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    c.set_defaults(func=_config)
