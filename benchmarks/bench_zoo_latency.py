"""Latency of an exported zoo under onnxruntime against FLOPs and accuracy: JSON + PNG under benchmarks/results/.

Questions it answers, on the machine it runs on: does latency rise with FLOPs across the zoo, and does a stitched
model cost what its FLOPs predict from the anchors (a stitch adds no hidden overhead)? The prediction for a model
of F FLOPs interpolates the anchors' measured latency linearly in FLOPs between the two anchors around F; the
report gives measured / predicted per stitched model (and latency per FLOP against the anchors' at equal cost).

Models are measured round-robin (``--rounds`` rounds of ``--runs`` timed calls each, after ``--warmup``), and each
percentile is the median over rounds, so a burst of load from other processes does not land on one model only.

    python benchmarks/bench_zoo_latency.py --zoo ZOO_DIR             # an existing zoo (e.g. from `klas export`)
    python benchmarks/bench_zoo_latency.py --build fmnist-deit      # anchors + least-squares stitches, built here
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from klas_runtime.machine import machine_info  # noqa: E402
from klas_runtime.session import device_label, provider_name  # noqa: E402
from klas_runtime.timing import measure_latency  # noqa: E402
from klas_runtime.runtime import Zoo  # noqa: E402

# (source anchor index, i, target anchor index, j): stitches across the cost range, j = i as SN-Net pairs depths.
DEFAULT_STITCHES = ((0, 3, 1, 3), (0, 7, 1, 7), (1, 3, 2, 3), (1, 7, 2, 7), (0, 5, 2, 5))


def build_zoo(family: str, out: Path, stitches, fit_samples: int, accuracy_images: int | None) -> Path:
    """Export the family's pretrained anchors and least-squares-initialised stitches (no finetuning) to ``out``."""
    import torch

    import klas
    from klas.data import load_dataset
    from klas.export import export_models
    from klas.stages.s6_export import ExportConfig
    from klas.stitch import FitCfg, StitchConfig, StitchedNet, fit_stitch

    torch.set_num_threads(1)
    fam = klas.create_family(family, pretrained=True)
    train = load_dataset(fam.cfg.dataset, "train")
    test = load_dataset(fam.cfg.dataset, "test")
    models = [(StitchConfig.anchor(v.name), StitchedNet(v, -1, v, -1, None), None) for v in fam]
    for s, i, t, j in stitches:
        src, tgt = fam[s], fam[t]
        layer, _ = fit_stitch(src, i, tgt, j, train, FitCfg(method="ls", samples=fit_samples))
        models.append((StitchConfig(src.name, i, tgt.name, j), StitchedNet(src, i, tgt, j, layer), None))
    export_models(models, out, family, test, ExportConfig(accuracy_images=accuracy_images, profile=False))
    return out


def measure(zoo: Zoo, provider: str, threads: int, batch: int, warmup: int, runs: int, rounds: int) -> dict:
    """Per model: median over rounds of p50/p90/p99/mean (ms), models interleaved within each round."""
    sessions = {m["name"]: zoo.session(m, provider, threads) for m in zoo.models}
    for s in sessions.values():
        measure_latency(s, batch, warmup, 1)
    per_round: dict[str, list[dict]] = {name: [] for name in sessions}
    for r in range(rounds):
        for name, s in sessions.items():
            per_round[name].append(measure_latency(s, batch, warmup=warmup // 4, runs=runs, seed=r))
    keys = ("p50_ms", "p90_ms", "p99_ms", "mean_ms")
    return {n: {k: float(np.median([x[k] for x in rs])) for k in keys} | {"p50_rounds": [x["p50_ms"] for x in rs]}
            for n, rs in per_round.items()}


def analyse(rows: list[dict]) -> dict:
    """Monotonicity in FLOPs and each stitch's measured / anchor-interpolated latency (at p50)."""
    anchors = sorted((r for r in rows if r["anchor"]), key=lambda r: r["flops"])
    af = np.array([a["flops"] for a in anchors], dtype=np.float64)
    al = np.array([a["p50_ms"] for a in anchors], dtype=np.float64)
    by_flops = sorted(rows, key=lambda r: r["flops"])
    inversions = [(a["name"], b["name"]) for a, b in zip(by_flops, by_flops[1:]) if b["p50_ms"] < a["p50_ms"]]
    anchor_inversions = [(a["name"], b["name"]) for a, b in zip(anchors, anchors[1:]) if b["p50_ms"] <= a["p50_ms"]]
    stitched = []
    for r in rows:
        if r["anchor"]:
            continue
        predicted = float(np.interp(r["flops"], af, al))
        ratio = r["p50_ms"] / predicted
        stitched.append(dict(name=r["name"], flops=r["flops"], p50_ms=r["p50_ms"], predicted_p50_ms=predicted,
                             ratio=ratio, within_15pct=abs(ratio - 1) <= 0.15,
                             ms_per_mflop=r["p50_ms"] / (r["flops"] / 1e6),
                             anchor_ms_per_mflop_at_same_flops=predicted / (r["flops"] / 1e6)))
    return dict(anchors_rise_with_flops=not anchor_inversions, anchor_inversions=anchor_inversions,
                zoo_inversions_by_flops=inversions,
                spearman_flops_latency=_spearman([r["flops"] for r in rows], [r["p50_ms"] for r in rows]),
                stitched=stitched, all_stitched_within_15pct=all(s["within_15pct"] for s in stitched))


def _spearman(x, y) -> float:
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1]) if len(x) > 1 else 1.0


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    mf = np.array([r["flops"] for r in rows]) / 1e6
    p50 = np.array([r["p50_ms"] for r in rows])
    p90 = np.array([r["p90_ms"] for r in rows])
    acc = np.array([r["test_acc"] for r in rows])
    anchor = np.array([r["anchor"] for r in rows])
    anchors_sorted = np.argsort(np.where(anchor, mf, np.inf))[:anchor.sum()]
    ax1.plot(mf[anchors_sorted], p50[anchors_sorted], "k--", lw=1, label="anchors (interpolation)")
    for mask, marker, label in ((anchor, "s", "anchor"), (~anchor, "o", "stitched")):
        sc = ax1.scatter(mf[mask], p50[mask], c=acc[mask], marker=marker, cmap="viridis", vmin=acc.min(),
                         vmax=acc.max(), s=60, edgecolors="k", label=label, zorder=3)
        ax1.errorbar(mf[mask], p50[mask], yerr=[np.zeros(mask.sum()), (p90 - p50)[mask]], fmt="none", ecolor="gray",
                     capsize=3, zorder=2)
        ax2.scatter(p50[mask], acc[mask], marker=marker, s=60, edgecolors="k", label=label, zorder=3)
    fig.colorbar(sc, ax=ax1, label="test accuracy (%)")
    ax1.set(xlabel="MFLOPs per image", ylabel="latency p50 (ms), bar to p90", title="latency vs FLOPs")
    ax2.set(xlabel="latency p50 (ms)", ylabel="test accuracy (%)", title="accuracy vs latency")
    ax1.legend(loc="upper left", fontsize=8)
    ax2.legend(loc="lower right", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--zoo", type=Path, help="an exported zoo directory")
    src.add_argument("--build", metavar="FAMILY", help="build a zoo of this family's pretrained anchors + stitches")
    p.add_argument("--zoo-out", type=Path, default=Path("/tmp/klas-bench-zoo"), help="where --build exports")
    p.add_argument("--fit-samples", type=int, default=1024, help="train images for the least-squares stitch fit")
    p.add_argument("--accuracy-images", type=int, default=None, help="test images for accuracy (default all)")
    p.add_argument("--provider", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--runs", type=int, default=300)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)

    zoo_dir = args.zoo or build_zoo(args.build, args.zoo_out, DEFAULT_STITCHES, args.fit_samples,
                                    args.accuracy_images)
    zoo = Zoo(zoo_dir)
    provider = provider_name(args.provider)
    t0 = time.time()
    lat = measure(zoo, provider, args.threads, args.batch, args.warmup, args.runs, args.rounds)
    rows = [dict(name=m["name"], file=m["file"], anchor=m["config"]["anchor"], flops=m["flops"], params=m["params"],
                 test_acc=m["test_acc"], test_acc_source=m["test_acc_source"], **lat[m["name"]])
            for m in sorted(zoo.models, key=lambda m: m["flops"])]
    result = dict(benchmark="bench_zoo_latency", family=zoo.manifest["family"], zoo=str(zoo_dir),
                  device=device_label(provider), provider=provider, threads=args.threads, batch=args.batch,
                  warmup=args.warmup, runs=args.runs, rounds=args.rounds, wall_s=round(time.time() - t0, 1),
                  measured_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"), machine=machine_info(),
                  command="python " + " ".join([Path(sys.argv[0]).as_posix()] + (argv or sys.argv[1:])),
                  models=rows, analysis=analyse(rows))
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"zoo_latency_{zoo.manifest['family']}_{args.provider}_t{args.threads}_b{args.batch}"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, args.out / f"{stem}.png", f"{zoo.manifest['family']} zoo, onnxruntime {provider}, {args.threads} "
         f"thread(s), batch {args.batch} -- {result['device']}")
    print(f"{'model':44s} {'MFLOPs':>8s} {'acc%':>6s} {'p50':>7s} {'p90':>7s} {'p99':>7s}  (ms)")
    for r in rows:
        print(f"{r['name']:44s} {r['flops'] / 1e6:8.2f} {r['test_acc']:6.2f} {r['p50_ms']:7.3f} {r['p90_ms']:7.3f} "
              f"{r['p99_ms']:7.3f}")
    a = result["analysis"]
    print(f"anchors rise with FLOPs: {a['anchors_rise_with_flops']}; Spearman(FLOPs, p50) "
          f"{a['spearman_flops_latency']:.3f}; inversions {a['zoo_inversions_by_flops']}")
    for s in a["stitched"]:
        print(f"  {s['name']:44s} measured/anchor-interpolated p50 = {s['ratio']:.3f}"
              f"{'' if s['within_15pct'] else '  (outside 15%)'}")
    print(f"wrote {args.out / stem}.json and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
