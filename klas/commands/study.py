"""``klas report RUN_DIR`` (one self-contained HTML page) and ``klas study SUBSTUDY --run-dir RUN`` (the
reproduction study: metric-outcome, sensitivity, auc, gain, cascades, or all of them in that order)."""
from __future__ import annotations

from pathlib import Path

from klas.errors import KlasError


def _numbers(text: str, flag: str, cast=float) -> tuple:
    """A comma-separated list of ints or floats from a flag, or a one-line error naming the flag."""
    kind, example = ("integers", "0,1,2") if cast is int else ("numbers", "0.01,0.05")
    try:
        vals = tuple(cast(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise KlasError(f"{flag} {text!r}: expected comma-separated {kind}, e.g. {example}") from None
    if not vals:
        raise KlasError(f"{flag} {text!r}: expected at least one {kind[:-1]}")
    return vals


def _ints(text: str, flag: str) -> tuple[int, ...]:
    return _numbers(text, flag, int)


def _floats(text: str, flag: str) -> tuple[float, ...]:
    return _numbers(text, flag, float)


def _report(args) -> int:
    from klas.research.report import write_report

    path = write_report(args.run_dir, args.out, extra=args.results)
    print(f"[report] {path}")
    return 0


def _study(args) -> int:
    import torch

    from klas.research.study import SUBSTUDIES
    from klas.research.study import auc as st_auc
    from klas.research.study import cascades as st_cascades
    from klas.research.study import outcome as st_outcome
    from klas.research.study import sensitivity as st_sensitivity

    torch.set_num_threads(args.threads)
    if not (args.run_dir / "run.json").is_file():
        raise KlasError(f"--run-dir {args.run_dir}: not a klas run directory (no run.json); run `klas run` first")
    todo = SUBSTUDIES if args.substudy == "all" else (args.substudy,)
    pair = None
    if args.pair:
        pair = tuple(args.pair.split(":"))
        if len(pair) != 2 or not all(pair):
            raise KlasError(f"--pair {args.pair!r}: expected SOURCE:TARGET anchor names")
    auc_cfg = st_auc.AucCfg(steps=args.steps, n_stitches=args.n_stitches, test_samples=args.test_samples or None,
                        seeds=_ints(args.seeds, "--seeds"))
    for name in todo:
        print(f"[study] {name}", flush=True)
        if name == "metric-outcome":
            cfg = st_outcome.OutcomeCfg(n_configs=args.n_configs, steps=args.stitch_steps,
                                        test_samples=args.test_samples or 10000, fitted_metrics=not args.no_fitted,
                                        viable_drop=args.viable_drop, n_boot=args.n_boot, seed=args.seed)
            rec = st_outcome.metric_outcome(args.run_dir, args.out, cfg, pair=pair, data_root=args.data_root)
            print(" ".join(f"{m}: rho={s['spearman']:.2f} partial={s['partial_spearman']:.2f}"
                           for m, s in rec["stats"].items()))
        elif name == "sensitivity":
            st_sensitivity.sensitivity(args.run_dir, args.out, taus=_floats(args.taus, "--taus"))
        elif name == "cascades":
            st_cascades.cascades(args.run_dir, args.out, test_samples=args.test_samples or None,
                                 evaluation=args.evaluation, data_root=args.data_root)
        elif name == "auc":
            rec = st_auc.auc_study(args.run_dir, args.out, auc_cfg, data_root=args.data_root)
            print(" ".join(f"{m}: {s['mean']:.4f}+-{s['std']:.4f}" for m, s in rec["summary"].items()))
        elif name == "gain":
            st_auc.gain_sweep(args.run_dir, args.out, _ints(args.steps_list, "--steps-list"), args.method, auc_cfg,
                          seed=args.seed, data_root=args.data_root)
        print(f"[study] {name}: written to {args.out}", flush=True)
    return 0


def register(sub) -> None:
    p = sub.add_parser("report", help="one self-contained report.html of a run (anchors, KL, selection, curves)")
    p.add_argument("run_dir", type=Path, help="a klas run directory")
    p.add_argument("--out", type=Path, default=None, help="output file (default: RUN_DIR/report.html)")
    p.add_argument("--results", type=Path, default=None,
                   help="also include the study_*.json/png of this folder (e.g. benchmarks/results)")
    p.set_defaults(func=_report)

    from klas.research.study import SUBSTUDIES

    s = sub.add_parser("study", help="the reproduction study: metric vs outcome, sensitivity, AUC over seeds, "
                                     "stitching gain, cascades")
    s.add_argument("substudy", choices=SUBSTUDIES + ("all",))
    s.add_argument("--run-dir", type=Path, required=True, help="a run with probes + scores + selection")
    s.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="where study_*.json/png go")
    s.add_argument("--data-root", type=Path, default=None)
    s.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--test-samples", type=int, default=2000, help="first N test images (0: all)")
    g = s.add_argument_group("metric-outcome")
    g.add_argument("--pair", default=None, help="SOURCE:TARGET anchor pair (default: the first selected pair)")
    g.add_argument("--n-configs", type=int, default=24, help="stitch configurations sampled over the (i, j) grid")
    g.add_argument("--stitch-steps", type=int, default=60, help="Adam steps on each stitch layer after LS init")
    g.add_argument("--viable-drop", type=float, default=3.0, help="viable: drop <= this many points")
    g.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples")
    g.add_argument("--no-fitted", action="store_true", help="skip the fitted TLM / FuLA metrics")
    g = s.add_argument_group("sensitivity")
    g.add_argument("--taus", default="0.01,0.02,0.03,0.05,0.075,0.1")
    g = s.add_argument_group("auc / gain")
    g.add_argument("--steps", type=int, default=300, help="supernetwork steps per arm")
    g.add_argument("--n-stitches", type=int, default=8)
    g.add_argument("--seeds", default="0,1,2")
    g.add_argument("--steps-list", default="100,300,900", help="gain: budgets swept")
    g.add_argument("--method", default="klas", help="gain: the selection method swept")
    g = s.add_argument_group("cascades")
    g.add_argument("--evaluation", type=Path, default=None, help="evaluation.json whose Pareto front is overlaid")
    s.set_defaults(func=_study)
