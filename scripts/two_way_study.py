"""One-way against two-way stitching (SN-Netv2) at equal finetuning cost, per FLOPs bucket, on a run's selection.

The run's selection must have been made with ``selection.directions = two-way`` (scores with ``scores.reverse =
true``), e.g.

    klas run --run-dir runs/two-way --until selection --set scores.reverse=true \
        --set selection.directions=two-way --set selection.num_buckets=4

For every chosen anchor pair and FLOPs bucket, the ``--top`` best-scored one-way (small -> large) candidates and
the ``--top`` best-scored two-way ones (large -> small, large -> small -> large) are built (least-squares stitch
layers on ``--fit`` train images, every transition fitted independently) and finetuned at EQUAL cost: ``--steps``
Adam steps of ``--batch`` train images each, cross-entropy, stitch layers only (anchors frozen: a round trip trains
its two layers in the same steps). In each bucket and kind the most accurate on val is kept; its test accuracy is
reported. Writes ``<out>/two_way_<family>.{json,md,png}`` and prints the table.

    python scripts/two_way_study.py [--run-dir runs/two-way] [--steps 60] [--top 2] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _forever(data, batch, gen):
    from klas.data import batches

    while True:
        yield from batches(data, batch, shuffle=True, gen=gen, drop_last=True)


@torch.no_grad()
def _accuracy(net, data) -> float:
    from klas.data import batches

    net.eval()
    hit = sum(int((net(x).argmax(-1) == y).sum()) for x, y in batches(data, 500))
    return 100.0 * hit / len(data)


def finetune(views, path, train, args, seed: int):
    """LS-initialised PathNet, then ``args.steps`` Adam steps on its stitch layers (anchors frozen, eval mode)."""
    from klas.data import batches
    from klas.stitch import adam_fit
    from klas.stitch_path import fit_path

    g = torch.Generator().manual_seed(seed)
    fit_images = [x for x, _ in batches(train.subset(args.fit), 256)]
    net = fit_path(views, path, fit_images)
    net.eval()
    for p in net.views.parameters():
        p.requires_grad_(False)
    net.layers.train()
    losses = adam_fit(net.layers, lambda b: F.cross_entropy(net(b[0]), b[1]),
                      (b for _, b in zip(range(args.steps), _forever(train, args.batch, g))), args.lr)
    for p in net.views.parameters():
        p.requires_grad_(True)
    return net.eval(), losses


def study(args) -> dict:
    import klas
    from klas.families import get_family_cfg
    from klas.stitch_path import StitchPath
    from klas.tasks import task_of

    sel = json.loads((args.run_dir / "selection" / "selection.json").read_text())
    if sel["params"].get("directions") != "two-way":
        raise SystemExit(f"{args.run_dir}/selection/selection.json: made with selection.directions = forward; "
                         f"rerun the selection with --set selection.directions=two-way")
    torch.manual_seed(0)
    fam = klas.create_family(sel["family"], pretrained=True)
    views = {v.name: v for v in fam}
    cfg = get_family_cfg(sel["family"])
    task = task_of(cfg)  # the family's own splits and preprocessing, as the pipeline's stages read them
    train, val, test = (task.open_split(cfg, s) for s in ("train", "val", "test"))
    train, val, test = train.subset(args.train), val.subset(args.val), test.subset(args.test)
    anchors = {n: dict(flops=views[n].flops, val_acc=_accuracy(views[n], val), test_acc=_accuracy(views[n], test))
               for n in views}
    groups: dict = {}
    for r in sel["candidates"]:
        if r["bucket"] is None or r["score"] is None:
            continue
        pair = "->".join(sorted((r["source"], r["target"]), key=lambda n: views[n].flops))
        if args.pair and pair != args.pair.replace(":", "->"):
            continue
        kind = "one-way" if r["direction"] == "forward" else "two-way"
        groups.setdefault((pair, r["bucket"], kind), []).append(r)
    jobs = [(k, r) for k, rows in sorted(groups.items()) for r in sorted(rows, key=lambda r: r["score"])[:args.top]]
    from tqdm import tqdm

    rows, nets, t0 = [], [], time.time()
    for n, ((pair, bucket, kind), r) in enumerate(tqdm(jobs, desc="two-way study", mininterval=5)):
        path = StitchPath(tuple(map(tuple, r["path"]))) if r.get("path") else \
            StitchPath(((r["source"], 0, r["i"] + 1), (r["target"], r["j"] + 1, None)))
        net, losses = finetune(views, path, train, args, seed=n)
        nets.append(net)
        rows.append(dict(pair=pair, bucket=bucket, kind=kind, direction=r["direction"], key=path.key,
                         flops=r["flops"], score=r["score"], val_acc=_accuracy(net, val), test_acc=None,
                         loss_first=losses[0], loss_last=losses[-1]))
    best = {}
    for row in rows:
        k = (row["pair"], row["bucket"], row["kind"])
        if k not in best or row["val_acc"] > best[k]["val_acc"]:
            best[k] = row
    for row, net in zip(rows, nets):
        row["chosen_on_val"] = best[(row["pair"], row["bucket"], row["kind"])] is row
        if row["chosen_on_val"]:  # choose on val, report on test: only the chosen ones see the test split
            row["test_acc"] = _accuracy(net, test)
    by_dir = {}
    for r in sel["selected"]:
        by_dir[r["direction"]] = by_dir.get(r["direction"], 0) + 1
    return dict(family=sel["family"], dataset=str(cfg.dataset), run_dir=str(args.run_dir), n_train=len(train),
                n_val=len(val), n_test=len(test), steps=args.steps, batch=args.batch, lr=args.lr, fit=args.fit,
                top=args.top, buckets=sel["buckets"], anchors=anchors, rows=rows,
                stage_selected_by_direction=by_dir, wall_s=round(time.time() - t0, 1),
                cpu=_cpu(), command="python scripts/two_way_study.py " + " ".join(args.argv))


def _cpu() -> str:
    import platform

    try:
        name = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor()
    return f"{name} ({platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads)"


def markdown(rec: dict) -> str:
    chosen = {(r["pair"], r["bucket"], r["kind"]): r for r in rec["rows"] if r["chosen_on_val"]}
    keys = sorted({(p, b) for p, b, _ in chosen})
    lines = ["| anchor pair | bucket (MFLOPs) | one-way (val-chosen) | MFLOPs | val | test | two-way (val-chosen) | "
             "MFLOPs | val | test | better on test |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    wins = {"one-way": 0, "two-way": 0, "tie": 0}
    for p, b in keys:
        o, t = chosen.get((p, b, "one-way")), chosen.get((p, b, "two-way"))
        edges = rec["buckets"].get(p) or []
        span = f"{edges[b] / 1e6:.1f}-{edges[b + 1] / 1e6:.1f}" if len(edges) > b + 1 else str(b)
        cell = lambda r: (f"{r['key']} | {r['flops'] / 1e6:.2f} | {r['val_acc']:.2f} | {r['test_acc']:.2f}"  # noqa
                          if r else "- | - | - | -")
        w = "-" if not (o and t) else ("one-way" if o["test_acc"] > t["test_acc"] else
                                       "two-way" if t["test_acc"] > o["test_acc"] else "tie")
        if w in wins:
            wins[w] += 1
        lines.append(f"| {p} | {b}: {span} | {cell(o)} | {cell(t)} | {w} |")
    anchors = "; ".join(f"{n} {a['flops'] / 1e6:.2f} MFLOPs, test {a['test_acc']:.2f} %"
                        for n, a in rec["anchors"].items())
    return (f"{rec['family']} ({rec['dataset']}): per anchor pair and FLOPs bucket the {rec['top']} best-scored "
            f"one-way and two-way candidates, each least-squares initialised on {rec['fit']} train images and "
            f"finetuned for {rec['steps']} Adam steps x {rec['batch']} images (stitch layers only, lr {rec['lr']:g}); "
            f"the val-best ({rec['n_val']} images) of each kind reported on test ({rec['n_test']} images). "
            f"Anchors: {anchors}. Better on test: one-way {wins['one-way']}, two-way {wins['two-way']}, "
            f"tied {wins['tie']}. The selection stage's own joint Eq. 3 pick (all directions together) kept: "
            f"{rec['stage_selected_by_direction']}.\n\n" + "\n".join(lines) + "\n")


def plot(rec: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for n, a in rec["anchors"].items():
        ax.scatter(a["flops"] / 1e6, a["test_acc"], marker="*", s=140, color="k")
        ax.annotate(n, (a["flops"] / 1e6, a["test_acc"]), fontsize=7)
    style = {"one-way": ("tab:blue", "o"), "two-way": ("tab:red", "s")}
    for kind, (col, mk) in style.items():
        ch = [r for r in rec["rows"] if r["kind"] == kind and r["chosen_on_val"]]
        ax.scatter([r["flops"] / 1e6 for r in ch], [r["test_acc"] for r in ch], color=col, marker=mk,
                   label=f"{kind} (val-chosen per bucket)")
    ax.set_xlabel("MFLOPs per image")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{rec['family']}: one-way vs two-way stitching, {rec['steps']} finetuning steps each", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", type=Path, default=REPO / "runs" / "two-way")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--steps", type=int, default=60, help="Adam steps per stitch (the equal finetuning cost)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--fit", type=int, default=512, help="train images of the least-squares fit")
    p.add_argument("--train", type=int, default=20000, help="train images finetuning draws from")
    p.add_argument("--val", type=int, default=2000, help="first N val images (the choice)")
    p.add_argument("--test", type=int, default=5000, help="first N test images (the report)")
    p.add_argument("--pair", default=None, help="only this anchor pair SMALL:LARGE (default: every chosen pair)")
    p.add_argument("--top", type=int, default=2, help="candidates per bucket and kind, best scores first")
    args = p.parse_args(argv)
    args.argv = argv
    for flag in ("steps", "batch", "fit", "train", "val", "test", "top"):
        if getattr(args, flag) < 1:
            print(f"--{flag}: expected a positive integer, got {getattr(args, flag)}", file=sys.stderr)
            return 2
    if not (args.run_dir / "selection" / "selection.json").is_file():
        print(f"{args.run_dir}/selection/selection.json: missing; make it with `klas run --run-dir {args.run_dir} "
              f"--until selection --set scores.reverse=true --set selection.directions=two-way`", file=sys.stderr)
        return 2
    rec = study(args)
    args.out.mkdir(parents=True, exist_ok=True)
    from klas.io import save_json

    stem = args.out / f"two_way_{rec['family']}"
    save_json(rec, stem.with_suffix(".json"))
    md = markdown(rec)
    tmp = stem.with_suffix(".md.tmp")
    tmp.write_text(md)
    tmp.replace(stem.with_suffix(".md"))
    plot(rec, stem.with_suffix(".png"))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
