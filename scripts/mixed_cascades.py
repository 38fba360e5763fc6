"""Stitched CNN -> transformer models against confidence cascades of the same two anchors (KLAS App. E, Tab. 11).

For a finished run of a mixed family (default: ``runs/mixed``, made by ``klas run klas/configs/fmnist-mixed.toml
--run-dir runs/mixed``): every evaluated stitch from a CNN anchor into a transformer anchor, and beside it the
max-softmax cascade of those two untouched anchors whose threshold is chosen **on val** to match the stitch's FLOPs
(the cascade with the highest val accuracy whose average val FLOPs do not exceed the stitch's; none: the cheapest).
Both are reported on **test**: accuracy, average and worst-case FLOPs, and the per-image latency of the evaluation
stage (PyTorch, this machine; a cascade's average = first member + test deferral x second, worst case = both).

Writes ``benchmarks/results/mixed_cascades_<family>.{json,md,png}`` and prints the table.

    python scripts/mixed_cascades.py [--run-dir runs/mixed] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def compare(ev: dict) -> list[dict]:
    """One row per evaluated stitch across layouts (``klas.families.blockview.cross_layout``), with its cascade."""
    sys.path.insert(0, str(REPO))
    import klas
    from klas.families.blockview import cross_layout

    views = {v.name: v for v in klas.create_family(ev["family"])}  # random weights: only the block shapes matter
    untouched = {u["key"].removeprefix("untouched:"): u for u in ev["untouched"]}
    arch = {n: type(v).__name__ for n, v in views.items()}
    rows = []
    for r in ev["configs"]:
        c = r["config"]
        if r.get("anchor") or c["source"] == c["target"]:
            continue
        src, tgt = untouched.get(c["source"]), untouched.get(c["target"])
        if src is None or tgt is None or not cross_layout(views[c["source"]], c["i"], views[c["target"]], c["j"]):
            continue
        cands = [k for k in ev["cascades"] if k["members"] == [c["source"], c["target"]]]
        fit = [k for k in cands if k["flops_avg"]["val"] <= r["flops"]]
        pick = max(fit, key=lambda k: (k["val_acc"], -k["flops_avg"]["val"])) if fit else \
            min(cands, key=lambda k: k["flops_avg"]["val"]) if cands else None
        lat_s, lat_t = src.get("latency_ms"), tgt.get("latency_ms")
        row = dict(stitch=r["key"], source=c["source"], target=c["target"], stitch_flops=r["flops"],
                   stitch_val_acc=r["val_acc"], stitch_test_acc=r["test_acc"], stitch_latency_ms=r.get("latency_ms"),
                   admitted=bool(r.get("admitted")), source_arch=arch.get(c["source"]),
                   target_arch=arch.get(c["target"]))
        if pick is not None:
            row.update(cascade=pick["name"], threshold=pick["threshold"], cascade_val_acc=pick["val_acc"],
                       cascade_test_acc=pick["test_acc"], cascade_flops_avg_val=pick["flops_avg"]["val"],
                       cascade_flops_avg_test=pick["flops_avg"]["test"], cascade_flops_worst=pick["flops"],
                       cascade_deferral_test=pick["deferral"]["test"])
            if lat_s is not None and lat_t is not None:
                row.update(cascade_latency_avg_ms=lat_s + pick["deferral"]["test"] * lat_t,
                           cascade_latency_worst_ms=lat_s + lat_t)
            row["winner_on_test"] = "stitch" if r["test_acc"] > pick["test_acc"] else (
                "cascade" if pick["test_acc"] > r["test_acc"] else "tie")
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
