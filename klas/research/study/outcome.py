"""``metric-outcome`` (paper Tab. 9-10, Tab. 1): a sample of stitch configurations spanning the (i, j) grid of one
anchor pair gets the same short *stitch-level* finetune (least-squares init, then Adam on the stitch layer only,
anchors frozen); its drop in the task's metric from the target anchor is correlated with every metric (stitch score,
raw KL, the baseline tables, fitted TLM / FuLA), raw and FLOPs-controlled, with bootstrap CIs; plus the recovery
rate of viable configurations by each metric."""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from klas.errors import KlasError
from klas.research.study.common import context, publish, scores, task_score, write_fig
from klas.research.study.common import plt as common_plt
from klas.research.metrics import FEATURE_METRICS, FITTED_METRICS, REFERENCE_FIT, fitted_scorer
from klas.research.study.stats import bootstrap_ci, correlations, flops_buckets, recovery

RAW_METRICS = ("score", "kl") + FEATURE_METRICS  # read from the scores stage: stitch score, raw KL, baseline tables


@dataclass(frozen=True)
class OutcomeCfg:
    """Budget of the metric-vs-outcome study: ``n_configs`` sampled configurations of one anchor pair, each given a
    least-squares stitch on ``fit_samples`` train images then ``steps`` Adam steps (batch ``batch_size``) on the task
    loss of the stitch layer only; accuracy on the first ``test_samples`` test images."""

    n_configs: int = 24
    steps: int = 60
    batch_size: int = 64
    lr: float = 1e-3
    fit_samples: int = 1024
    test_samples: int = 2000
    fitted_metrics: bool = True
    n_buckets: int = 4
    viable_drop: float = 3.0
    n_boot: int = 1000
    seed: int = 0


def _default_pair(ctx, family) -> tuple[str, str]:
    """The run's first selected anchor pair, else the family's two cheapest anchors."""
    from klas.stages.s3_selection import SelectionArtifact

    if (ctx.folder_of(SelectionArtifact) / SelectionArtifact.RECORD).is_file():
        return tuple(ctx.upstream(SelectionArtifact).anchor_pairs[0])
    return family[0].name, family[1].name


def metric_outcome(run_dir: Path | str, out_dir: Path | str, cfg: OutcomeCfg = OutcomeCfg(),
                   pair: tuple[str, str] | None = None, family=None, data_root=None, progress: bool = True) -> dict:
    """Sample configurations of one anchor pair, finetune each stitch briefly, correlate metrics with the drop."""
    from klas.stages.s3_selection import candidate_table, sample_configs
    from klas.stitch import FitCfg, StitchedNet, fit_stitch

    ctx = context(run_dir, family, data_root, progress)
    fam, task = ctx.family, ctx.task
    a, b = pair or _default_pair(ctx, fam)
    _, tensors, mt = scores(ctx)
    if f"D/{a}/{b}" not in tensors:
        raise KlasError(f"--pair {a}:{b}: no scores for this anchor pair in {ctx.run_dir.path / 'scores'}")
    table = candidate_table(fam, a, b, tensors[f"D/{a}/{b}"].double(), tensors[f"cap/{b}"].double(),
                            tensors[f"S/{a}/{b}"].double())
    picks = [r for _, r in sample_configs([table], cfg.n_configs, cfg.seed)]
    if len(picks) < 3:
        raise KlasError(f"anchor pair {a}->{b}: {len(picks)} in-range configurations; need at least 3")
    train = ctx.split("train")
    test = ctx.split("test").subset(cfg.test_samples)
    xt, yt = test.normalize(test.images), test.labels
    src, tgt = fam[a], fam[b]
    acc_tgt = task_score(task, tgt, xt, yt)
    fit = FitCfg(method="task", samples=cfg.fit_samples, batch_size=cfg.batch_size, steps=cfg.steps, lr=cfg.lr,
                 seed=cfg.seed)
    rows = []
    t0 = time.time()
    for r in tqdm(picks, desc=f"[study] finetune {a}->{b} stitches", disable=not progress, file=sys.stdout,
                  mininterval=2):
        i, j = table["i"][r], table["j"][r]
        ls_layer, _ = fit_stitch(src, i, tgt, j, train, replace(fit, method="ls"))
        acc_ls = task_score(task, StitchedNet(src, i, tgt, j, ls_layer), xt, yt)
        layer, _ = fit_stitch(src, i, tgt, j, train, fit)
        acc = task_score(task, StitchedNet(src, i, tgt, j, layer), xt, yt)
        row = dict(i=i, j=j, flops=table["flops"][r], acc_ls=acc_ls, acc=acc, drop=acc_tgt - acc,
                   score=table["score"][r], kl=table["D"][r])
        for m in FEATURE_METRICS:
            key = f"{m}/{a}/{b}"
            row[m] = float(mt[key][i, j]) if key in mt else None
        rows.append(row)
    finetune_wall = time.time() - t0
    cost = dict(finetune_per_config_s=finetune_wall / len(rows))
    metrics = [m for m in RAW_METRICS if all(r[m] is not None and math.isfinite(r[m]) for r in rows)]
    if cfg.fitted_metrics:
        scorer = fitted_scorer([src, tgt], train, ctx.split("val"), replace(REFERENCE_FIT, seed=cfg.seed))
        try:
            for m in FITTED_METRICS:
                t1 = time.time()
                vals = scorer.score_all(m, [(a, r["i"], b, r["j"]) for r in rows], progress)
                cost[f"{m}_per_config_s"] = (time.time() - t1) / len(rows)
                for r, v in zip(rows, vals):
                    r[m] = v
                metrics.append(m)
        finally:
            scorer.close()
    stats, viable = outcome_stats(rows, metrics, cfg)
    rec = dict(study="metric-outcome", family=fam.name, pair=[a, b], target_acc=acc_tgt, cfg=cfg.__dict__,
               outcome=("stitch-level finetune: least-squares init on fit_samples train images, then `steps` Adam "
                        "steps of task loss (cross-entropy) on the stitch layer only, anchors frozen; drop = target "
                        "anchor top-1 minus stitched top-1 (points) on the first test_samples test images"),
               viable=viable, metrics=metrics, stats=stats, cost_s=cost, configs=rows)
    return publish(rec, t0, out_dir, "metric_outcome", fam.name, plot_metric_outcome)


def viable_sets(drop: np.ndarray, flops: np.ndarray, cfg: OutcomeCfg) -> dict[str, np.ndarray]:
    """Which sampled configurations count as viable. ``abs<=X``: drop at most X points (the paper's sense, which a
    stitch-only finetune may leave empty); ``bucket+X``: within X points of the best configuration of its FLOPs
    bucket -- what a selection restricted to that cost could at best have found."""
    b = flops_buckets(flops, cfg.n_buckets)
    best = np.array([drop[b == k].min() for k in b])
    out = {f"abs<={t:g}": drop <= t for t in sorted({1.0, 2.0, cfg.viable_drop, 5.0})}
    out[f"bucket+{cfg.viable_drop:g}"] = drop <= best + cfg.viable_drop
    return out


def outcome_stats(rows: list[dict], metrics: list[str], cfg: OutcomeCfg) -> tuple[dict, dict]:
    """Correlations (raw and FLOPs-controlled) with bootstrap CIs and recovery rates of every metric."""
    drop = np.array([r["drop"] for r in rows], dtype=np.float64)
    flops = np.array([r["flops"] for r in rows], dtype=np.float64)
    viable = viable_sets(drop, flops, cfg)
    stats = {}
    for m in metrics:
        v = np.array([r[m] for r in rows], dtype=np.float64)
        stats[m] = dict(**correlations(v, drop, flops, cfg.n_buckets),
                        ci95=bootstrap_ci(v, drop, flops, cfg.n_buckets, cfg.n_boot, cfg.seed),
                        recovery={k: recovery(v, ok, flops, cfg.n_buckets) for k, ok in viable.items()})
    return stats, {k: int(ok.sum()) for k, ok in viable.items()}


def plot_metric_outcome(rec: dict, path: Path) -> None:
    plt = common_plt()
    ms = rec["metrics"]
    ncol = 5
    nrow = -(-(len(ms) + 1) // ncol)
    fig, grid = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 3.0 * nrow), squeeze=False)
    axes = list(grid.flat)
    for ax in axes[len(ms) + 1:]:
        ax.axis("off")
    drop = [r["drop"] for r in rec["configs"]]
    fl = [r["flops"] / 1e6 for r in rec["configs"]]
    for ax, m in zip(axes, ms):
        sc = ax.scatter([r[m] for r in rec["configs"]], drop, c=fl, s=14, cmap="viridis")
        st = rec["stats"][m]
        ax.set_title(f"{m}: rho={st['spearman']:.2f}\npartial={st['partial_spearman']:.2f}", fontsize=8)
        ax.set_xlabel(m, fontsize=8)
        ax.tick_params(labelsize=7)
    for row in grid:
        row[0].set_ylabel("top-1 drop (points)")
    ax = axes[len(ms)]
    keys = ("spearman", "partial_spearman", "bucket_spearman")
    for k, key in enumerate(keys):
        vals = [rec["stats"][m][key] for m in ms]
        ci = [rec["stats"][m]["ci95"].get(key, [v, v]) for m, v in zip(ms, vals)]
        err = np.array([[v - c[0] for v, c in zip(vals, ci)], [c[1] - v for v, c in zip(vals, ci)]]).clip(0)
        ax.bar(np.arange(len(ms)) + (k - 1) * 0.27, vals, 0.27, yerr=err, label=key, capsize=1.5)
    ax.set_xticks(range(len(ms)), ms, rotation=60, fontsize=7)
    ax.axhline(0, color="k", lw=0.5)
    ax.legend(fontsize=6)
    ax.set_title("correlation with drop (95% CI)", fontsize=8)
    fig.colorbar(sc, ax=axes[len(ms) - 1], label="MFLOPs")
    fig.suptitle(f"{rec['family']} {rec['pair'][0]} -> {rec['pair'][1]}: {len(drop)} stitches, "
                 f"{rec['cfg']['steps']} stitch-layer steps each", fontsize=9)
    write_fig(fig, path, 100)
