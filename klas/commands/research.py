"""``klas compare``: selection methods and stitch initialisations at equal finetuning cost
(``klas.research.compare``). Its finetuning and evaluation flags are those stages' settings, derived from the same
dataclasses as ``[finetune]`` and ``[evaluation]``."""
from __future__ import annotations

from pathlib import Path


def _compare(args) -> int:
    from klas.config import flag_values, load_config
    from klas.errors import KlasError
    from klas.io import load_json
    from klas.pipeline import apply_run_settings
    from klas.research.compare import Arm, compare, markdown, resolve_selection
    from klas.rundir import RunDir

    cfg = load_config(args.config, args.set, {**flag_values(args, "finetune"), **flag_values(args, "evaluation", "eval-")})
    apply_run_settings(cfg)
    family = RunDir(args.run_dir).family if args.run_dir else cfg.run.family
    sels = [resolve_selection(s, args.run_dir, family) for s in args.selection]
    family = family or load_json(sels[0][1]).get("family")
    if not family:
        raise KlasError(f"{sels[0][1]}: no 'family' field; pass --set run.family=NAME")
    inits = args.init or [cfg.finetune.init.method]
    arms = [Arm(label if len(inits) == 1 else f"{label}+{init}", path, init) for label, path in sels for init in inits]
    res = compare(args.out, arms, cfg.finetune, cfg.evaluation, seed=cfg.run.seed, family=family,
                  data_root=cfg.data.root, n_stitches=args.n_stitches, before=not args.no_before)
    print(markdown(res), end="")
    print(f"[compare] -> {args.out}")
    return 0


def register(sub) -> None:
    from klas.commands.stages import common_flags
    from klas.config import add_flags
    from klas.stitch import INIT_METHODS

    cp = sub.add_parser("compare", help="finetune and evaluate several selections (and inits) at equal cost")
    cp.add_argument("--out", type=Path, required=True, help="output directory (one run dir per arm + tables)")
    cp.add_argument("--selection", nargs="+", required=True, metavar="[LABEL=]FILE|METHOD",
                    help="selection.json files, or method names (klas, snnet-paired, snnet-unpaired, min-kl) "
                    "read from / made in RUN_DIR/selection/")
    cp.add_argument("--run-dir", type=Path, default=None, help="run with scores, for method names")
    cp.add_argument("--init", nargs="+", default=None, choices=INIT_METHODS,
                    help="stitch-layer initialisations to compare (default: the config's finetune.init.method)")
    cp.add_argument("--n-stitches", type=int, default=None, help="stitches per arm (default: the smallest count)")
    cp.add_argument("--no-before", action="store_true", help="skip the before-finetuning evaluation")
    common_flags(cp)
    add_flags(cp, "finetune", exclude=("init.method",))
    add_flags(cp, "evaluation", prefix="eval-")
    cp.set_defaults(func=_compare)
