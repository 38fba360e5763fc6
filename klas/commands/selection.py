"""``klas probe``, ``klas score``, ``klas select``: the KLAS selection stages, each resumable and skipped when its
outputs are up to date for its inputs."""
from __future__ import annotations

import argparse
from pathlib import Path


def _family_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", type=Path, required=True, help="run directory (created by `klas probe`)")
    p.add_argument("--family", default="fmnist-deit", help="anchor family (default: fmnist-deit)")
    p.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=None,
                   help="load pretrained anchor weights (default: on for embedded families)")
    p.add_argument("--weights", type=Path, default=None, help="directory of <anchor>.safetensors/.pth files")
    p.add_argument("--data-root", type=Path, default=None, help="dataset directory (default: the family's)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--force", action="store_true", help="recompute even when the outputs are up to date")


def _setup(args) -> None:
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)


def _probe(args) -> int:
    from klas.stages.s1_probes import train_probes

    _setup(args)
    rec = train_probes(args.family, args.run_dir, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                       weight_decay=args.weight_decay, seed=args.seed, train_subset=args.train_subset,
                       val_subset=args.val_subset, stat_samples=args.stat_samples, data_root=args.data_root,
                       pretrained=args.pretrained, weights=args.weights, force=args.force)
    for name, accs in rec["final_val_acc"].items():
        print(f"[probe] {name}: probe val acc per block {accs} (head {rec['head_val_acc'][name]})")
    print(f"[probe] wrote {args.run_dir / 'probes'} ({rec['wall_s']:.0f}s of training)")
    return 0


def _score(args) -> int:
    from klas.stages.s2_scores import compute_scores

    _setup(args)
    rec = compute_scores(args.family, args.run_dir, batch_size=args.batch_size, temperature=args.temperature,
                         impl=args.impl, val_subset=args.val_subset, score_form=args.score_form, lam=args.lam,
                         data_root=args.data_root, metrics=args.metrics, dm_samples=args.dm_samples,
                         pretrained=args.pretrained, weights=args.weights, force=args.force)
    for p in rec["pairs"]:
        b = p["best_score"]
        print(f"[score] {p['source']} -> {p['target']}: D in [{p['D_min']:.4g}, {p['D_max']:.4g}], best score "
              f"{b['score']:.4g} at i={b['i']} j={b['j']}, argmin-D within 1 of the diagonal for "
              f"{100 * p['diagonal']['frac_within_1']:.0f}% of source blocks")
    print(f"[score] wrote {args.run_dir / 'scores'} ({rec['wall_s']:.1f}s streaming pass)")
    return 0


def _select(args) -> int:
    from klas.research.metrics import FitConfig
    from klas.stages.s3_selection import select

    _setup(args)
    fit = FitConfig(steps=args.fit_steps, train_samples=args.fit_samples, val_samples=args.fit_val_samples)
    rec = select(args.family, args.run_dir, method=args.method, tau=args.tau, num_buckets=args.num_buckets,
                 score_form=args.score_form, lam=args.lam, anchor_rule=args.anchor_rule,
                 anchor_pairs=args.anchor_pair, max_pairs=args.max_pairs or None, fit=fit, max_buckets=args.max_buckets,
                 data_root=args.data_root, pretrained=args.pretrained, weights=args.weights, force=args.force)
    prm = rec["params"]
    print(f"[select] {rec['method']}: anchor pairs {rec['anchor_pairs']}, {prm['num_buckets']} buckets "
          f"({'auto' if prm['num_buckets_auto'] else 'given'}), {len(rec['selected'])} of {len(rec['candidates'])} "
          f"configurations selected")
    for r in rec["selected"]:
        print(f"  {r['source']}[:{r['i'] + 1}] -> {r['target']}[{r['j'] + 1}:]  {r['flops'] / 1e6:8.3f} MFLOPs  "
              f"score {r['score'] if r['score'] is None else format(r['score'], '.4g')}  bucket {r['bucket']}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("probe", help="train one linear probe per block of every anchor (ProbeNet, resumable)")
    _family_args(p)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-subset", type=int, default=None, help="first N training images (default: all)")
    p.add_argument("--val-subset", type=int, default=None, help="first N validation images (default: all)")
    p.add_argument("--stat-samples", type=int, default=2048, help="training images for the feature statistics")
    p.set_defaults(func=_probe)

    s = sub.add_parser("score", help="KL scores D, Cap, S on the validation split (streaming) and baseline metrics")
    _family_args(s)
    s.add_argument("--batch-size", type=int, default=500)
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--impl", default=None, help="klas.ops implementation (default: automatic)")
    s.add_argument("--val-subset", type=int, default=None, help="first N validation images (default: all)")
    s.add_argument("--score-form", default="ratio", help="ratio (default) | difference | kl")
    s.add_argument("--lam", type=float, default=1.0, help="lambda of the 'difference' form")
    s.add_argument("--metrics", action=argparse.BooleanOptionalAction, default=True,
                   help="also compute the mse/cka/ce/dm baseline tables (default: on)")
    s.add_argument("--dm-samples", type=int, default=1000, help="validation images kept for the MMD baseline")
    s.set_defaults(func=_score)

    c = sub.add_parser("select", help="choose anchor pairs and stitch configurations (KLAS or a baseline)")
    _family_args(c)
    c.add_argument("--method", default="klas", help="klas | min-kl | snnet-paired | snnet-unpaired | mse | ce | cka "
                   "| dm | tlm | fula")
    c.add_argument("--tau", type=float, default=0.05, help="keep scores <= (1 + tau) x the bucket minimum")
    c.add_argument("--num-buckets", type=int, default=None, help="FLOPs buckets per anchor pair (default: automatic)")
    c.add_argument("--max-buckets", type=int, default=500, help="upper end of the automatic bucket-count search")
    c.add_argument("--score-form", default=None, help="ratio (default) | difference | kl")
    c.add_argument("--lam", type=float, default=1.0, help="lambda of the 'difference' form")
    c.add_argument("--anchor-rule", default=None, help="klas (default) | nearest (default for snnet-*) | all")
    c.add_argument("--anchor-pair", action="append", default=None, metavar="SRC:TGT",
                   help="stitch this anchor pair (repeatable; overrides --anchor-rule)")
    c.add_argument("--max-pairs", type=int, default=48,
                   help="fitted methods (tlm, fula): fit at most N configurations (0: all)")
    c.add_argument("--fit-steps", type=int, default=20, help="fitted methods: Adam steps per configuration")
    c.add_argument("--fit-samples", type=int, default=256, help="fitted methods: training images")
    c.add_argument("--fit-val-samples", type=int, default=512, help="fitted methods: validation images")
    c.set_defaults(func=_select)
