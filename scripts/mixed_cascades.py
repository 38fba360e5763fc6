"""Stitched CNN -> transformer models against confidence cascades of the same two anchors (KLAS App. E, Tab. 11).

For a finished run of a mixed family (default: ``runs/mixed``, made by ``klas run klas/configs/fmnist-mixed.toml
--run-dir runs/mixed``): every evaluated stitch from a CNN anchor into a transformer anchor, and beside it the
max-softmax cascade of those two untouched anchors (the CNN answers unless its top softmax probability is below a
threshold) whose threshold is chosen **on val** among the 5 %, 10 %, ..., 95 % quantiles of the CNN's val confidence
(plus never / always deferring): the highest val accuracy whose average val FLOPs do not exceed the stitch's (none:
the cheapest). Both are reported on **test**: accuracy, average and worst-case FLOPs, and per-image CPU latency
measured as the evaluation stage does (PyTorch, batch 1, 1 thread, this machine; a cascade's average = first member +
test deferral x second, worst case = both).

Writes ``benchmarks/results/mixed_cascades_<family>.{json,md,png}`` and prints the table.

    python scripts/mixed_cascades.py [--run-dir runs/mixed] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


@torch.no_grad()
def _anchor_outputs(views: dict, names: list[str]) -> tuple[dict, dict, dict]:
    """Per anchor: softmax probabilities on the family's val and test splits (the evaluation's), and the CPU
    latency of one image measured as the evaluation stage measures it."""
    from klas.data import batches
    from klas.stages.s5_evaluation import measure_latency
    from klas.tasks import task_of

    fam = next(iter(views.values()))
    task = task_of(FAMILY_CFG[0])
    splits = {s: task.open_split(FAMILY_CFG[0], s) for s in ("val", "test")}
    probs, labels, lat = {}, {}, {}
    for n in names:
        v = views[n].eval()
        for s, data in splits.items():
            out = [torch.softmax(v(x).double(), -1) for x, _ in batches(data, 500)]
            probs[(n, s)] = torch.cat(out)
            labels[s] = torch.as_tensor(data.labels).long()
        lat[n] = measure_latency(v, v.example_input(1), repeats=30, threads=1)["median_ms"]
    del fam
    return probs, labels, lat


FAMILY_CFG: list = []


def _cascade(p_small, p_large, y, t):
    sent = p_small.max(-1).values < t
    pred = torch.where(sent, p_large.argmax(-1), p_small.argmax(-1))
    return 100.0 * float((pred == y).double().mean()), float(sent.double().mean())


def compare(ev: dict) -> list[dict]:
    """One row per evaluated stitch across layouts (``klas.families.blockview.cross_layout``), beside the
    max-softmax cascade of its two untouched anchors whose threshold is chosen on val to fit its FLOPs."""
    sys.path.insert(0, str(REPO))
    import klas
    from klas.families import get_family_cfg
    from klas.families.blockview import cross_layout

    FAMILY_CFG[:] = [get_family_cfg(ev["family"])]
    views = {v.name: v for v in klas.create_family(ev["family"], pretrained=True)}
    untouched = {u["key"].removeprefix("untouched:"): u for u in ev["untouched"]}
    arch = {n: type(v).__name__ for n, v in views.items()}
    stitches = [r for r in ev["configs"] if not r.get("anchor") and r["config"]["source"] != r["config"]["target"]
                and cross_layout(views[r["config"]["source"]], r["config"]["i"], views[r["config"]["target"]],
                                 r["config"]["j"])]
    names = sorted({n for r in stitches for n in (r["config"]["source"], r["config"]["target"])})
    probs, labels, lat = _anchor_outputs(views, names)
    rows = []
    for r in stitches:
        c = r["config"]
        small, large = c["source"], c["target"]
        fs, fl = untouched[small]["flops"], untouched[large]["flops"]
        pv_s, pv_l = probs[(small, "val")], probs[(large, "val")]
        conf = pv_s.max(-1).values
        thresholds = sorted({0.0, 1.0 + 1e-9, *[float(q) for q in torch.quantile(conf, torch.linspace(0.05, 0.95, 19,
                                                                                       dtype=conf.dtype))]})
        cands = []
        for t in thresholds:
            acc_v, d_v = _cascade(pv_s, pv_l, labels["val"], t)
            cands.append((t, acc_v, fs + d_v * fl))
        fit = [k for k in cands if k[2] <= r["flops"]]
        t, acc_v, flops_v = max(fit, key=lambda k: (k[1], -k[2])) if fit else min(cands, key=lambda k: k[2])
        acc_t, d_t = _cascade(probs[(small, "test")], probs[(large, "test")], labels["test"], t)
        row = dict(stitch=r["key"], source=small, target=large, source_arch=arch[small], target_arch=arch[large],
                   stitch_flops=r["flops"], stitch_val_acc=r["val_acc"], stitch_test_acc=r["test_acc"],
                   stitch_latency_ms=r.get("latency_ms"), admitted=bool(r.get("admitted")),
                   cascade=f"{small}>{large}@{t:.4f}", threshold=t, cascade_val_acc=acc_v,
                   cascade_flops_avg_val=flops_v, cascade_flops_avg_test=fs + d_t * fl, cascade_flops_worst=fs + fl,
                   cascade_test_acc=acc_t, cascade_deferral_test=d_t,
                   cascade_latency_avg_ms=lat[small] + d_t * lat[large], cascade_latency_worst_ms=lat[small] + lat[large])
        row["winner_on_test"] = "stitch" if r["test_acc"] > acc_t else ("cascade" if acc_t > r["test_acc"] else "tie")
        rows.append(row)
    return sorted(rows, key=lambda x: (x["target"], x["stitch_flops"]))


def _fmt(v, f="{:.2f}"):
    return "-" if v is None else f.format(v)


def markdown(rows: list[dict], ev: dict) -> str:
    head = ("| stitch (CNN -> ViT) | MFLOPs (fixed) | test acc | ms/img | cascade of the same anchors (threshold on val) "
            "| avg MFLOPs (test) | worst MFLOPs | test acc | avg / worst ms/img | on test |\n|---|---|---|---|---|---|---|"
            "---|---|---|\n")
    lines = []
    for r in rows:
        lines.append(
            f"| {r['stitch']}{' (admitted)' if r['admitted'] else ''} | {r['stitch_flops'] / 1e6:.2f} | "
            f"{r['stitch_test_acc']:.2f} | {_fmt(r['stitch_latency_ms'], '{:.3f}')} | "
            f"{r.get('cascade', '-')} | {_fmt(r.get('cascade_flops_avg_test', 0) / 1e6 if 'cascade' in r else None)} | "
            f"{_fmt(r.get('cascade_flops_worst', 0) / 1e6 if 'cascade' in r else None)} | "
            f"{_fmt(r.get('cascade_test_acc'))} | {_fmt(r.get('cascade_latency_avg_ms'), '{:.3f}')} / "
            f"{_fmt(r.get('cascade_latency_worst_ms'), '{:.3f}')} | {r.get('winner_on_test', '-')} |")
    anchors = "; ".join(f"{u['key'].removeprefix('untouched:')} {u['flops'] / 1e6:.2f} MFLOPs {u['test_acc']:.2f} %"
                        for u in ev["untouched"])
    wins = [r.get("winner_on_test") for r in rows]
    return (f"{ev['family']} on {ev['dataset']}: {len(rows)} evaluated CNN -> transformer stitches, each against the "
            f"cascade of its two untouched anchors whose threshold was chosen on {ev['n_val']} val images to match its "
            f"FLOPs; test figures on {ev['n_test']} images. Anchors: {anchors}. On test: stitch better "
            f"{wins.count('stitch')}, cascade better {wins.count('cascade')}, tied {wins.count('tie')}.\n\n"
            + head + "\n".join(lines) + "\n")


def plot(rows: list[dict], ev: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for u in ev["untouched"]:
        ax.scatter(u["flops"] / 1e6, u["test_acc"], marker="*", s=140, color="k")
        ax.annotate(u["key"].removeprefix("untouched:"), (u["flops"] / 1e6, u["test_acc"]), fontsize=7)
    ax.scatter([r["stitch_flops"] / 1e6 for r in rows], [r["stitch_test_acc"] for r in rows], label="stitch (fixed cost)",
               color="tab:blue")
    cs = [r for r in rows if "cascade" in r]
    ax.scatter([r["cascade_flops_avg_test"] / 1e6 for r in cs], [r["cascade_test_acc"] for r in cs],
               label="cascade (average cost)", color="tab:orange", marker="^")
    ax.scatter([r["cascade_flops_worst"] / 1e6 for r in cs], [r["cascade_test_acc"] for r in cs],
               label="cascade (worst case)", color="tab:orange", marker="^", facecolors="none")
    ax.set_xscale("log")
    ax.set_xlabel("MFLOPs per image")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{ev['family']}: stitched CNN -> ViT vs cascades of the same anchors")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", type=Path, default=REPO / "runs" / "mixed")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = p.parse_args(argv)
    path = args.run_dir / "evaluation" / "evaluation.json"
    if not path.is_file():
        print(f"{path}: missing; run `klas run klas/configs/fmnist-mixed.toml --run-dir {args.run_dir}` first",
              file=sys.stderr)
        return 2
    ev = json.loads(path.read_text())
    rows = compare(ev)
    if not rows:
        print(f"{path}: no CNN -> transformer stitch was evaluated in this run", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"mixed_cascades_{ev['family']}"
    md = markdown(rows, ev)
    (stem.with_suffix(".json")).write_text(json.dumps(dict(family=ev["family"], dataset=ev["dataset"],
                                                           n_val=ev["n_val"], n_test=ev["n_test"], rows=rows,
                                                           command="python scripts/mixed_cascades.py"), indent=1))
    stem.with_suffix(".md").write_text(md)
    plot(rows, ev, stem.with_suffix(".png"))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
