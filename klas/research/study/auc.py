"""``auc`` (KLAS paper Tab. 2): ``klas.research.compare`` of KLAS vs SN-Net vs Min-KL at equal budget over several
seeds, mean +- spread; ``gain``: what stitching adds over the anchors' staircase, per method, and over a small sweep
of budgets. Resumable at the granularity of one finetuned arm (its ``compare.json``)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from klas.io import load_json
from klas.metrics import auc, pareto_mask
from klas.research.study.common import publish, write_fig
from klas.research.study.common import plt as common_plt
from klas.rundir import RunDir

AUC_METHODS = ("klas", "snnet-paired", "min-kl")


@dataclass(frozen=True)
class AucCfg:
    """Equal budget for every arm: ``steps`` supernetwork steps of batch ``batch_size``, ``n_stitches`` stitched
    configurations each, accuracy on the first ``test_samples`` test images; the zoo admitted on the first
    ``admission_val_samples`` val images (None: all)."""

    steps: int = 300
    batch_size: int = 128
    n_stitches: int = 8
    test_samples: int | None = 2000
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = AUC_METHODS
    val_samples: int = 1000
    init_samples: int = 1024
    admission_val_samples: int | None = None


def _compare_once(run: RunDir, out: Path, methods, steps: int, seed: int, cfg: AucCfg, family, data_root,
                  progress: bool) -> dict:
    """One ``klas.research.compare`` at (steps, seed), skipped when its compare.json exists for the same budget and
    arms."""
    from klas.research.compare import Arm, compare, resolve_selection
    from klas.stages.s4_finetune import FinetuneConfig
    from klas.stages.s5_evaluation import EvaluationConfig
    from klas.stitch import FitCfg

    done = out / "compare.json"
    if done.is_file():
        prev = load_json(done)
        if prev["budget"]["steps"] == steps and [a["label"] for a in prev["arms"]] == list(methods) \
                and prev.get("test_samples") == cfg.test_samples and prev["n_stitches"] <= cfg.n_stitches:
            return prev
    arms = [Arm(*resolve_selection(m, run.path, family)) for m in methods]
    ft = FinetuneConfig(epochs=1, steps_per_epoch=steps, batch_size=cfg.batch_size, val_images=cfg.val_samples,
                        init=FitCfg(method="ls", samples=cfg.init_samples))
    ev = EvaluationConfig(test_subset=cfg.test_samples, val_subset=cfg.admission_val_samples, latency=False)
    return compare(out, arms, ft, ev, seed=seed, family=family, data_root=data_root, n_stitches=cfg.n_stitches,
                   before=False, progress=progress)


def stitching_gain(rows: list[dict]) -> dict:
    """What the stitched configurations add over the anchors' staircase (the same evaluation's anchors): stitched
    points on the Pareto front, and the largest accuracy gain of a stitched model over the best anchor within its
    FLOPs (negative when none beats it)."""
    anchors = [r for r in rows if r["anchor"]]
    stitched = [r for r in rows if not r["anchor"]]
    mask = pareto_mask([r["flops"] for r in rows], [r["test_acc"] for r in rows])
    gains = [(r["test_acc"] - max((a["test_acc"] for a in anchors if a["flops"] <= r["flops"]), default=0.0), r)
             for r in stitched]
    best = max(gains, key=lambda g: g[0], default=None)
    fl = [a["flops"] for a in anchors]
    return dict(n_stitched=len(stitched), stitched_on_front=sum(m and not r["anchor"] for r, m in zip(rows, mask)),
                max_gain=best[0] if best else None, max_gain_config=best[1]["key"] if best else None,
                auc_all=auc([r["flops"] for r in rows], [r["test_acc"] for r in rows], min(fl), max(fl)),
                auc_anchors=auc(fl, [a["test_acc"] for a in anchors], min(fl), max(fl)))


def _arm_rows(out: Path, label: str) -> list[dict]:
    """The configurations of one arm's evaluation (the evaluation stage's artifact)."""
    from klas.research.compare import arm_folder
    from klas.stages.s5_evaluation import EvaluationArtifact

    return EvaluationArtifact.load(arm_folder(out, label) / "evaluation").configs


def auc_study(run_dir: Path | str, out_dir: Path | str, cfg: AucCfg = AucCfg(), family=None, data_root=None,
              progress: bool = True) -> dict:
    """KLAS vs SN-Net vs Min-KL at equal budget over ``cfg.seeds``: AUC mean +- std (and min..max) per method, plus
    the stitching gain over the anchors per arm. Finetuned runs live under ``RUN_DIR/study/auc/steps<n>_seed<k>``
    (kept: a rerun skips them)."""
    run = RunDir(run_dir)
    t0 = time.time()
    per_seed = {}
    for s in cfg.seeds:
        out = run.path / "study" / "auc" / f"steps{cfg.steps}_seed{s}"
        res = _compare_once(run, out, cfg.methods, cfg.steps, s, cfg, family or run.family, data_root, progress)
        per_seed[s] = dict(auc={a["label"]: a["auc"] for a in res["arms"]},
                           finetune_wall_s={a["label"]: a["finetune_wall_s"] for a in res["arms"]},
                           gain={m: stitching_gain(_arm_rows(out, m)) for m in cfg.methods})
    summary = {}
    for m in cfg.methods + ("anchors-only",):
        vals = [per_seed[s]["auc"][m] if m != "anchors-only" else per_seed[s]["gain"][cfg.methods[0]]["auc_anchors"]
                for s in cfg.seeds]
        summary[m] = dict(mean=float(np.mean(vals)), std=float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0,
                          min=float(min(vals)), max=float(max(vals)), values=vals)
    wins = {m: sum(per_seed[s]["auc"][m] == max(per_seed[s]["auc"].values()) for s in cfg.seeds) for m in cfg.methods}
    rec = dict(study="auc", family=run.family, cfg=dict(cfg.__dict__, seeds=list(cfg.seeds),
                                                         methods=list(cfg.methods)),
               summary=summary, wins=wins, per_seed={str(k): v for k, v in per_seed.items()},
               note="anchors-only: AUC of the anchors of the KLAS arm after finetuning, i.e. the staircase without "
                    "any stitched configuration")
    return publish(rec, t0, out_dir, "auc", run.family, plot_auc)


def plot_auc(rec: dict, path: Path) -> None:
    plt = common_plt()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    names = list(rec["summary"])
    for k, m in enumerate(names):
        s = rec["summary"][m]
        ax.errorbar([k], [s["mean"]], yerr=[[s["mean"] - s["min"]], [s["max"] - s["mean"]]], fmt="o", capsize=4)
        ax.scatter([k] * len(s["values"]), s["values"], s=10, c="gray", zorder=3)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("AUC (accuracy vs normalized FLOPs)")
    c = rec["cfg"]
    ax.set_title(f"{rec['family']}: {c['steps']} steps, {c['n_stitches']} stitches, seeds {c['seeds']}", fontsize=9)
    ax.grid(alpha=0.3)
    write_fig(fig, path, 110)


def gain_sweep(run_dir: Path | str, out_dir: Path | str, steps_list=(100, 300, 900), method: str = "klas",
               cfg: AucCfg = AucCfg(), seed: int = 0, family=None, data_root=None, progress: bool = True) -> dict:
    """At which supernetwork budget do stitched models start to beat the anchors' staircase? One ``method`` arm per
    budget (seed ``seed``); each point: stitched models on the Pareto front and the largest gain at equal FLOPs."""
    run = RunDir(run_dir)
    t0 = time.time()
    points = []
    for steps in steps_list:
        out = run.path / "study" / "auc" / f"steps{steps}_seed{seed}"  # reuse the AUC study's run when it has one
        done = out / "compare.json"
        if not done.is_file() or method not in [a["label"] for a in load_json(done)["arms"]]:
            out = run.path / "study" / "gain" / f"{method}_steps{steps}_seed{seed}"
        if out.parent.name == "auc":
            res = load_json(out / "compare.json")
        else:
            res = _compare_once(run, out, (method,), steps, seed, cfg, family or run.family, data_root, progress)
        g = stitching_gain(_arm_rows(out, method))
        points.append(dict(steps=steps, auc=next(a["auc"] for a in res["arms"] if a["label"] == method), **g))
    first = next((p["steps"] for p in points if (p["max_gain"] or 0) > 0), None)
    rec = dict(study="gain", family=run.family, method=method, seed=seed, n_stitches=cfg.n_stitches,
               test_samples=cfg.test_samples, points=points, first_budget_with_gain=first)
    return publish(rec, t0, out_dir, "gain", run.family, plot_gain)


def plot_gain(rec: dict, path: Path) -> None:
    plt = common_plt()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    pts = rec["points"]
    ax.plot([p["steps"] for p in pts], [p["max_gain"] for p in pts], marker="o", label="max gain over anchors (pts)")
    ax.axhline(0, color="k", lw=0.5)
    ax2 = ax.twinx()
    ax2.bar([p["steps"] for p in pts], [p["stitched_on_front"] for p in pts], width=[p["steps"] * 0.3 for p in pts],
            alpha=0.3, color="g", label="stitched on Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel("supernetwork finetuning steps")
    ax.set_ylabel("accuracy gain at equal FLOPs (points)")
    ax2.set_ylabel("stitched models on the front")
    ax.set_title(f"{rec['family']} {rec['method']}: what stitching adds vs budget", fontsize=10)
    fig.legend(fontsize=7, loc="lower right")
    write_fig(fig, path, 110)
