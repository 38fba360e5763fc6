"""``klas finetune``, ``klas evaluate``, ``klas compare``: the supernetwork, its evaluation, methods at equal cost."""
from __future__ import annotations

from pathlib import Path


def _threads(args) -> None:
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)


def _budget(args):
    from klas.stitch import FitCfg
    from klas.stages.s4_finetune import FinetuneCfg

    init = FitCfg(method=args.init[0] if isinstance(args.init, list) else args.init, samples=args.init_samples,
                  steps=args.init_steps, lr=args.init_lr, seed=args.seed)
    return FinetuneCfg(epochs=args.epochs, steps_per_epoch=args.steps_per_epoch, batch_size=args.batch_size,
                       lr=args.lr, weight_decay=args.weight_decay, clip_grad=args.clip_grad,
                       augment=not args.no_augment, train_samples=args.train_samples, sampling=args.sampling,
                       seed=args.seed, amp=args.amp, init=init, val_samples=args.val_samples,
                       ckpt_every=args.ckpt_every, accum_steps=args.accum_steps, parallel=args.parallel)


def _finetune(args) -> int:
    from klas.stages.s4_finetune import finetune_supernet

    _threads(args)
    meta = finetune_supernet(args.run_dir, args.selection, _budget(args), family=args.family, weights=args.weights,
                             data_root=args.data_root, restart=args.restart)
    for r in meta["configs"]:
        acc = "" if r["val_acc"] is None else f"  val acc {r['val_acc_init']:.2f} -> {r['val_acc']:.2f}"
        print(f"[finetune] {r['key']:42s} {r['flops'] / 1e6:8.2f} MFLOPs  {r['samples']:5d} steps{acc}")
    print(f"[finetune] {args.run_dir / 'supernet'}: {meta['steps']} steps in {meta['wall_s']:.1f}s")
    return 0


def _evaluate(args) -> int:
    from klas.stages.s5_evaluation import evaluate_run, markdown_table

    _threads(args)
    res = evaluate_run(args.run_dir, args.data_root, test_samples=args.test_samples, latency=not args.no_latency,
                       latency_repeats=args.latency_repeats, threads=args.latency_threads, state=args.state)
    print(markdown_table(res["configs"]), end="")
    print(f"[evaluate] AUC {res['auc']:.4f}, {res['n_pareto']} Pareto configurations, "
          f"{res['n_test']} test images -> {args.run_dir / 'evaluation'}")
    return 0


def _compare(args) -> int:
    from klas.research.compare import Arm, compare, markdown, resolve_selection

    _threads(args)
    from klas.errors import KlasError
    from klas.io import load_json
    from klas.rundir import RunDir

    family = args.family or (RunDir(args.run_dir).family if args.run_dir else None)
    sels = [resolve_selection(s, args.run_dir, family) for s in args.selection]
    family = family or load_json(sels[0][1]).get("family")
    if not family:
        raise KlasError(f"{sels[0][1]}: no 'family' field; pass --family")
    inits = args.init
    arms = [Arm(label if len(inits) == 1 else f"{label}+{init}", path, init) for label, path in sels for init in inits]
    res = compare(args.out, arms, _budget(args), family=family, data_root=args.data_root, n_stitches=args.n_stitches,
                  test_samples=args.test_samples, latency=args.latency, before=not args.no_before)
    print(markdown(res), end="")
    print(f"[compare] -> {args.out}")
    return 0


def _add_budget(p, init_many: bool = False) -> None:
    from klas.stitch import INIT_METHODS

    g = p.add_argument_group("finetuning budget (identical for every arm of a comparison)")
    g.add_argument("--epochs", type=int, default=1)
    g.add_argument("--steps-per-epoch", type=int, default=None, help="default: one pass over the train split")
    g.add_argument("--batch-size", type=int, default=128)
    g.add_argument("--lr", type=float, default=5e-4)
    g.add_argument("--weight-decay", type=float, default=0.05)
    g.add_argument("--clip-grad", type=float, default=1.0, help="max gradient norm (0: off)")
    g.add_argument("--sampling", default="balanced", choices=("balanced", "uniform"),
                   help="configuration per step: balanced permutations (default) or i.i.d. uniform (SN-Net)")
    g.add_argument("--amp", default="auto", choices=("auto", "bf16", "off"),
                   help="bf16 autocast: auto = on CUDA only")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--train-samples", type=int, default=None, help="finetune on the first N training images")
    g.add_argument("--val-samples", type=int, default=1000, help="val images for before/after accuracy (0: off)")
    g.add_argument("--no-augment", action="store_true", help="no random shift/flip of training images")
    g.add_argument("--ckpt-every", type=int, default=0, help="also checkpoint every K steps (0: every epoch only)")
    g.add_argument("--accum-steps", type=int, default=1, help="micro-batches per optimizer step (same global batch)")
    g.add_argument("--parallel", default="ddp", choices=("ddp", "fsdp"),
                   help="under torchrun: DistributedDataParallel, or FSDP for anchors too large for one device "
                        "(experimental)")
    g.add_argument("--init", default=["ls"] if init_many else "ls", choices=INIT_METHODS,
                   nargs="+" if init_many else None,
                   help="stitch-layer initialisation: least squares (SN-Net), task loss, FuLA, random")
    g.add_argument("--init-samples", type=int, default=1024, help="training images for the least-squares fit")
    g.add_argument("--init-steps", type=int, default=100, help="Adam steps of the task / fula objectives")
    g.add_argument("--init-lr", type=float, default=1e-3)


def _common(p) -> None:
    p.add_argument("--family", default=None, help="family name (default: the selection's)")
    p.add_argument("--data-root", type=Path, default=None, help="dataset directory (default: the family's)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def register(sub) -> None:
    ft = sub.add_parser("finetune", help="initialise stitch layers and finetune the stitched supernetwork (resumable)")
    ft.add_argument("--run-dir", type=Path, required=True)
    ft.add_argument("--selection", type=Path, default=None,
                    help="selection.json (default: RUN_DIR/selection/selection.json)")
    ft.add_argument("--weights", type=Path, default=None, help="directory of <anchor>.safetensors anchor weights")
    ft.add_argument("--restart", action="store_true", help="discard a checkpoint made with other settings")
    _common(ft)
    _add_budget(ft)
    ft.set_defaults(func=_finetune)

    ev = sub.add_parser("evaluate", help="test accuracy, FLOPs, params, latency, Pareto front and AUC of every "
                        "finetuned configuration")
    ev.add_argument("--run-dir", type=Path, required=True)
    ev.add_argument("--data-root", type=Path, default=None)
    ev.add_argument("--test-samples", type=int, default=None, help="first N test images (default: all)")
    ev.add_argument("--no-latency", action="store_true", help="skip the CPU latency measurement")
    ev.add_argument("--latency-repeats", type=int, default=30)
    ev.add_argument("--latency-threads", type=int, default=1)
    ev.add_argument("--state", default="final", choices=("final", "init"),
                    help="init: the stitch layers as initialised, before finetuning")
    ev.add_argument("--threads", type=int, default=None)
    ev.set_defaults(func=_evaluate)

    cp = sub.add_parser("compare", help="finetune and evaluate several selections (and inits) at equal cost")
    cp.add_argument("--out", type=Path, required=True, help="output directory (one run dir per arm + tables)")
    cp.add_argument("--selection", nargs="+", required=True, metavar="[LABEL=]FILE|METHOD",
                    help="selection.json files, or method names (klas, snnet-paired, snnet-unpaired, min-kl) "
                    "read from / made in RUN_DIR/selection/")
    cp.add_argument("--run-dir", type=Path, default=None, help="run with scores, for method names")
    cp.add_argument("--n-stitches", type=int, default=None, help="stitches per arm (default: the smallest count)")
    cp.add_argument("--test-samples", type=int, default=None)
    cp.add_argument("--latency", action="store_true", help="also measure latency")
    cp.add_argument("--no-before", action="store_true", help="skip the before-finetuning evaluation")
    _common(cp)
    _add_budget(cp, init_many=True)
    cp.set_defaults(func=_compare)
