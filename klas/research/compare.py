"""``klas compare``: stitch-selection methods (KLAS, SN-Net paired / unpaired, Min-KL, ...) and stitch-layer
initialisations compared at equal cost, as in the KLAS paper's experiments.

Every *arm* (a selection x an initialisation) is its own run folder, finetuned from the same pretrained anchors with
the same budget (``FinetuneConfig``: epochs x steps, batch, schedule; the same seed) and the same number of stitched
configurations by the finetune stage, then evaluated by the evaluation stage (``klas.stages.s5_evaluation``): AUC of
the accuracy vs normalized-FLOPs staircase, accuracy at matched FLOPs budgets, number of Pareto points -- after
finetuning and, for the initialisations, before it. The stages run through ``run(cfg, ctx)`` like in a pipeline.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass, fields, replace
from pathlib import Path

from klas.errors import KlasError
from klas.families import Family, create_family, stitched_flops
from klas.io import load_json, save_json
from klas.metrics import staircase
from klas.research.context import run_context
from klas.stages import s4_finetune, s5_evaluation
from klas.stages.s3_selection import SelectionArtifact
from klas.stages.s4_finetune import FinetuneConfig
from klas.stages.s5_evaluation import EvaluationConfig, plot_curves, save_text
from klas.stitch import INIT_METHODS

BUDGETS = (0.25, 0.5, 0.75)


@dataclass(frozen=True)
class Arm:
    """One contender: a selection file, the label it is reported under, and the stitch-layer initialisation."""

    label: str
    selection: Path
    init: str = "ls"


def resolve_selection(spec: str, run_dir: Path | None, family: str | Family) -> tuple[str, Path]:
    """``[LABEL=]PATH`` or ``[LABEL=]METHOD`` -> (label, selection file). A method name is looked up as
    ``RUN_DIR/selection/methods/METHOD/selection.json`` and, when missing, made there by the selection stage from the
    run's scores (``ctx.hooks["out"]``: beside, not over, the run's own selection)."""
    from klas.research import register_all
    from klas.stages import s3_selection

    label, _, what = spec.rpartition("=")
    path = Path(what)
    if path.is_file():
        return label or load_json(path).get("method") or path.stem, path
    if run_dir is None:
        raise KlasError(f"--selection {spec!r}: no such file; a method name needs --run-dir (with its scores)")
    register_all()
    methods = s3_selection.method_names()
    if what not in methods:
        raise KlasError(f"--selection {spec!r}: no such file, and not a method ({', '.join(methods)})")
    made = Path(run_dir) / "selection" / "methods" / what / SelectionArtifact.RECORD
    if not made.is_file():
        ctx = run_context(run_dir, family, hooks=dict(out=made.parent))
        s3_selection.run(s3_selection.SelectionConfig(method=what), ctx)
    return label or what, made


def place_selection(run_dir: Path | str, sel: dict, family: str) -> Path:
    """Write ``sel`` (a selection record: the selection stage's, or a hand-written one with at least ``selected``)
    as ``RUN_DIR/selection/selection.json``, the selection artifact the finetune stage reads; fields a hand-written
    record lacks are left empty."""
    empty = {f.name: [] if f.type == "list" else {} for f in fields(SelectionArtifact) if f.type in ("list", "dict")}
    rec = dict(empty, family=family, method=None)
    rec.update(sel, kind=SelectionArtifact.KIND, version=SelectionArtifact.VERSION)
    path = Path(run_dir) / "selection" / SelectionArtifact.RECORD
    save_json(rec, path)
    return path


def equalize(selected: list[dict], n: int, family: Family) -> list[dict]:
    """``n`` of the selected stitches spread evenly over their FLOPs range (all of them when there are <= n)."""
    if len(selected) <= n:
        return list(selected)

    def flops(e: dict) -> int:
        return int(e.get("flops") or stitched_flops(family[e["source"]], e["i"], family[e["target"]], e["j"]))

    ranked = sorted(selected, key=flops)
    picks = sorted({round(k * (len(ranked) - 1) / max(n - 1, 1)) for k in range(n)})
    return [ranked[k] for k in picks]


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", label).strip("_") or "arm"


def arm_folder(out_dir: Path | str, label: str) -> Path:
    """The run folder of the arm labelled ``label`` in a comparison written to ``out_dir``."""
    return Path(out_dir) / _slug(label)


def _summary_row(arm: Arm, method: str | None, n_stitches: int, after, before, budgets: tuple[float, ...],
                 meta) -> dict:
    def stats(ev) -> dict:
        rows = ev.configs
        xs = [r["flops_norm"] for r in rows]
        acc = [r["test_acc"] for r in rows]
        st = [r["test_acc"] for r in rows if not r["anchor"]]
        return dict(auc=ev.auc, n_pareto=ev.n_pareto,
                    acc_at={str(b): staircase(xs, acc, b) for b in budgets},
                    mean_stitched_acc=sum(st) / len(st) if st else None, best_stitched_acc=max(st, default=None))

    row = dict(label=arm.label, method=method, init=arm.init, selection=str(arm.selection), n_stitches=n_stitches,
               n_configs=len(after.configs), steps=meta.steps, finetune_wall_s=meta.wall_s, **stats(after))
    row["before"] = stats(before) if before is not None else None
    return row


def compare(out_dir: Path | str, arms: list[Arm], cfg: FinetuneConfig, evaluation: EvaluationConfig, *, seed: int,
            family: str | Family, data_root: Path | str | None = None, n_stitches: int | None = None,
            before: bool = True, budgets: tuple[float, ...] = BUDGETS, progress: bool = True) -> dict:
    """Finetune and evaluate every arm under ``cfg``; write ``compare.json``, ``compare.md`` and ``compare.png``
    (plus ``compare-init.png``) into ``out_dir``. Arms with more stitches than the smallest (or ``n_stitches``) are
    cut to that many, spread over FLOPs, so each gets the same number of configurations and steps."""
    if not arms:
        raise KlasError("klas compare: give at least one --selection")
    for a in arms:
        if a.init not in INIT_METHODS:
            raise KlasError(f"--init {a.init!r}: expected one of {', '.join(INIT_METHODS)}")
    labels = [a.label for a in arms]
    if len(set(map(_slug, labels))) != len(labels):
        raise KlasError(f"klas compare: arm labels must be distinct; got {labels}")
    out = Path(out_dir)
    base = family if isinstance(family, Family) else create_family(family, pretrained=True)
    sels = {a.label: load_json(a.selection) for a in arms}
    for a in arms:
        if not isinstance(sels[a.label].get("selected"), list):
            raise KlasError(f"{a.selection}: expected a selection object with a 'selected' list")
    n = n_stitches or min(len(s["selected"]) for s in sels.values())
    rows, curves, curves_init = [], {}, {}
    handed = isinstance(family, Family)  # anchors passed in: each arm trains a fresh copy, evaluation gets one too

    def fresh():  # a copy of the handed-in anchors for one use (None: the stages build them from the registry)
        return copy.deepcopy(base) if handed else None

    def ctx(arm_dir: Path, fam, **hooks):
        return run_context(arm_dir, fam if handed else base.name, data_root=data_root, seed=seed, progress=progress,
                           hooks=hooks)

    for a in arms:
        sel = dict(sels[a.label])
        if len(sel["selected"]) != n:
            sel.update(selected=equalize(sel["selected"], n, base), equalized_from=len(sel["selected"]))
        arm_dir = arm_folder(out, a.label)
        arm = ctx(arm_dir, fresh(), restart=True)  # makes the arm's run folder (run.json) first
        place_selection(arm_dir, sel, base.name)
        arm_cfg = replace(cfg, init=replace(cfg.init, method=a.init))
        if progress:
            print(f"[compare] {a.label}: {len(sel['selected'])} stitches, init {a.init}", flush=True)
        meta = s4_finetune.run(arm_cfg, arm)
        ev = s5_evaluation.run(evaluation, ctx(arm_dir, base, built_family=fresh()))
        ev0 = None
        if before:
            ev0 = s5_evaluation.run(replace(evaluation, latency=False),
                                    ctx(arm_dir, base, state="init", built_family=fresh()))
            curves_init[a.label] = ev0.configs
        curves[a.label] = ev.configs
        rows.append(_summary_row(a, sel.get("method"), len(sel["selected"]), ev, ev0, budgets, meta))
    best = max(rows, key=lambda r: r["auc"])
    result = dict(family=base.name, budget=dict(epochs=cfg.epochs, steps_per_epoch=meta.steps_per_epoch,
                                                steps=meta.steps, batch_size=cfg.batch_size, seed=seed),
                  n_stitches=n, test_samples=evaluation.test_subset, budgets=list(budgets), best_auc=best["label"],
                  arms=rows, machine=meta.machine)
    save_json(result, out / "compare.json")
    save_text(markdown(result), out / "compare.md")
    plot_curves(curves, out / "compare.png", title=f"{base.name}: after finetuning ({meta.steps} steps each)")
    if curves_init:
        plot_curves(curves_init, out / "compare-init.png", title=f"{base.name}: stitch layers before finetuning")
    return result


def markdown(result: dict) -> str:
    """The comparison table: one row per arm; 'before' figures are the stitch layers as initialised."""
    b = result["budgets"]
    head = ("| arm | method | init | stitches | AUC | AUC before FT | " + " | ".join(f"acc@{x:g}" for x in b)
            + " | Pareto pts | mean stitched acc (before -> after) |")
    lines = [f"Budget: {result['budget']['steps']} steps (batch {result['budget']['batch_size']}) per arm, "
             f"{result['n_stitches']} stitches each. acc@x: best test accuracy within normalized FLOPs x.", "",
             head, "|" + "---|" * (8 + len(b))]
    for r in result["arms"]:
        bf = r["before"] or {}
        mean_b = bf.get("mean_stitched_acc")
        mean = r["mean_stitched_acc"]
        lines.append(f"| {r['label']} | {r['method']} | {r['init']} | {r['n_stitches']} | {r['auc']:.4f} | "
                     + (f"{bf['auc']:.4f}" if bf else "-") + " | "
                     + " | ".join(f"{r['acc_at'][str(x)]:.2f}" for x in b) + f" | {r['n_pareto']} | "
                     + (f"{mean_b:.2f} -> " if mean_b is not None else "")
                     + (f"{mean:.2f}" if mean is not None else "-") + " |")
    lines.append("")
    lines.append(f"Highest AUC: {result['best_auc']}.")
    return "\n".join(lines) + "\n"

