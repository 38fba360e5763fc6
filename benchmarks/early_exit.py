"""Stitched early exit (issue 17, stretch goal): is a *handoff cascade* -- run the untouched small anchor A; if unsure,
hand A's block-i output through a stitched configuration's stitch layer to the larger target's remaining blocks --
more accurate than ordinary cascades and single networks at the same average cost? Chosen on val, reported on test.

    python benchmarks/early_exit.py --work runs/recipe_table --threads 1 --out benchmarks/results/early_exit_fmnist-deit

Rows: every row folder under ``--work`` with a ``row.json`` (a row without one is unfinished and skipped), or the
labels of ``--rows``; plus any run folders of ``--extra-runs`` (e.g. runs/demo). The handoff equals the stitched
configuration only when the configuration's source prefix is the untouched anchor's (the ``frozen`` recipe; checked
on the weights and on the logits); rows of other recipes are skipped with the reason, unless
``--untouched-prefix-handoff`` asks for the different network "untouched prefix -> that row's finetuned suffix",
whose accuracy is then measured (as always here), and which is labelled as such. The logic lives in
``klas.research.early_exit``; this file is the CLI, the table and the plot.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def discover(args) -> tuple[list[tuple[str, Path]], list[dict]]:
    """(label, run folder) of the rows to study, and the rows skipped as unfinished."""
    work = Path(args.work)
    found, skipped = [], []
    labels = args.rows if args.rows else sorted(p.name for p in work.iterdir() if p.is_dir()) if work.is_dir() else []
    for label in labels:
        d = work / label
        if not (d / "row.json").is_file():
            skipped.append(dict(label=label, run_dir=str(d), reason="no row.json: unfinished (or absent) row"))
            continue
        found.append((label, d))
    for d in map(Path, args.extra_runs or []):
        if (d / "evaluation" / "evaluation.json").is_file() and (d / "finetune" / "finetune.json").is_file():
            found.append((d.name, d))
        else:
            skipped.append(dict(label=d.name, run_dir=str(d), reason="no evaluation/evaluation.json or finetune record"))
    return found, skipped


class Untouched:
    """The untouched anchors and their (pred, conf) on val and test, built once per family / weights / data."""

    def __init__(self):
        self._cache = {}

    def get(self, meta, data_root, batch_size: int, progress: bool, subset: int | None = None):
        """``meta``: the run's ``FinetuneArtifact``."""
        from klas.data import open_split
        from klas.research.early_exit import TASK
        from klas.stages.s5_evaluation import predictions, untouched_anchors

        key = (meta.family, str(meta.weights), meta.num_classes, tuple(meta.input_shape), meta.dataset,
               str(data_root), subset)
        if key not in self._cache:
            anchors = untouched_anchors(meta)
            if anchors is None:
                raise SystemExit(f"{meta.family}: the run's anchors were passed in; no untouched anchors to rebuild")
            # NOTE: the splits exactly as the evaluation stage opens them (whole val and test, the run's dataset)
            data = {s: open_split(meta.family, s, None, root=data_root, dataset=meta.dataset).subset(subset)
                    for s in ("val", "test")}
            outs = {}
            for v in _bar(anchors, progress, "untouched anchors"):
                outs[v.name] = {s: predictions(TASK, v.model, data[s], batch_size) for s in data}
            self._cache[key] = (anchors, data, outs)
        return self._cache[key]


def _bar(it, progress: bool, desc: str):
    from tqdm import tqdm

    return tqdm(it, desc=f"[early-exit] {desc}", disable=not progress, leave=False)


def study_row(label: str, run: Path, args, untouched: Untouched) -> dict:
    import torch

    from klas.data import batches
    from klas.metrics import sign_test
    from klas.research import early_exit as ee
    from klas.stages.s5_evaluation import EvaluationArtifact, predictions
    from klas.stitched import finetune_record, load_stitched_models

    t0 = time.perf_counter()
    meta = finetune_record(run)
    ev = EvaluationArtifact.load(run / "evaluation")
    recipe = meta.recipe
    base = dict(label=label, run_dir=str(run), recipe=recipe)
    exact = recipe == "frozen"
    if not exact and not args.untouched_prefix_handoff:
        return dict(base, applies=False, mode=None,
                    reason=f"recipe {recipe}: each stitch's source prefix is finetuned (not the untouched anchor's), "
                           f"so the handoff from the untouched anchor is not the stitched configuration; skipped")
    mode = "handoff" if exact else "untouched-prefix handoff (a different network: untouched prefix -> this row's " \
                                   "finetuned suffix; accuracy measured, not the stitched row's)"
    anchors, data, outs = untouched.get(meta, args.data_root, args.batch_size, args.progress,
                                        args.subset)
    views = {v.name: v for v in anchors}
    labels = {s: data[s].labels for s in data}
    # the splits are the evaluation's: the untouched anchors' accuracies must be the evaluation.json ones
    split_check = {u["key"]: dict(val=(ee.TASK.score(outs[u["key"]]["val"][0], labels["val"]), u["val_acc"]),
                                  test=(ee.TASK.score(outs[u["key"]]["test"][0], labels["test"]), u["test_acc"]))
                   for u in ev.untouched}
    same_splits = all(abs(a - b) < 1e-9 for c in split_check.values() for a, b in c.values())
    net, _ = load_stitched_models(run)
    ev_rows = {r["key"]: r for r in ev.configs}
    singles = [ee.single_point("anchor", v.name, outs[v.name], labels, v.flops) for v in anchors]
    stitched_out, stitch_info = {}, []
    x_check = next(iter(batches(data["val"].subset(args.check_images), args.check_images)))[0]
    for k in _bar([k for k in net.indices if not net.configs[k].is_anchor], args.progress, f"{label}: stitches"):
        c = net.configs[k]
        sn = net.net(k)
        src = views[c.source]
        handoff = ee.Handoff(src, sn)
        s_out = {s: predictions(ee.TASK, sn, data[s], args.batch_size) for s in data}
        h_out = {s: predictions(ee.TASK, handoff, data[s], args.batch_size) for s in data}
        stitched_out[c.key] = s_out
        with torch.inference_mode():
            sn.eval()
            # the claim the cost accounting rests on: A run once, its block-i activation through the stitch layer +
            # suffix (every image deferred) gives the stitched network's logits
            run_ = ee.handoff_cascade(handoff, x_check, threshold=float("inf"))
            ref_logits = sn(x_check)
            ref_act = sn.src.forward_blocks(sn.src.forward_stem(x_check), 0, c.i + 1)
            small_diff = float((run_["small"] - src.model(x_check)).abs().max())
        info = dict(key=c.key, config=c.to_dict(), index=k, flops=sn.flops, source_flops=src.flops,
                    target_flops=views[c.target].flops, prefix_flops=ee.prefix_flops(src, c.i),
                    extra_flops=ee.handoff_extra_flops(src, sn),
                    source_identity=ee.source_identity(src, sn),
                    check=dict(images=len(x_check),
                               handoff_logits_max_abs_diff=float((run_["logits"] - ref_logits).abs().max()),
                               activation_max_abs_diff=float((run_["activation"] - ref_act).abs().max()),
                               small_logits_vs_model_max_abs_diff=small_diff),
                    prediction_disagreements={s: int((h_out[s][0] != s_out[s][0]).sum()) for s in data},
                    stitched_acc={s: ee.TASK.score(s_out[s][0], labels[s]) for s in data},
                    stitched_acc_evaluation_json=dict(val=ev_rows[c.key]["val_acc"], test=ev_rows[c.key]["test_acc"]),
                    handoff_acc={s: ee.TASK.score(h_out[s][0], labels[s]) for s in data})
        info["_h_out"] = h_out
        stitch_info.append(info)
        singles.append(ee.single_point("configuration", c.key, s_out, labels, sn.flops))
        del sn, handoff
    flops = {p["name"]: p["flops_worst"] for p in singles}
    all_outs = {**outs, **stitched_out}
    val_acc = {p["name"]: p["val_acc"] for p in singles}
    # ordinary cascades: every untouched anchor -> every untouched anchor / stitched configuration that costs more and
    # is more accurate on val, re-run from the input
    ordinary = []
    for v in anchors:
        for p in singles:
            if p["flops_worst"] > v.flops and p["val_acc"] > val_acc[v.name]:
                ordinary += ee.cascade_points("cascade", f"{v.name}>{p['name']}", outs[v.name], all_outs[p["name"]],
                                              labels, v.flops, flops[p["name"]])
    refs = singles + ordinary
    stitches = []
    for info in stitch_info:
        h_out = info.pop("_h_out")
        c = info["config"]
        pts = ee.cascade_points("handoff", f"{c['source']}=>{info['key']}", outs[c["source"]], h_out, labels,
                                info["source_flops"], info["extra_flops"])
        recs, best = ee.compare(pts, refs)
        ident, chk = info["source_identity"], info["check"]
        info["exact"] = bool(exact and ident["identical"] and chk["handoff_logits_max_abs_diff"] <= args.tolerance)
        info["worst_flops"] = dict(handoff=info["source_flops"] + info["extra_flops"],
                                   ordinary_to_target=info["source_flops"] + info["target_flops"])
        curve = [dict(ee.public(p), reference=None if r["reference"] is None else refs[r["reference"]]["name"],
                      diff_val=r.get("diff_val"), diff_test=r.get("diff_test")) for p, r in zip(pts, recs)]
        chosen = None
        if best is not None:
            p, ref = pts[best], refs[recs[best]["reference"]]
            chosen = dict(handoff=ee.public(p), reference=ee.public(ref),
                          diff_val=recs[best]["diff_val"], diff_test=recs[best]["diff_test"],
                          worst_flops=dict(handoff=p["flops_worst"], reference=ref["flops_worst"]),
                          sign_test_val=sign_test(p["_correct"]["val"], ref["_correct"]["val"]),
                          sign_test_test=sign_test(p["_correct"]["test"], ref["_correct"]["test"]))
        wins = [r for r in recs if r.get("diff_val") is not None and r["diff_val"] > 0]
        info.update(curve=curve, best=chosen, points_ahead_on_val=len(wins),
                    points_ahead_on_val_also_ahead_on_test=sum(r["diff_test"] > 0 for r in wins),
                    verdict=("yes" if chosen and chosen["diff_val"] > 0 else "no") if exact else "n/a")
        stitches.append(info)
    # the verdict takes the val maximum over every handoff point of the row: a significance check that pays for that
    # choice (Bonferroni over the points, as the evaluation stage's admission) says whether it is more than noise
    n_points = sum(len(s["curve"]) for s in stitches)
    for s in stitches:
        if s["best"]:
            s["best"]["significant_on_val"] = bool(s["best"]["diff_val"] > 0 and s["best"]["sign_test_val"]["p_value"]
                                                   < args.alpha / max(n_points, 1))
            s["best"]["bonferroni_points"] = n_points
        if s["verdict"] == "yes" and not (s["best"] and s["best"]["significant_on_val"]):
            # klas's admission rule: ahead on val by more than noise, after paying for the choice among the points
            s["verdict"] = "no"
    best_stitch = max((s for s in stitches if s["best"]), key=lambda s: s["best"]["diff_val"], default=None)
    return dict(base, applies=exact, mode=mode, same_splits_as_evaluation=same_splits, split_check=split_check,
                n_val=len(labels["val"]), n_test=len(labels["test"]),
                anchors=[ee.public(p) for p in singles if p["kind"] == "anchor"],
                configurations=[ee.public(p) for p in singles if p["kind"] == "configuration"],
                ordinary_cascades=[ee.public(p) for p in ordinary], stitches=stitches,
                summary=dict(best_stitch=None if best_stitch is None else best_stitch["key"],
                             best=None if best_stitch is None else best_stitch["best"],
                             all_exact=all(s["exact"] for s in stitches),
                             max_handoff_logits_diff=max((s["check"]["handoff_logits_max_abs_diff"] for s in stitches),
                                                         default=None),
                             verdict=("yes" if any(s["verdict"] == "yes" for s in stitches) else "no") if exact
                             else "n/a"),
                wall_s=round(time.perf_counter() - t0, 1))


def markdown(table: dict) -> str:
    m = 1e6
    lines = [f"# Stitched early exit (handoff cascades), {table['family']}", "",
             "Per stitched configuration A[:i+1]->T[j+1:]: the handoff point with the largest val accuracy gain over "
             "the best reference (untouched anchor, stitched configuration or ordinary cascade re-run from the input) "
             "whose val average FLOPs is no larger; test figures reported for that val choice. Worst case: handoff "
             "= A + stitch layer + T's remaining blocks and head; ordinary A -> T = A + T.", "",
             "| row | stitch | exact (max logit diff) | handoff @t | val MFLOPs avg | val acc | reference | ref val "
             "MFLOPs | ref val acc | Δ val | sign p val (Bonf. sig.) | test MFLOPs h / ref | Δ test | sign p (test) | "
             "worst MFLOPs h / ref / A+T | verdict |", "|" + "---|" * 16]
    for row in table["rows"]:
        if not row.get("stitches"):
            lines.append(f"| {row['label']} |" + " - |" * 14 + f" {row.get('reason', '-')} |")
            continue
        for s in row["stitches"]:
            b = s["best"]
            if b is None:
                continue
            h, r = b["handoff"], b["reference"]
            lines.append(
                f"| {row['label']} | {s['key']} | {'yes' if s['exact'] else 'no'} "
                f"({s['check']['handoff_logits_max_abs_diff']:.1e}) | {h['threshold']:.4f} | "
                f"{h['flops_avg']['val'] / m:.2f} | {h['val_acc']:.2f} | {r['name']} | {r['flops_avg']['val'] / m:.2f} | "
                f"{r['val_acc']:.2f} | {b['diff_val']:+.2f} | {b['sign_test_val']['p_value']:.3f} "
                f"({'yes' if b['significant_on_val'] else 'no'}) | {h['flops_avg']['test'] / m:.2f} / "
                f"{r['flops_avg']['test'] / m:.2f} | {b['diff_test']:+.2f} | {b['sign_test_test']['p_value']:.3f} | "
                f"{s['worst_flops']['handoff'] / m:.2f} / {r['flops_worst'] / m:.2f} / "
                f"{s['worst_flops']['ordinary_to_target'] / m:.2f} | {s['verdict']} |")
    def verdict(r: dict) -> str:
        s = r.get("summary")
        if not s:
            return "skipped"
        b = s.get("best")
        if not b:
            return s["verdict"]
        sig = "significant" if b.get("significant_on_val") else "not significant"
        return (f"{s['verdict']} (best: {s['best_stitch']}, Δ val {b['diff_val']:+.2f} pts, {sig} on val after "
                f"Bonferroni over {b.get('bonferroni_points')} points; Δ test {b['diff_test']:+.2f} pts)")

    lines += ["", "Row verdicts (a handoff point more accurate on val than every reference of no larger val average "
              "cost, by klas's admission rule: sign test, Bonferroni over the row's points):", ""] + [f"- {r['label']}: {verdict(r)}" for r in table["rows"]]
    if table.get("skipped"):
        lines += ["", "Skipped: " + "; ".join(f"{s['label']} ({s['reason']})" for s in table["skipped"])]
    return "\n".join(lines) + "\n"


def plot(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter

    from klas.io import atomic_path
    from klas.metrics import pareto_mask

    rows = [r for r in table["rows"] if r.get("stitches")]
    if not rows:
        return
    fig, axes = plt.subplots(1, len(rows), figsize=(5.2 * len(rows), 4.3), squeeze=False)
    m = 1e6
    for ax, row in zip(axes[0], rows):
        an = sorted(row["anchors"], key=lambda p: p["flops_worst"])
        xs, ys = [p["flops_worst"] / m for p in an], [p["test_acc"] for p in an]
        stair = [max(ys[:k + 1]) for k in range(len(ys))]  # the best accuracy deployable within each budget
        ax.step(xs + [xs[-1] * 1.05], stair + [stair[-1]], where="post", color="k", lw=1.2,
                label="untouched anchors (staircase)")
        ax.scatter(xs, ys, marker="*", s=110, color="k", zorder=4)
        cf = row["configurations"]
        ax.scatter([p["flops_worst"] / m for p in cf], [p["test_acc"] for p in cf], marker="x", color="0.4", s=25,
                   label="stitched configurations")
        oc = row["ordinary_cascades"]
        ax.scatter([p["flops_avg"]["test"] / m for p in oc], [p["test_acc"] for p in oc], s=7, color="C0", alpha=0.35,
                   label="ordinary cascades")
        front = pareto_mask([p["flops_avg"]["val"] for p in oc], [p["val_acc"] for p in oc]) if oc else []
        fr = sorted((p for p, k in zip(oc, front) if k), key=lambda p: p["flops_avg"]["test"])
        ax.plot([p["flops_avg"]["test"] / m for p in fr], [p["test_acc"] for p in fr], color="C0", lw=1,
                label="ordinary cascades, val front")
        for n, s in enumerate(row["stitches"]):
            cv = sorted(s["curve"], key=lambda p: p["flops_avg"]["test"])
            ax.plot([p["flops_avg"]["test"] / m for p in cv], [p["test_acc"] for p in cv], marker=".", ms=4, lw=1,
                    color=f"C{n + 1}", label=f"handoff {s['key'].replace('fmnist-deit-', '')}")
            if s["best"]:
                h = s["best"]["handoff"]
                ax.scatter([h["flops_avg"]["test"] / m], [h["test_acc"]], s=60, facecolors="none",
                           edgecolors=f"C{n + 1}", zorder=5)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(FixedLocator([1, 2, 5, 10, 20, 50]))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("average MFLOPs per image (test)")
        ax.set_ylabel("top-1 test accuracy (%)")
        ax.set_ylim(bottom=max(0, min(ys) - 8))
        ax.set_title(f"{row['label']} ({row['recipe']})", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="lower right")
    fig.suptitle(f"{table['family']}: handoff vs ordinary cascades\n(circles: val-chosen handoff points)", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="runs/recipe_table", help="folder of row run folders (benchmarks/recipe_table.py)")
    p.add_argument("--rows", nargs="*", help="row labels (default: every row folder with a row.json)")
    p.add_argument("--extra-runs", nargs="*", default=[], help="more run folders, e.g. runs/demo")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/early_exit_fmnist-deit", help="output stem (.json .md .png)")
    p.add_argument("--data-root", default=None)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--subset", type=int, default=None, help="first N images of val and test (a smoke run; the "
                   "figures are then not the evaluation's)")
    p.add_argument("--check-images", type=int, default=64, help="val images of the activation-handoff check")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max logit diff for the handoff to count as exact")
    p.add_argument("--alpha", type=float, default=0.05, help="level of the val sign test (Bonferroni over the row's "
                   "handoff points)")
    p.add_argument("--untouched-prefix-handoff", action="store_true",
                   help="also evaluate non-frozen rows' 'untouched prefix -> finetuned suffix' network (labelled)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from tqdm import tqdm

    from klas.io import save_json
    from klas.stages.s5_evaluation import save_text

    found, skipped = discover(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    untouched = Untouched()
    from klas_runtime.machine import machine_info

    table = dict(family=None, command=" ".join([Path(sys.argv[0]).name] + (sys.argv[1:] if argv is None else argv)),
                 threads=args.threads, subset=args.subset, machine=machine_info(),
                 definitions=dict(
                     handoff="run untouched source anchor A; if max softmax < t: A's block-i output -> stitch layer -> "
                             "target blocks j+1.. -> head",
                     thresholds="5 %..95 % quantiles of A's val confidence (as the evaluation stage's cascades)",
                     flops_avg="A + deferral * extra, extra = flops(stitched) - (A's stem + blocks 0..i); ordinary "
                               "cascade S -> L: S + deferral * L",
                     flops_worst="handoff: A + extra; ordinary S -> L: S + L; single network: its FLOPs",
                     references="untouched anchors, stitched configurations (as single networks), ordinary cascades "
                                "from every untouched anchor S to every single network costing more and more accurate "
                                "on val than S",
                     comparison="per handoff point: the reference with the best val accuracy among those with val "
                                "average FLOPs <= the point's; best point = largest val difference; test reported",
                     verdict="yes when the val-chosen handoff point is more accurate on val than its equal-cost "
                             "reference by a paired sign test at --alpha, Bonferroni over the row's handoff points "
                             "(the evaluation stage's admission rule); val is also where the point was chosen: the "
                             "test difference is the honest figure",
                     exact="frozen recipe, source copy's weights identical to the untouched anchor's, and handoff "
                           "logits from A's block-i activation within --tolerance of the stitched net's forward"),
                 rows=[], skipped=skipped)
    for label, run in tqdm(found, desc="[early-exit] rows", disable=not args.progress):
        t0 = time.perf_counter()
        row = study_row(label, run, args, untouched)
        table["rows"].append(row)
        if table["family"] is None and row.get("stitches") is not None:
            from klas.stitched import finetune_record

            table["family"] = finetune_record(run).family
        s = row.get("summary") or {}
        print(f"[early-exit] {label}: {row.get('reason') or 'verdict ' + str(s.get('verdict'))} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        table["family"] = table["family"] or "fmnist-deit"
        save_json(table, out.with_suffix(".json"))
        save_text(markdown(table), out.with_suffix(".md"))
        plot(table, out.with_suffix(".png"))
    print(markdown(table), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
