"""The finetuning-recipe results table (issue 17): for each recipe, several seeds at the demo's budget and one seed at a
multiple of it, then selection methods compared under one recipe -- every row finetuned from the demo run's
selection and judged by the same evaluation stage as ``klas run`` (untouched anchors, val admission, cascades).

    python benchmarks/recipe_table.py --run-dir runs/demo --work runs/recipe_table --threads 1

Each row is its own run folder under ``--work`` and writes ``row.json`` when done, so an interrupted table resumes at
the next unfinished row. The table is (re)written after every row: ``benchmarks/results/recipe_table_<family>.json``,
``.md`` and ``.png`` (zoo AUC per row, the untouched anchors' AUC as a line).

Equal cost: every row of one budget sees the same number of training images. ``independent`` and ``frozen`` spend the
demo budget (``epochs`` passes over the train split) on each of the ``max_stitches`` stitches; ``shared`` trains one
supernetwork, so it gets ``max_stitches`` times the epochs.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def plan(recipes: list[str], seeds: list[int], big: float, big_recipes: list[str], methods: list[str],
         method_recipe: str) -> list[dict]:
    """Rows in the order they are worth having: the demo budget per recipe and seed, then the selection methods
    under one recipe, then the larger budget."""
    rows = [dict(recipe=r, seed=s, budget=1.0, method="klas") for s in seeds for r in recipes]
    rows += [dict(recipe=method_recipe, seed=seeds[0], budget=1.0, method=m) for m in methods if m != "klas"]
    rows += [dict(recipe=r, seed=seeds[0], budget=big, method="klas") for r in big_recipes]
    for row in rows:
        row["label"] = f"{row['recipe']}-{row['method']}-x{row['budget']:g}-s{row['seed']}"
    return rows


def run_row(row: dict, args, base_cfg, family: str) -> dict:
    from klas.io import load_json, save_json
    from klas.research.compare import place_selection, resolve_selection
    from klas.research.context import run_context
    from klas.stages import s4_finetune, s5_evaluation
    from klas.stages.s5_evaluation import EvaluationConfig

    out = Path(args.work) / row["label"]
    done = out / "row.json"
    if done.is_file():
        return load_json(done)
    _, sel = resolve_selection(row["method"], Path(args.run_dir), family)
    epochs = max(1, round(base_cfg.epochs * row["budget"]))
    if row["recipe"] == "shared":  # one network for every stitch: the same images in total
        epochs *= base_cfg.max_stitches or 1
    cfg = replace(base_cfg, recipe=row["recipe"], epochs=epochs)
    ctx = run_context(out, family, seed=row["seed"], progress=args.progress)  # the row's run folder
    place_selection(out, load_json(sel), family)  # the row finetunes the method's selection
    print(f"[table] {row['label']}: recipe {cfg.recipe}, {epochs} epoch(s), selection {row['method']}", flush=True)
    ft = s4_finetune.run(cfg, ctx)
    t1 = time.perf_counter()
    ev = s5_evaluation.run(EvaluationConfig(latency=False), run_context(out, family, progress=args.progress))
    t2 = time.perf_counter()

    def stair(flops: float) -> float:
        return max((u["test_acc"] for u in ev.untouched if u["flops"] <= flops), default=0.0)

    stitched = [r for r in ev.configs if not r["anchor"]]
    best = max(stitched, key=lambda r: r["test_acc"] - stair(r["flops"]), default=None)
    kinds = [z["kind"] for z in ev.zoo]
    result = dict(row, zoo_auc=ev.zoo_auc, anchors_auc=ev.anchors_auc,
                  stitched_in_zoo=kinds.count("configuration"), cascades_in_zoo=kinds.count("cascade"),
                  stitched_above_staircase_test=sum(r["test_acc"] > stair(r["flops"]) for r in stitched),
                  largest_gain_test=None if best is None else round(best["test_acc"] - stair(best["flops"]), 2),
                  largest_gain_config=None if best is None else best["key"],
                  stitches=[dict(key=r["key"], flops=r["flops"], val_acc=r["val_acc"], test_acc=r["test_acc"],
                                 gain_test=round(r["test_acc"] - stair(r["flops"]), 2),
                                 admitted=r.get("admitted", False)) for r in stitched],
                  images_seen=ft.images_seen, steps=ft.steps,
                  # the artifact's own training time (a resumed row keeps the time of the run that trained it)
                  finetune_wall_s=round(ft.wall_s, 1),
                  evaluation_wall_s=round(t2 - t1, 1), threads=args.threads)
    save_json(result, done)
    return result


def stitched_aucs(row: dict, work: Path) -> dict:
    """Two AUCs without cascades (which dominate every row here and so hide the recipes' differences): the untouched
    anchors plus the admitted stitched models (what the zoo would be without cascades), and the anchors plus every
    finetuned stitch (no admission: the most a recipe could add at this budget)."""
    from klas.metrics import auc
    from klas.stages.s5_evaluation import EvaluationArtifact

    ev = EvaluationArtifact.load(work / row["label"] / "evaluation")
    anchors = [(u["flops"], u["test_acc"]) for u in ev.untouched]
    lo, hi = min(f for f, _ in anchors), max(f for f, _ in anchors)
    admitted = [(s["flops"], s["test_acc"]) for s in row["stitches"] if s["admitted"]]
    every = [(s["flops"], s["test_acc"]) for s in row["stitches"]]

    def a(points):
        return auc([f for f, _ in points], [acc for _, acc in points], lo, hi)

    return dict(auc_admitted_stitched=a(anchors + admitted), auc_all_stitched=a(anchors + every),
                mean_stitched_test=statistics.fmean(acc for _, acc in every) if every else None)


def aggregate(results: list[dict], args, family: str) -> dict:
    results = [dict(r, **stitched_aucs(r, Path(args.work))) for r in results]
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["recipe"], r["method"], r["budget"]), []).append(r)

    def spread(vals: list[float]) -> dict:
        vals = [v for v in vals if v is not None]
        if not vals:
            return dict(mean=None, sd=None, n=0)
        return dict(mean=statistics.fmean(vals), sd=statistics.stdev(vals) if len(vals) > 1 else None, n=len(vals),
                    min=min(vals), max=max(vals))

    summary = [dict(recipe=k[0], method=k[1], budget=k[2], seeds=[r["seed"] for r in v],
                    zoo_auc=spread([r["zoo_auc"] for r in v]), anchors_auc=spread([r["anchors_auc"] for r in v]),
                    auc_admitted_stitched=spread([r["auc_admitted_stitched"] for r in v]),
                    auc_all_stitched=spread([r["auc_all_stitched"] for r in v]),
                    mean_stitched_test=spread([r["mean_stitched_test"] for r in v]),
                    stitched_in_zoo=[r["stitched_in_zoo"] for r in v], cascades_in_zoo=[r["cascades_in_zoo"] for r in v],
                    stitched_above_staircase_test=[r["stitched_above_staircase_test"] for r in v],
                    largest_gain_test=spread([r["largest_gain_test"] for r in v]),
                    images_seen=v[0]["images_seen"], finetune_wall_s=spread([r["finetune_wall_s"] for r in v]))
               for k, v in groups.items()]
    from klas_runtime.machine import machine_info

    return dict(family=family, command=" ".join([Path(sys.argv[0]).name] + sys.argv[1:]), threads=args.threads,
                machine=machine_info(), summary=summary, rows=results)


def markdown(table: dict) -> str:
    def f(s: dict, fmt: str = ".4f") -> str:
        if not s or s.get("mean") is None:
            return "-"
        sd = f" ± {s['sd']:{fmt}}" if s.get("sd") is not None else ""
        return f"{s['mean']:{fmt}}{sd}"

    lines = ["| recipe | selection | budget | seeds | images seen | zoo AUC | anchors AUC | AUC anchors + admitted "
             "stitched | AUC anchors + all stitched | mean stitched test acc | stitched in zoo | cascades in zoo | "
             "stitched above staircase (test) | largest gain at equal FLOPs (test, pts) | finetune s |",
             "|" + "---|" * 15]
    for s in table["summary"]:
        lines.append(f"| {s['recipe']} | {s['method']} | {s['budget']:g}× | {len(s['seeds'])} | {s['images_seen']:,} | "
                     f"{f(s['zoo_auc'])} | {f(s['anchors_auc'])} | {f(s['auc_admitted_stitched'])} | "
                     f"{f(s['auc_all_stitched'])} | {f(s['mean_stitched_test'], '.2f')} | {'/'.join(map(str, s['stitched_in_zoo']))} | "
                     f"{'/'.join(map(str, s['cascades_in_zoo']))} | "
                     f"{'/'.join(map(str, s['stitched_above_staircase_test']))} | {f(s['largest_gain_test'], '+.2f')} | "
                     f"{f(s['finetune_wall_s'], '.0f')} |")
    return "\n".join(lines) + "\n"


def plot(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = table["rows"]
    labels = sorted({(r["recipe"], r["method"], r["budget"]) for r in rows})
    fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(labels)), 3.6))
    for x, key in enumerate(labels):
        ys = [r["zoo_auc"] for r in rows if (r["recipe"], r["method"], r["budget"]) == key]
        ax.scatter([x] * len(ys), ys, color="C0", zorder=3)
    anchors = [r["anchors_auc"] for r in rows if r["anchors_auc"] is not None]
    if anchors:
        ax.axhline(anchors[0], color="k", ls="--", lw=1, label="untouched anchors alone")
    ax.set_xticks(range(len(labels)), [f"{r}\n{m} {b:g}×" for r, m, b in labels], fontsize=8)
    ax.set_ylabel("zoo AUC (test)")
    ax.set_title(f"{table['family']}: zoo AUC per recipe (one dot per seed)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", default="runs/demo", help="a run with probes, scores and selection (e.g. make demo's)")
    p.add_argument("--work", default="runs/recipe_table", help="where each row's run folder goes")
    p.add_argument("--recipes", nargs="+", default=["independent", "shared", "frozen"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--big", type=float, default=5.0, help="the larger budget, as a multiple of the demo's")
    p.add_argument("--big-recipes", nargs="*", default=["independent", "shared", "frozen"])
    p.add_argument("--methods", nargs="*", default=["klas", "snnet-paired", "min-kl"])
    p.add_argument("--method-recipe", default="independent", help="the recipe the selection methods are compared under")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", nargs="*", help="run only rows with these labels")
    p.add_argument("--tag", default="", help="suffix of the result files")
    p.add_argument("--progress", action="store_true")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from klas.config import load_config
    from klas.io import save_json
    from klas.stages.s4_finetune import FinetuneConfig
    from klas.stages.s5_evaluation import save_text

    cfg_path = Path(args.run_dir) / "config.toml"
    cfg = load_config(cfg_path if cfg_path.is_file() else None)
    family = cfg.run.family
    base: FinetuneConfig = cfg.finetune
    rows = plan(args.recipes, args.seeds, args.big, args.big_recipes, args.methods, args.method_recipe)
    if args.only:
        rows = [r for r in rows if r["label"] in args.only]
    stem = RESULTS / f"recipe_table_{family}{args.tag}"
    results = []
    for row in rows:
        results.append(run_row(row, args, base, family))
        table = aggregate(results, args, family)
        save_json(table, stem.with_suffix(".json"))
        save_text(markdown(table), stem.with_suffix(".md"))
        plot(table, stem.with_suffix(".png"))
        print(markdown(table), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
