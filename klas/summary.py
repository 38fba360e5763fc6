"""The closing summary of ``klas run``: the zoo (the user's untouched anchors, the stitched models and cascades that
beat them on val), the zoo's AUC beside the untouched anchors' AUC, where the zoo is, how to pick."""
from __future__ import annotations

from pathlib import Path

from klas.io import load_json


def print_summary(run_dir: Path | str) -> None:
    from klas.stages.s5_evaluation import EvaluationArtifact

    run_dir = Path(run_dir)
    if not (run_dir / "evaluation" / EvaluationArtifact.RECORD).is_file():
        return
    ev = EvaluationArtifact.load(run_dir / "evaluation")
    from klas.tasks import get_task

    get_task(ev.task).print_summary(ev, run_dir)  # each task says what its zoo's members are worth


def print_zoo(ev, run_dir: Path) -> None:
    """The classifier zoo: per member FLOPs, val / test accuracy and the exported model's ONNX latency."""
    adm = ev.admission
    n_conf = sum(z["kind"] == "configuration" for z in ev.zoo)
    n_casc = sum(z["kind"] == "cascade" for z in ev.zoo)
    print(f"\n== {ev.family} on {ev.dataset}: {len(ev.configs)} finetuned configurations and "
          f"{adm.get('cascades', 0)} cascade candidates judged on {ev.n_val} val images; zoo = "
          f"{len(ev.untouched)} untouched anchors + {n_conf} stitched/finetuned + {n_casc} cascades "
          f"(test accuracy on {ev.n_test} images, reported after the choice)")
    try:  # the family's one input size and preprocessing (registered or from the config, in this process)
        from klas.families import get_family_cfg

        print(get_family_cfg(ev.family).input_report())
    except Exception:  # noqa: BLE001 -- a family this process does not know: nothing to report
        pass
    print(f"{'model':44s} {'MFLOPs':>8s} {'avg MFLOPs':>10s} {'val acc':>8s} {'test acc':>9s} {'onnx p50 ms':>12s}")
    onnx_p50 = _onnx_latency(run_dir / "zoo" / "manifest.json")
    for z in sorted(ev.zoo, key=lambda z: z["flops_avg"]["val"] if z["kind"] == "cascade" else z["flops"]):
        avg = f"{z['flops_avg']['test'] / 1e6:10.2f}" if z["kind"] == "cascade" else f"{'':10s}"
        ort = f"{onnx_p50[z['name']]:.3f}" if z["name"] in onnx_p50 else "-"
        tag = {"anchor": " (untouched)", "cascade": " (cascade)"}.get(z["kind"], "")
        print(f"{z['name'] + tag:44s} {z['flops'] / 1e6:8.2f} {avg} {z['val_acc']:8.2f} {z['test_acc']:9.2f} "
              f"{ort:>12s}")
    if ev.zoo_auc is not None and ev.anchors_auc is not None:
        best = max((r for r in ev.configs if not r["anchor"]), key=lambda r: r["test_acc"] - _stair(ev, r["flops"]),
                   default=None)
        gain = f"; largest stitched gain at equal FLOPs on test: {best['test_acc'] - _stair(ev, best['flops']):+.2f} " \
               f"points ({best['key']})" if best else ""
        print(f"zoo AUC {ev.zoo_auc:.4f} (cascades at their average cost) vs untouched anchors alone "
              f"{ev.anchors_auc:.4f}; above the anchors' staircase: {n_conf} stitched/finetuned, {n_casc} cascades"
              + gain)
    zoo = run_dir / "zoo"
    if (zoo / "manifest.json").is_file():
        n = len(load_json(zoo / "manifest.json")["models"])
        cheapest = min(z["flops"] for z in ev.zoo) / 1e6
        print(f"\nzoo: {zoo} ({n} manifest entries)")
        print(f"pick one:  klas pick {zoo} --max-flops {max(cheapest * 2, cheapest + 0.01):.1f}M")


def _stair(ev, flops: float) -> float:
    """The untouched anchors' staircase on test: the best anchor within ``flops`` (0 if none)."""
    return max((u["test_acc"] for u in ev.untouched if u["flops"] <= flops), default=0.0)


def _onnx_latency(manifest: Path) -> dict[str, float]:
    """p50 (ms) of each exported model's first latency record (this machine's, at export)."""
    if not manifest.is_file():
        return {}
    return {m["name"]: m["latency"][0]["p50_ms"] for m in load_json(manifest)["models"] if m.get("latency")}
