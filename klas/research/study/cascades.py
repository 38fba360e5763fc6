"""``cascades`` (KLAS paper App. E): small -> large anchor with the task's confidence routing (max softmax for
classifiers, ``klas.metrics.cascade_outputs``, as the evaluation stage's cascades), thresholds swept, average FLOPs
vs the task's metric, next to the stitched Pareto front of an evaluation."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from klas.errors import KlasError
from klas.metrics import auc, cascade_outputs, pareto_mask
from klas.research.study.common import context, publish, write_fig
from klas.research.study.common import plt as common_plt


@torch.no_grad()
def anchor_outputs(task, fam, x: torch.Tensor, batch: int = 1000) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The task's (prediction, confidence) of every anchor on ``x``."""
    out = {}
    for v in fam:
        v.eval()
        logits = torch.cat([v(x[k:k + batch]) for k in range(0, len(x), batch)])
        out[v.name] = task.predict(logits)
    return out


def cascade_curve(task, small: tuple, large: tuple, y: torch.Tensor, f_small: float, f_large: float,
                  thresholds) -> list[dict]:
    """Confidence routing (``cascade_outputs``): answer with the small anchor when its confidence >= t, else run the
    large one too (cost f_small + f_large). ``small``, ``large``: (prediction, confidence). One point per threshold:
    deferred share, average FLOPs, the task's metric (percent)."""
    pts = []
    for t in thresholds:
        pred, defer = cascade_outputs(small, large, float(t))
        frac = float(defer.double().mean())
        pts.append(dict(threshold=float(t), deferred=frac, flops=f_small + frac * f_large, acc=task.score(pred, y)))
    return pts


def _front_rows(evaluation: Path | None) -> list[dict]:
    """The configurations of an evaluation (``evaluation.json``, the evaluation stage's record), else none."""
    from klas.stages.s5_evaluation import EvaluationArtifact

    if evaluation is None or not Path(evaluation).is_file():
        return []
    if Path(evaluation).name != EvaluationArtifact.RECORD:
        raise KlasError(f"--evaluation {evaluation}: expected an evaluation stage's {EvaluationArtifact.RECORD}")
    return EvaluationArtifact.load(Path(evaluation).parent).configs


def cascades(run_dir: Path | str, out_dir: Path | str, test_samples: int | None = None, n_thresholds: int = 41,
             evaluation: Path | str | None = None, family=None, data_root=None, progress: bool = True) -> dict:
    """Two-anchor cascades for every ordered anchor pair on the test split, next to the stitched Pareto front of
    ``evaluation`` (an evaluation.json; default: the run's own, else the AUC study's KLAS arm, seed 0)."""
    ctx = context(run_dir, family, data_root, progress)
    fam, task = ctx.family, ctx.task
    test = ctx.split("test").subset(test_samples)
    t0 = time.time()
    x, y = test.normalize(test.images), test.labels
    outs = anchor_outputs(task, fam, x)
    flops = {v.name: float(v.flops) for v in fam}
    accs = {k: task.score(o[0], y) for k, o in outs.items()}
    f_min, f_max = min(flops.values()), max(flops.values())
    thr = np.linspace(0.0, 1.0, n_thresholds)
    curves = {}
    for k, a in enumerate(fam):
        for b in list(fam)[k + 1:]:
            pts = cascade_curve(task, outs[a.name], outs[b.name], y, flops[a.name], flops[b.name], thr)
            best_at = {}
            for anchor, fa in flops.items():  # best cascade accuracy within each anchor's cost
                ok = [p["acc"] for p in pts if p["flops"] <= fa]
                best_at[anchor] = max(ok) if ok else None
            curves[f"{a.name}->{b.name}"] = dict(points=pts, best_acc=max(p["acc"] for p in pts),
                                                 best_acc_within_anchor_flops=best_at,
                                                 auc=auc([p["flops"] for p in pts] + [flops[a.name]],
                                                         [p["acc"] for p in pts] + [accs[a.name]], f_min, f_max))
    run = ctx.run_dir.path
    if evaluation is None:
        cand = [run / "evaluation" / "evaluation.json",
                *sorted((run / "study" / "auc").glob("steps*_seed0/klas/evaluation/evaluation.json"))]
        evaluation = next((c for c in cand if c.is_file()), None)
    rows = _front_rows(evaluation)
    front = []
    if rows:
        mask = pareto_mask([r["flops"] for r in rows], [r["test_acc"] for r in rows])
        front = [dict(key=r["key"], flops=r["flops"], acc=r["test_acc"], anchor=r["anchor"])
                 for r, m in zip(rows, mask) if m]
    rec = dict(study="cascades", family=fam.name, n_test=len(test), metric=task.metric,
               anchors=dict(flops=flops, acc=accs), anchors_auc=auc(list(flops.values()), list(accs.values()), f_min,
                                                                     f_max), curves=curves,
               stitched_front=dict(source=str(evaluation) if rows else None, points=front,
                                   note="stitched Pareto front evaluated on its own test subset" if rows else
                                   "no evaluation.json found: run `klas study auc` first or pass --evaluation"))
    return publish(rec, t0, out_dir, "cascades", fam.name, plot_cascades)


def plot_cascades(rec: dict, path: Path) -> None:
    plt = common_plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, c in rec["curves"].items():
        pts = sorted(c["points"], key=lambda p: p["flops"])
        ax.plot([p["flops"] / 1e6 for p in pts], [p["acc"] for p in pts], marker=".", ms=3, lw=1,
                label=f"cascade {name}")
    fl, ac = rec["anchors"]["flops"], rec["anchors"]["acc"]
    ax.scatter([fl[k] / 1e6 for k in fl], [ac[k] for k in fl], marker="*", s=120, c="k", zorder=5, label="anchors")
    front = sorted(rec["stitched_front"]["points"], key=lambda p: p["flops"])
    if front:
        ax.step([p["flops"] / 1e6 for p in front], [p["acc"] for p in front], where="post", c="r", lw=1.5,
                label="stitched Pareto front (finetuned)")
        ax.scatter([p["flops"] / 1e6 for p in front if not p["anchor"]],
                   [p["acc"] for p in front if not p["anchor"]], c="r", s=20, zorder=6)
    ax.set_xlabel("average MFLOPs per image")
    ax.set_ylabel(f"test {rec.get('metric', 'top-1 accuracy')} (%)")
    ax.set_title(f"{rec['family']}: confidence cascades vs stitching ({rec['n_test']} test images)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    write_fig(fig, path, 110)
