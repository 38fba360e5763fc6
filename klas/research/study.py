"""The reproduction study (``klas study``): does the KLAS paper's evidence hold on this family, and at what cost?

Sub-studies, each writing ``study_<name>_<family>.json`` and a PNG into ``out_dir`` (default benchmarks/results):

- ``metric-outcome`` (paper Tab. 9-10, Tab. 1): a sample of stitch configurations spanning the (i, j) grid of one
  anchor pair gets the same short *stitch-level* finetune (least-squares init, then Adam on the stitch layer only,
  anchors frozen); its top-1 drop from the target anchor is correlated with every metric (stitch score, raw KL, MSE,
  CE, CKA, DM, fitted TLM / FuLA), raw and FLOPs-controlled, with bootstrap CIs; plus the recovery rate of viable
  configurations by each metric.
- ``sensitivity``: selection size, target-block coverage and overlap with the default selection over tau, bucket
  count and score form (selection only, cheap).
- ``auc`` (Tab. 2): ``klas.research.compare`` of KLAS vs SN-Net vs Min-KL at equal budget over several seeds, mean +- spread.
- ``gain``: what stitching adds over the anchors' staircase, per method, and over a small sweep of budgets.
- ``cascades`` (App. E): small -> large anchor with max-softmax routing, thresholds swept, average FLOPs vs accuracy.

Everything is seeded and resumable at the granularity of one finetuned supernetwork (``auc`` / ``gain``) or is cheap.
"""
from __future__ import annotations

import math
import os
import platform
import sys
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import scipy.stats
import torch
from scipy.stats import rankdata
from tqdm import tqdm

from klas.errors import KlasError
from klas.io import load_json, save_json
from klas.rundir import RunDir

SUBSTUDIES = ("metric-outcome", "sensitivity", "auc", "gain", "cascades")
RAW_METRICS = ("score", "kl", "mse", "ce", "cka", "dm")
FITTED = ("tlm", "fula")


# ------------------------------------------------------------------------------------------------------ statistics
def _statistic(test, x: np.ndarray, y: np.ndarray) -> float:
    """``scipy.stats`` correlation ``test(x, y).statistic`` as a float, NaN where it is undefined (fewer than two
    points, or a constant side -- common among bootstrap resamples), without scipy's warning for that case."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.stats.NearConstantInputWarning)
        return float(test(x, y).statistic)


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson r (``scipy.stats.pearsonr``); NaN when either side is constant (no correlation is defined)."""
    return _statistic(scipy.stats.pearsonr, x, y)


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rho (``scipy.stats.spearmanr``: Pearson r of the average ranks); NaN when either side is constant."""
    return _statistic(scipy.stats.spearmanr, x, y)


def residualize(v: np.ndarray, z: np.ndarray) -> np.ndarray:
    """v minus its least-squares affine fit on z: what z does not explain."""
    a = np.stack([np.ones(len(z)), np.asarray(z, np.float64)], 1)
    coef, *_ = np.linalg.lstsq(a, np.asarray(v, np.float64), rcond=None)
    return v - a @ coef


def partial_pearson(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> float:
    """Correlation of x and y once the (affine) effect of z -- here FLOPs -- is removed from both."""
    return pearson(residualize(np.asarray(x, np.float64), z), residualize(np.asarray(y, np.float64), z))


def partial_spearman(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> float:
    return partial_pearson(rankdata(x), rankdata(y), rankdata(z))


def flops_buckets(flops: np.ndarray, n: int) -> np.ndarray:
    """Equal-count bucket id of every configuration by FLOPs rank (ties by order), ``n`` buckets."""
    order = np.argsort(np.asarray(flops), kind="mergesort")
    ids = np.empty(len(order), dtype=np.int64)
    ids[order] = (np.arange(len(order)) * n) // max(len(order), 1)
    return ids


def bucket_spearman(x: np.ndarray, y: np.ndarray, buckets: np.ndarray) -> float:
    """Pooled within-bucket Spearman: ranks taken inside each FLOPs bucket, centered per bucket, then one Pearson over
    all -- a ranking's quality among configurations of similar cost, buckets of one member contribute nothing."""
    rx, ry = np.zeros(len(x)), np.zeros(len(y))
    for b in np.unique(buckets):
        m = buckets == b
        if m.sum() < 2:
            continue
        rx[m], ry[m] = (r - r.mean() for r in (rankdata(x[m]), rankdata(y[m])))
    return pearson(rx, ry)


def correlations(metric: np.ndarray, drop: np.ndarray, flops: np.ndarray, n_buckets: int) -> dict:
    b = flops_buckets(flops, n_buckets)
    return dict(pearson=pearson(metric, drop), spearman=spearman(metric, drop),
                partial_pearson=partial_pearson(metric, drop, flops),
                partial_spearman=partial_spearman(metric, drop, flops),
                bucket_spearman=bucket_spearman(metric, drop, b))


def bootstrap_ci(metric: np.ndarray, drop: np.ndarray, flops: np.ndarray, n_buckets: int, n_boot: int = 1000,
                 seed: int = 0, level: float = 0.95) -> dict:
    """Percentile bootstrap interval of every statistic of ``correlations``: ``n_boot`` resamples of the
    configurations with replacement (``numpy.random.default_rng(seed).integers(0, n, n)`` each), the statistics of
    each from ``scipy.stats``, linear-interpolated quantiles. A resample where a statistic is undefined (a constant
    side) is left out of that statistic's interval, and a statistic never defined has none -- where
    ``scipy.stats.bootstrap`` would make the whole interval NaN."""
    rng = np.random.default_rng(seed)
    n = len(drop)
    draws: dict[str, list[float]] = {}
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        for k, v in correlations(metric[idx], drop[idx], flops[idx], n_buckets).items():
            draws.setdefault(k, []).append(v)
    out = {}
    for k, v in draws.items():
        v = np.asarray(v)
        v = v[np.isfinite(v)]
        if len(v):
            out[k] = [float(q) for q in np.quantile(v, [(1 - level) / 2, 1 - (1 - level) / 2])]
    return out


def recovery(metric: np.ndarray, viable: np.ndarray, flops: np.ndarray, n_buckets: int) -> dict:
    """How well a metric recovers the viable configurations (low = promising for every metric):

    ``top_k``: share of the k = #viable lowest-metric configurations that are viable (precision = recall at k);
    ``per_bucket``: share of FLOPs buckets holding a viable configuration where the metric's best one is viable --
    the paper's bucketed selection in miniature."""
    k = int(viable.sum())
    top = np.argsort(metric, kind="mergesort")[:k]
    b = flops_buckets(flops, n_buckets)
    hit = tot = 0
    for bk in np.unique(b):
        m = np.where(b == bk)[0]
        if viable[m].any():
            tot += 1
            hit += int(viable[m[np.argmin(metric[m])]])
    return dict(n_viable=k, top_k=float(viable[top].mean()) if k else None, per_bucket=hit / tot if tot else None)


# ------------------------------------------------------------------------------------------------------- helpers
def machine() -> dict:
    return dict(platform=platform.platform(), processor=platform.processor() or platform.machine(),
                cores=os.cpu_count(), torch=torch.__version__, threads=torch.get_num_threads())


def _family(run: RunDir, family=None):
    from klas.families import Family, create_family

    return family if isinstance(family, Family) else create_family(run.family, pretrained=True)


def _publish(rec: dict, t0: float, out_dir: Path, name: str, family: str, plot) -> dict:
    """Stamp a sub-study's record with its wall time (since ``t0``) and machine, write it to
    ``out_dir/study_<name>_<family>.json`` and its figure ``plot(rec, path)`` beside it (.png); returns the record."""
    rec.update(wall_s=round(time.time() - t0, 2), machine=machine())
    path = Path(out_dir) / f"study_{name}_{family}.json"
    save_json(rec, path)
    plot(rec, path.with_suffix(".png"))
    return rec


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _write_fig(fig, path: Path, dpi: int) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    _plt().close(fig)


@torch.no_grad()
def _accuracy(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    net.eval()
    hits = sum(int((net(x[k:k + batch]).argmax(-1) == y[k:k + batch]).sum()) for k in range(0, len(y), batch))
    return 100.0 * hits / max(len(y), 1)


# -------------------------------------------------------------------------------------------- metric vs outcome
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


def _default_pair(run: RunDir, family) -> tuple[str, str]:
    sel = run.path / "selection" / "selection.json"
    if sel.is_file():
        return tuple(load_json(sel)["anchor_pairs"][0])
    return family[0].name, family[1].name


def metric_outcome(run_dir: Path | str, out_dir: Path | str, cfg: OutcomeCfg = OutcomeCfg(),
                   pair: tuple[str, str] | None = None, family=None, data_root=None, progress: bool = True) -> dict:
    """Sample configurations of one anchor pair, finetune each stitch briefly, correlate metrics with the drop."""
    from klas.data import load_dataset
    from klas.research.metrics import REFERENCE_FIT, REFERENCE_VAL_SAMPLES, FittedScorer
    from klas.stages.s2_scores import load_scores
    from klas.stages.s3_selection import candidate_table, sample_configs
    from klas.stitch import FitCfg, StitchedNet, fit_stitch

    run = RunDir(run_dir)
    fam = _family(run, family)
    a, b = pair or _default_pair(run, fam)
    _, tensors, mt = load_scores(run.path)
    if f"D/{a}/{b}" not in tensors:
        raise KlasError(f"--pair {a}:{b}: no scores for this anchor pair in {run.path / 'scores'}")
    table = candidate_table(fam, a, b, tensors[f"D/{a}/{b}"].double(), tensors[f"cap/{b}"].double(),
                            tensors[f"S/{a}/{b}"].double())
    picks = [r for _, r in sample_configs([table], cfg.n_configs, cfg.seed)]
    if len(picks) < 3:
        raise KlasError(f"anchor pair {a}->{b}: {len(picks)} in-range configurations; need at least 3")
    train = load_dataset(fam.cfg.dataset, "train", data_root)
    test = load_dataset(fam.cfg.dataset, "test", data_root).subset(cfg.test_samples)
    xt, yt = test.normalize(test.images), test.labels
    src, tgt = fam[a], fam[b]
    acc_tgt = _accuracy(tgt, xt, yt)
    fit = FitCfg(method="task", samples=cfg.fit_samples, batch_size=cfg.batch_size, steps=cfg.steps, lr=cfg.lr,
                 seed=cfg.seed)
    rows = []
    t0 = time.time()
    for r in tqdm(picks, desc=f"[study] finetune {a}->{b} stitches", disable=not progress, file=sys.stdout,
                  mininterval=2):
        i, j = table["i"][r], table["j"][r]
        ls_layer, _ = fit_stitch(src, i, tgt, j, train, replace(fit, method="ls"))
        acc_ls = _accuracy(StitchedNet(src, i, tgt, j, ls_layer), xt, yt)
        layer, stats = fit_stitch(src, i, tgt, j, train, fit)
        acc = _accuracy(StitchedNet(src, i, tgt, j, layer), xt, yt)
        row = dict(i=i, j=j, flops=table["flops"][r], acc_ls=acc_ls, acc=acc, drop=acc_tgt - acc,
                   score=table["score"][r], kl=table["D"][r])
        for m in ("mse", "ce", "cka", "dm"):
            key = f"{m}/{a}/{b}"
            row[m] = float(mt[key][i, j]) if key in mt else None
        rows.append(row)
    finetune_wall = time.time() - t0
    cost = dict(finetune_per_config_s=finetune_wall / len(rows))
    metrics = [m for m in RAW_METRICS if all(r[m] is not None and math.isfinite(r[m]) for r in rows)]
    if cfg.fitted_metrics:
        fc = replace(REFERENCE_FIT, seed=cfg.seed)
        tr = train.subset(fc.samples)
        val = load_dataset(fam.cfg.dataset, "val", data_root).subset(REFERENCE_VAL_SAMPLES)
        scorer = FittedScorer([src, tgt], tr.normalize(tr.images), tr.labels, val.normalize(val.images), val.labels,
                              fc)
        try:
            for m in FITTED:
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
    return _publish(rec, t0, out_dir, "metric_outcome", fam.name, plot_metric_outcome)


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
    plt = _plt()
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
    _write_fig(fig, path, 100)


# ---------------------------------------------------------------------------------------------------- sensitivity
TAUS = (0.01, 0.02, 0.03, 0.05, 0.075, 0.1)
BUCKETS = (0, 4, 8, 16, 32)  # 0: the automatic count


def _selection_set(tables: list[dict], tau: float, n: int | None, max_buckets: int = 500) -> tuple[set, dict]:
    from klas.stages.s3_selection import assign_buckets, auto_num_buckets, bucket_select, coverage

    n_used = n or auto_num_buckets(tables, tau, max_buckets)[0]
    chosen, can_all, got_all = set(), 0, 0
    for t in tables:
        bk = assign_buckets(t["flops"], t["lo"], t["hi"], n_used)
        ch = bucket_select(t["score"], bk, tau)
        can, got = coverage(t, bk, ch)
        can_all, got_all = can_all + len(can), got_all + len(can & got)
        chosen |= {(t["source"], i, t["target"], j) for i, j, c in zip(t["i"], t["j"], ch) if c}
    return chosen, dict(num_buckets=n_used, coverage=got_all / can_all if can_all else None)


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def sensitivity(run_dir: Path | str, out_dir: Path | str, taus=TAUS, buckets=BUCKETS, family=None,
                progress: bool = True) -> dict:
    """Selection count, coverage and Jaccard overlap with the default (the stage defaults: tau, automatic buckets,
    score form) over tau x bucket count and over score forms; reads the run's scores, writes nothing into the run."""
    from klas.stages.s2_scores import SCORE_FORMS, ScoresConfig, load_scores, stitch_score
    from klas.stages.s3_selection import SelectionConfig, candidate_table, choose_anchor_pairs

    run = RunDir(run_dir)
    fam = _family(run, family)
    rec_s, tensors, _ = load_scores(run.path)
    tau0, form0 = SelectionConfig().tau, ScoresConfig().score_form
    names = [v.name for v in fam]
    pairs = choose_anchor_pairs(names, tensors["anchor_kl"], "klas")

    def tables(form: str) -> list[dict]:
        return [candidate_table(fam, a, b, tensors[f"D/{a}/{b}"].double(), tensors[f"cap/{b}"].double(),
                                stitch_score(tensors[f"D/{a}/{b}"].double(), tensors[f"cap/{b}"].double(), form,
                                             rec_s.lam))
                for a, b in pairs]

    t0 = time.time()
    base_tables = tables(form0)
    ref, _ = _selection_set(base_tables, tau0, None)
    grid = []
    for n in tqdm(buckets, desc="[study] sensitivity", disable=not progress, file=sys.stdout):
        for tau in taus:
            s, info = _selection_set(base_tables, tau, n or None)
            grid.append(dict(tau=tau, buckets="auto" if not n else n, num_buckets=info["num_buckets"], count=len(s),
                             coverage=info["coverage"], overlap=jaccard(s, ref)))
    forms = []
    for form in SCORE_FORMS:
        s, info = _selection_set(tables(form), tau0, None)
        forms.append(dict(form=form, count=len(s), coverage=info["coverage"], num_buckets=info["num_buckets"],
                          overlap=jaccard(s, ref)))
    rec = dict(study="sensitivity", family=fam.name, anchor_pairs=[list(p) for p in pairs], default_count=len(ref),
               default_tau=tau0, grid=grid, forms=forms)
    return _publish(rec, t0, out_dir, "sensitivity", fam.name, plot_sensitivity)


def plot_sensitivity(rec: dict, path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for bk in dict.fromkeys(g["buckets"] for g in rec["grid"]):
        g = [x for x in rec["grid"] if x["buckets"] == bk]
        for ax, key in zip(axes, ("count", "coverage", "overlap")):
            ax.plot([x["tau"] for x in g], [x[key] for x in g], marker="o", ms=3, label=f"buckets={bk}")
    for ax, key in zip(axes, ("selected configurations", "target-block coverage", "Jaccard vs default")):
        ax.set_xlabel("tau")
        ax.set_title(key, fontsize=9)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{rec['family']}: selection sensitivity (default tau {rec.get('default_tau', 0.05)}, auto buckets: "
                 f"{rec['default_count']} "
                 f"configs); forms: " + ", ".join(f"{f['form']} {f['count']} (J={f['overlap']:.2f})"
                                                  for f in rec["forms"]), fontsize=9)
    _write_fig(fig, path, 100)


# -------------------------------------------------------------------------------------------------------- cascades
@torch.no_grad()
def anchor_logits(fam, x: torch.Tensor, batch: int = 1000) -> dict[str, torch.Tensor]:
    out = {}
    for v in fam:
        v.eval()
        out[v.name] = torch.cat([v(x[k:k + batch]) for k in range(0, len(x), batch)]).double()
    return out


def cascade_curve(p_small: torch.Tensor, p_large: torch.Tensor, y: torch.Tensor, f_small: float, f_large: float,
                  thresholds) -> list[dict]:
    """Max-softmax routing: answer with the small anchor when its top probability >= t, else run the large one too
    (cost f_small + f_large). Returns one point per threshold: deferred share, average FLOPs, accuracy (percent)."""
    conf, pred_s = p_small.max(-1)
    pred_l = p_large.argmax(-1)
    pts = []
    for t in thresholds:
        defer = conf < t
        pred = torch.where(defer, pred_l, pred_s)
        frac = float(defer.double().mean())
        pts.append(dict(threshold=float(t), deferred=frac, flops=f_small + frac * f_large,
                        acc=100.0 * float((pred == y).double().mean())))
    return pts


def _stitched_rows(path: Path | None) -> list[dict]:
    return load_json(path)["configs"] if path is not None and Path(path).is_file() else []


def cascades(run_dir: Path | str, out_dir: Path | str, test_samples: int | None = None, n_thresholds: int = 41,
             evaluation: Path | str | None = None, family=None, data_root=None, progress: bool = True) -> dict:
    """Two-anchor cascades for every ordered anchor pair on the test split, next to the stitched Pareto front of
    ``evaluation`` (an evaluation.json; default: the run's own, else the AUC study's KLAS arm, seed 0)."""
    from klas.data import load_dataset
    from klas.metrics import auc, pareto_mask

    run = RunDir(run_dir)
    fam = _family(run, family)
    test = load_dataset(fam.cfg.dataset, "test", data_root).subset(test_samples)
    t0 = time.time()
    x, y = test.normalize(test.images), test.labels
    probs = {k: torch.softmax(v, -1) for k, v in anchor_logits(fam, x).items()}
    flops = {v.name: float(v.flops) for v in fam}
    accs = {k: 100.0 * float((p.argmax(-1) == y).double().mean()) for k, p in probs.items()}
    f_min, f_max = min(flops.values()), max(flops.values())
    thr = np.linspace(0.0, 1.0, n_thresholds)
    curves = {}
    for k, a in enumerate(fam):
        for b in list(fam)[k + 1:]:
            pts = cascade_curve(probs[a.name], probs[b.name], y, flops[a.name], flops[b.name], thr)
            best_at = {}
            for anchor, fa in flops.items():  # best cascade accuracy within each anchor's cost
                ok = [p["acc"] for p in pts if p["flops"] <= fa]
                best_at[anchor] = max(ok) if ok else None
            curves[f"{a.name}->{b.name}"] = dict(points=pts, best_acc=max(p["acc"] for p in pts),
                                                 best_acc_within_anchor_flops=best_at,
                                                 auc=auc([p["flops"] for p in pts] + [flops[a.name]],
                                                         [p["acc"] for p in pts] + [accs[a.name]], f_min, f_max))
    if evaluation is None:
        cand = [run.path / "evaluation" / "evaluation.json",
                *sorted((run.path / "study" / "auc").glob("steps*_seed0/klas/evaluation/evaluation.json"))]
        evaluation = next((c for c in cand if c.is_file()), None)
    rows = _stitched_rows(evaluation)
    front = []
    if rows:
        mask = pareto_mask([r["flops"] for r in rows], [r["test_acc"] for r in rows])
        front = [dict(key=r["key"], flops=r["flops"], acc=r["test_acc"], anchor=r["anchor"])
                 for r, m in zip(rows, mask) if m]
    rec = dict(study="cascades", family=fam.name, n_test=len(test), anchors=dict(flops=flops, acc=accs),
               anchors_auc=auc(list(flops.values()), list(accs.values()), f_min, f_max), curves=curves,
               stitched_front=dict(source=str(evaluation) if rows else None, points=front,
                                   note="stitched Pareto front evaluated on its own test subset" if rows else
                                   "no evaluation.json found: run `klas study auc` first or pass --evaluation"))
    return _publish(rec, t0, out_dir, "cascades", fam.name, plot_cascades)


def plot_cascades(rec: dict, path: Path) -> None:
    plt = _plt()
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
    ax.set_ylabel("top-1 test accuracy (%)")
    ax.set_title(f"{rec['family']}: max-softmax cascades vs stitching ({rec['n_test']} test images)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _write_fig(fig, path, 110)


# ------------------------------------------------------------------------------------------------ AUC and gain
AUC_METHODS = ("klas", "snnet-paired", "min-kl")


@dataclass(frozen=True)
class AucCfg:
    """Equal budget for every arm: ``steps`` supernetwork steps of batch ``batch_size``, ``n_stitches`` stitched
    configurations each, accuracy on the first ``test_samples`` test images."""

    steps: int = 300
    batch_size: int = 128
    n_stitches: int = 8
    test_samples: int | None = 2000
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = AUC_METHODS
    val_samples: int = 1000
    init_samples: int = 1024


def _compare_once(run: RunDir, out: Path, methods, steps: int, seed: int, cfg: AucCfg, family, data_root,
                  progress: bool) -> dict:
    """One ``klas.research.compare`` at (steps, seed), skipped when its compare.json exists for the same budget and arms."""
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
    ev = EvaluationConfig(test_subset=cfg.test_samples, latency=False)
    return compare(out, arms, ft, ev, seed=seed, family=family, data_root=data_root, n_stitches=cfg.n_stitches,
                   before=False, progress=progress)


def stitching_gain(rows: list[dict]) -> dict:
    """What the stitched configurations add over the anchors' staircase (the same evaluation's anchors): stitched
    points on the Pareto front, and the largest accuracy gain of a stitched model over the best anchor within its
    FLOPs (negative when none beats it)."""
    from klas.metrics import auc, pareto_mask

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
    from klas.research.compare import _slug

    return load_json(out / _slug(label) / "evaluation" / "evaluation.json")["configs"]


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
    return _publish(rec, t0, out_dir, "auc", run.family, plot_auc)


def plot_auc(rec: dict, path: Path) -> None:
    plt = _plt()
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
    _write_fig(fig, path, 110)


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
    return _publish(rec, t0, out_dir, "gain", run.family, plot_gain)


def plot_gain(rec: dict, path: Path) -> None:
    plt = _plt()
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
    _write_fig(fig, path, 110)
