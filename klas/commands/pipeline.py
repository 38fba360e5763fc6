"""``klas run [CONFIG]``: every stage from the family to a shippable zoo."""
from __future__ import annotations

from pathlib import Path

from klas.errors import KlasError


def _parse_set(items: list[str]) -> dict:
    """``--set section.key=value`` (value parsed as TOML: 3, 0.1, "text", true)."""
    import tomllib

    out: dict = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not eq or not dot:
            raise KlasError(f"--set {item!r}: expected section.key=value, e.g. --set probes.epochs=2")
        try:
            parsed = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            parsed = value  # a bare word is a string
        out.setdefault(section, {})[name] = parsed
    return out


def _run(args) -> int:
    import torch

    from klas.config import load_config
    from klas.pipeline import run_pipeline
    from klas.summary import print_summary

    cfg = load_config(args.config, _parse_set(args.set))
    if cfg["run"]["threads"]:
        torch.set_num_threads(cfg["run"]["threads"])
    run_pipeline(cfg, args.run_dir, dry_run=args.dry_run, until=args.until)
    if not args.dry_run and args.until in (None, "zoo"):
        print_summary(args.run_dir)
    return 0


def register(sub) -> None:
    p = sub.add_parser("run", help="the whole pipeline on a config: probes -> ... -> ONNX zoo (resumable, cached)")
    p.add_argument("config", nargs="?", type=Path, default=None,
                   help="TOML config (default: the embedded klas/configs/fmnist-deit.toml)")
    p.add_argument("--run-dir", type=Path, default=Path("runs/demo"), help="run directory (default: runs/demo)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override one config field")
    p.add_argument("--dry-run", action="store_true", help="print the stages and what would run, run nothing")
    p.add_argument("--until", default=None, help="stop after this stage")
    p.set_defaults(func=_run)
