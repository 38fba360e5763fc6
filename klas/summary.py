"""The closing summary of ``klas run``: the Pareto models, how many are stitched, where the zoo is, how to pick."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from klas.io import load_json


def print_summary(run_dir: Path | str) -> None:
    from klas.stages.s5_evaluation import EvaluationArtifact

    run_dir = Path(run_dir)
    if not (run_dir / "evaluation" / EvaluationArtifact.RECORD).is_file():
        return
    ev = asdict(EvaluationArtifact.load(run_dir / "evaluation"))
    rows = sorted(ev["configs"], key=lambda r: r["flops"])
    pareto = [r for r in rows if r.get("pareto")]
    stitched = [r for r in pareto if not r.get("anchor")]
    print(f"\n== {ev['family']} on {ev['dataset']}: {len(rows)} configurations evaluated on {ev['n_test']} test images, "
          f"{len(pareto)} on the Pareto front ({len(stitched)} stitched, {len(pareto) - len(stitched)} anchors); "
          f"AUC {ev['auc']:.4f}")
    print(f"{'model':42s} {'MFLOPs':>8s} {'test acc':>9s} {'torch ms':>9s} {'onnx p50 ms':>12s}")
    onnx_p50 = _onnx_latency(run_dir / "zoo" / "manifest.json")
    for r in pareto:
        lat = f"{r['latency_ms']:.3f}" if r.get("latency_ms") is not None else "-"
        ort = f"{onnx_p50[r['key']]:.3f}" if r["key"] in onnx_p50 else "-"
        print(f"{r['key']:42s} {r['flops'] / 1e6:8.2f} {r['test_acc']:9.2f} {lat:>9s} {ort:>12s}")
    _compare_with_pretrained(ev)
    zoo = run_dir / "zoo"
    if (zoo / "manifest.json").is_file():
        n = len(load_json(zoo / "manifest.json")["models"])
        cheapest = min(r["flops"] for r in pareto) / 1e6
        print(f"\nzoo: {zoo} ({n} ONNX models + manifest.json)")
        print(f"pick one:  klas pick {zoo} --max-flops {max(cheapest * 2, cheapest + 0.01):.1f}M")


def _compare_with_pretrained(ev: dict) -> None:
    """Put the run beside the untouched pretrained anchors (embedded families carry their accuracy in the card):
    shared-weight finetuning changes the anchors too, and a stitched model only helps if it beats *those*."""
    from klas.errors import KlasError
    from klas.stages.s5_evaluation import auc
    from klas.families.trainer import load_card

    try:
        card = load_card(ev["family"])["anchors"]
    except KlasError:
        return
    if ev.get("n_test") != 10000:
        return  # the card's accuracies are on the full test set
    flops, accs = [a["flops"] for a in card], [a["test_acc"] for a in card]
    ref_auc = auc(flops, accs, ev["flops_range"]["min"], ev["flops_range"]["max"])
    stair = sorted(zip(flops, accs))
    beat = [r for r in ev["configs"] if not r.get("anchor")
            and r["test_acc"] > max([a for f, a in stair if f <= r["flops"]], default=0.0)]
    print(f"pretrained anchors before finetuning: " + ", ".join(f"{a['name']} {a['test_acc']:.2f}" for a in card)
          + f" (AUC {ref_auc:.4f}); stitched models above their staircase: {len(beat)}"
          + (f" ({', '.join(r['key'] for r in beat)})" if beat else
             " -- at this finetuning budget stitching does not add over the original anchors"))


def _onnx_latency(manifest: Path) -> dict[str, float]:
    """p50 (ms) of each exported model's first latency record (this machine's, at export)."""
    if not manifest.is_file():
        return {}
    return {m["name"]: m["latency"][0]["p50_ms"] for m in load_json(manifest)["models"] if m.get("latency")}
