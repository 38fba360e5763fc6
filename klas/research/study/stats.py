"""The study's statistics: rank and linear correlations (raw and FLOPs-controlled), their percentile bootstrap
intervals, and how well a metric recovers the viable configurations. numpy / scipy only."""
from __future__ import annotations

import math
import warnings

import numpy as np
import scipy.stats
from scipy.stats import rankdata


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
