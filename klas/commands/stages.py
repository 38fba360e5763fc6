"""``klas probe | score | select | finetune | evaluate | export``: one stage of a run, through the pipeline.

Each command is generated from its stage's config dataclass (one flag per setting). It loads the run's config
(``RUN_DIR/config.toml``, written by every command; else ``--config`` or the embedded default), applies ``--set``
and the flags, and runs the pipeline up to that stage: earlier stages that are not up to date run first, and the
stages after it become stale, exactly as after a config change (``klas run --dry-run`` shows it).
"""
from __future__ import annotations

import argparse
from pathlib import Path

VERBS = {"probes": "probe", "scores": "score", "selection": "select", "finetune": "finetune",
         "evaluation": "evaluate", "export": "export"}


def base_config(run_dir: Path, config: Path | None) -> Path | None:
    """The config a single-stage command starts from: --config, else the run's own, else the embedded default."""
    if config is not None:
        return config
    own = Path(run_dir) / "config.toml"
    return own if own.is_file() else None


def _stage(args) -> int:
    from klas.config import flag_values, load_config
    from klas.pipeline import apply_run_settings, run_pipeline
    from klas.stages import stage_module

    cfg = load_config(base_config(args.run_dir, args.config), args.set, flag_values(args, args.stage))
    apply_run_settings(cfg)
    arts = run_pipeline(cfg, args.run_dir, until=args.stage, force=(args.stage,) if args.force else ())
    summary = stage_module(args.stage).summary(arts[args.stage])
    print(f"[{VERBS.get(args.stage, args.stage)}] " + ", ".join(f"{k} {v}" for k, v in summary.items()))
    return 0


def common_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None,
                   help="TOML config to start from (default: RUN_DIR/config.toml, else the embedded default)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one setting (repeatable)")


def register(sub) -> None:
    from klas.config import add_flags
    from klas.stages import stage_modules

    for mod in stage_modules():
        p = sub.add_parser(VERBS.get(mod.NAME, mod.NAME), help=f"the {mod.NAME} stage: {mod.DESCRIBE}",
                           description=f"The {mod.NAME} stage of a run ({mod.__name__}): {mod.DESCRIBE}. Earlier "
                           f"stages run first when they are not up to date.")
        p.add_argument("--run-dir", type=Path, required=True, help="run directory")
        common_flags(p)
        p.add_argument("--force", action="store_true", help="re-run this stage even when it is up to date")
        add_flags(p, mod.NAME)
        p.set_defaults(func=_stage, stage=mod.NAME)
