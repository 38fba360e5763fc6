"""``klas run [CONFIG]``: every stage from the family to a shippable zoo; ``klas config``: the settings schema."""
from __future__ import annotations

from pathlib import Path


def _run(args) -> int:
    from klas.config import load_config
    from klas.pipeline import apply_run_settings, run_pipeline
    from klas.summary import print_summary

    cfg = load_config(args.config, args.set)
    apply_run_settings(cfg)
    run_pipeline(cfg, args.run_dir, dry_run=args.dry_run, until=args.until)
    if not args.dry_run and args.until in (None, "export"):
        print_summary(args.run_dir)
    return 0


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
