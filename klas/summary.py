"""The closing summary of ``klas run``: the Pareto models, how many are stitched, where the zoo is, how to pick."""
from __future__ import annotations

from pathlib import Path

from klas.io import load_json


def print_summary(run_dir: Path | str) -> None:
    run_dir = Path(run_dir)
    ev_path = run_dir / "evaluation" / "evaluation.json"
    if not ev_path.is_file():
        return
    ev = load_json(ev_path)
    rows = sorted(ev["configs"], key=lambda r: r["flops"])
    pareto = [r for r in rows if r.get("pareto")]
    stitched = [r for r in pareto if not r.get("anchor")]
    print(f"\n== {ev['family']} on {ev['dataset']}: {len(rows)} configurations evaluated on {ev['n_test']} test images, "
          f"{len(pareto)} on the Pareto front ({len(stitched)} stitched, {len(pareto) - len(stitched)} anchors); "
          f"AUC {ev['auc']:.4f}")
    print(f"{'model':42s} {'MFLOPs':>8s} {'test acc':>9s} {'latency ms':>11s}")
    for r in pareto:
        lat = f"{r['latency_ms']:.3f}" if r.get("latency_ms") is not None else "-"
        print(f"{r['key']:42s} {r['flops'] / 1e6:8.2f} {r['test_acc']:9.2f} {lat:>11s}")
    zoo = run_dir / "zoo"
    if (zoo / "manifest.json").is_file():
        n = len(load_json(zoo / "manifest.json")["models"])
        cheapest = min(r["flops"] for r in pareto) / 1e6
        print(f"\nzoo: {zoo} ({n} ONNX models + manifest.json)")
        print(f"pick one:  klas pick {zoo} --max-flops {max(cheapest * 2, cheapest + 0.01):.1f}M")
