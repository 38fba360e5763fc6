"""The reproduction study: its statistics against independent float64 references on random data, and a tiny run of
every sub-study (2 random-weight anchors, a handful of configurations, a few steps) so that no path can rot."""
import math
import warnings

import numpy as np
import pytest
import torch

import klas
from _stitch_helpers import probes as run_probes
from _stitch_helpers import scores as run_scores
from klas.io import load_json
from klas.research.context import run_context
from klas.research.study import auc as st_auc
from klas.research.study import cascades as st_cascades
from klas.research.study import outcome as st_outcome
from klas.research.study import sensitivity as st_sensitivity
from klas.research.study import stats as st
from klas.stages import s3_selection
from klas.stages.s1_probes import ProbesConfig
from klas.stages.s2_scores import ScoresConfig
from klas.stages.s3_selection import SelectionConfig
from klas.tasks import get_task


def _rng():
    return np.random.default_rng(int(torch.randint(0, 2**31 - 1, ()).item()))


# ------------------------------------------------------------------------------------------------- statistics
def _ref_rank(x):
    """Average rank by counting (O(n^2)): rank = #smaller + (#equal + 1) / 2."""
    return np.array([np.sum(x < v) + (np.sum(x == v) + 1) / 2.0 for v in x])


def _ref_pearson(x, y):
    """Pearson r from its definition in float64 (sum of centred products over the product of centred norms)."""
    xc, yc = np.asarray(x, np.float64) - np.mean(x), np.asarray(y, np.float64) - np.mean(y)
    return float((xc * yc).sum() / math.sqrt((xc * xc).sum() * (yc * yc).sum()))


@pytest.mark.parametrize("n", [2, 7, 33, 250])
@pytest.mark.parametrize("scale", [1e-9, 1.0, 1e9])
def test_ranks_and_correlations_match_references(n, scale):
    rng = _rng()
    x = rng.normal(size=n) * scale
    y = (x + rng.normal(size=n) * scale * 0.7)
    x[: n // 3] = x[0]  # ties
    assert np.array_equal(st.rankdata(x), _ref_rank(x))
    assert st.pearson(x, y) == pytest.approx(_ref_pearson(x, y), abs=1e-9)
    assert st.spearman(x, y) == pytest.approx(_ref_pearson(_ref_rank(x), _ref_rank(y)), abs=1e-9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # undefined is NaN, silently: bootstrap resamples hit it all the time
        for c in (np.full(n, 3.0), np.full(n, 0.1)):
            assert math.isnan(st.pearson(c, y)) and math.isnan(st.spearman(y, c))
        assert math.isnan(st.pearson(x[:1], y[:1]))


@pytest.mark.parametrize("n", [5, 40, 301])
def test_partial_correlation_matches_the_three_correlation_formula(n):
    rng = _rng()
    z = rng.uniform(1e6, 2e7, n)
    x = z * 1e-7 + rng.normal(size=n)
    y = z * 3e-7 + rng.normal(size=n) + 0.5 * x
    rxy, rxz, ryz = (np.corrcoef(a, b)[0, 1] for a, b in ((x, y), (x, z), (y, z)))
    ref = (rxy - rxz * ryz) / math.sqrt((1 - rxz ** 2) * (1 - ryz ** 2))
    assert st.partial_pearson(x, y, z) == pytest.approx(ref, abs=1e-8)


def test_within_bucket_spearman_sees_what_the_raw_one_cannot():
    """Within each cost bucket y rises with x, across buckets it falls: raw Spearman < 0, within-bucket = 1."""
    rng = _rng()
    flops = np.repeat([1.0, 2.0, 3.0, 4.0], 6) + rng.uniform(0, 0.1, 24)
    b = st.flops_buckets(flops, 4)
    assert sorted(np.bincount(b).tolist()) == [6, 6, 6, 6]
    x = rng.permutation(24).astype(float)
    y = np.empty(24)
    for k in range(4):
        m = b == k
        y[m] = -10.0 * k + st.rankdata(x[m]) * 0.01
    assert st.spearman(x + 100 * b, y) < 0
    assert st.bucket_spearman(x, y, b) == pytest.approx(1.0)
    assert st.bucket_spearman(x, -y, b) == pytest.approx(-1.0)


def test_bootstrap_interval_brackets_the_estimate():
    rng = _rng()
    f = rng.uniform(1, 10, 40)
    m = rng.normal(size=40)
    d = m + 0.3 * rng.normal(size=40)
    point = st.correlations(m, d, f, 4)
    ci = st.bootstrap_ci(m, d, f, 4, n_boot=200, seed=1)
    for k in ("pearson", "spearman", "partial_spearman"):
        assert ci[k][0] <= point[k] <= ci[k][1] and ci[k][0] < ci[k][1]


@pytest.mark.parametrize("n,ties", [(30, False), (6, True)])
def test_bootstrap_interval_matches_an_independent_resampling(n, ties):
    """Same draws (numpy's default_rng(seed).integers(0, n, n) per resample), statistics from their definitions,
    resamples where a statistic is undefined left out: the interval is reproduced exactly."""
    rng = _rng()
    f = rng.uniform(1, 10, n)
    m = np.array([0.0, 0.0, 0.0, 0.0, 1.0, 2.0]) if ties else rng.normal(size=n)  # ties: many constant resamples
    d = m + 0.5 * rng.normal(size=n)
    seed, n_boot = int(rng.integers(0, 2**31)), 300
    ci = st.bootstrap_ci(m, d, f, 2, n_boot=n_boot, seed=seed)
    g = np.random.default_rng(seed)
    ref = {"pearson": [], "spearman": []}
    for _ in range(n_boot):
        idx = g.integers(0, n, n)
        a, b = m[idx], d[idx]
        if np.ptp(a) > 0 and np.ptp(b) > 0:
            ref["pearson"].append(_ref_pearson(a, b))
            ref["spearman"].append(_ref_pearson(_ref_rank(a), _ref_rank(b)))
    if ties:
        assert len(ref["pearson"]) < n_boot  # the case is exercised
    for k, v in ref.items():
        assert ci[k] == pytest.approx(np.quantile(v, [0.025, 0.975]), abs=1e-9)
    never = st.bootstrap_ci(np.ones(n), d, f, 2, n_boot=20, seed=seed)  # a constant metric: never defined
    assert not {"pearson", "spearman", "bucket_spearman"} & set(never)


def test_recovery_against_brute_force():
    rng = _rng()
    drop = rng.uniform(0, 10, 30)
    flops = rng.uniform(1, 5, 30)
    viable = drop <= 3.0
    perfect = st.recovery(drop, viable, flops, 3)
    assert perfect["top_k"] == 1.0 and perfect["per_bucket"] == 1.0
    metric = rng.normal(size=30)
    got = st.recovery(metric, viable, flops, 3)
    k = int(viable.sum())
    ref_top = viable[np.argsort(metric)[:k]].mean() if k else None
    b = st.flops_buckets(flops, 3)
    hits = [viable[np.where(b == q)[0][np.argmin(metric[b == q])]] for q in range(3) if viable[b == q].any()]
    assert got["top_k"] == pytest.approx(ref_top) and got["per_bucket"] == pytest.approx(np.mean(hits))


def test_cascade_curve_against_a_per_sample_loop():
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    n, c = 257, 7
    task = get_task("image-classification")
    ls, ll = (torch.randn(n, c, generator=g, dtype=torch.float64) * 3 for _ in range(2))
    ps, pl = torch.softmax(ls.float(), -1), torch.softmax(ll.float(), -1)  # the task's confidence: max softmax
    y = torch.randint(0, c, (n,), generator=g)
    pts = st_cascades.cascade_curve(task, task.predict(ls), task.predict(ll), y, 1e6, 2e7, [0.0, 0.3, 0.61, 1.01])
    for p in pts:
        hits, deferred = 0, 0
        for k in range(n):
            use_large = float(ps[k].max()) < p["threshold"]
            deferred += use_large
            hits += int((pl[k] if use_large else ps[k]).argmax()) == int(y[k])
        assert p["deferred"] == pytest.approx(deferred / n) and p["acc"] == pytest.approx(100 * hits / n)
        assert p["flops"] == pytest.approx(1e6 + deferred / n * 2e7)
    assert pts[0]["deferred"] == 0.0 and pts[-1]["deferred"] == 1.0


def test_stitching_gain_on_hand_checked_rows():
    rng = _rng()
    anchors = [dict(key="a", anchor=True, flops=1.0, test_acc=80.0), dict(key="b", anchor=True, flops=4.0,
                                                                          test_acc=90.0)]
    acc = rng.uniform(70, 95, 6)
    fl = rng.uniform(1.0, 4.0, 6)
    rows = anchors + [dict(key=f"s{k}", anchor=False, flops=float(f), test_acc=float(a))
                      for k, (f, a) in enumerate(zip(fl, acc))]
    g = st_auc.stitching_gain(rows)
    ref = [(a - 80.0, k) for k, a in enumerate(acc)]  # every stitched config lies between the anchors
    best = max(ref)
    assert g["max_gain"] == pytest.approx(best[0]) and g["max_gain_config"] == f"s{best[1]}"
    assert g["auc_anchors"] == pytest.approx(0.80)
    assert g["auc_all"] >= g["auc_anchors"] - 1e-12


# ----------------------------------------------------------------------------------------- tiny end to end
@pytest.fixture(scope="module")
def run(one_thread, tmp_path_factory):
    fam = klas.create_family("fmnist-deit", anchors=["fmnist-deit-ti", "fmnist-deit-s"])
    path = tmp_path_factory.mktemp("study") / "run"
    run_probes(fam, path, ProbesConfig(epochs=1, batch_size=64, train_subset=256, val_subset=32))
    run_scores(fam, path, ScoresConfig(val_subset=96, dm_samples=48))
    for m in ("snnet-paired", "min-kl", "klas"):
        s3_selection.run(SelectionConfig(method=m), run_context(path, fam, progress=False))
    return fam, path


def test_tiny_metric_outcome_sensitivity_cascades(run, tmp_path):
    fam, path = run
    cfg = st_outcome.OutcomeCfg(n_configs=4, steps=2, batch_size=16, fit_samples=64, test_samples=64, n_boot=20, n_buckets=2)
    rec = st_outcome.metric_outcome(path, tmp_path, cfg, family=fam, progress=False)
    assert len(rec["configs"]) == 4 and rec["pair"] == ["fmnist-deit-ti", "fmnist-deit-s"]
    assert set(rec["metrics"]) >= {"score", "kl", "mse", "cka", "tlm", "fula"}
    for r in rec["configs"]:
        assert r["drop"] == pytest.approx(rec["target_acc"] - r["acc"]) and 0 <= r["acc"] <= 100
    drops = np.array([r["drop"] for r in rec["configs"]])
    kl = np.array([r["kl"] for r in rec["configs"]])
    assert rec["stats"]["kl"]["spearman"] == pytest.approx(st.spearman(kl, drops), nan_ok=True)
    assert (tmp_path / "study_metric_outcome_fmnist-deit.png").is_file()
    assert rec["viable"]["bucket+3"] >= 2 and rec["viable"]["abs<=1"] <= rec["viable"]["abs<=5"]
    assert set(rec["stats"]["score"]["recovery"]) == set(rec["viable"])

    sens = st_sensitivity.sensitivity(path, tmp_path, taus=(0.0, 0.05, 10.0), buckets=(0, 2), family=fam, progress=False)
    default = [g for g in sens["grid"] if g["tau"] == sens["default_tau"] and g["buckets"] == "auto"][0]
    assert default["overlap"] == 1.0 and default["count"] == sens["default_count"]
    by_tau = {g["tau"]: g["count"] for g in sens["grid"] if g["buckets"] == 2}
    assert by_tau[0.0] <= by_tau[0.05] <= by_tau[10.0]  # a looser threshold never selects fewer
    klas_sel = load_json(path / "selection" / "selection.json")  # the last one made: klas
    assert sens["default_count"] == len(klas_sel["selected"])  # same rule as the selection stage
    assert {f["form"] for f in sens["forms"]} == {"ratio", "difference", "kl"}

    cas = st_cascades.cascades(path, tmp_path, test_samples=50, n_thresholds=5, family=fam, progress=False)
    (curve,) = cas["curves"].values()
    accs = cas["anchors"]["acc"]
    assert curve["points"][0]["acc"] == pytest.approx(accs["fmnist-deit-ti"])  # threshold 0: small anchor only
    assert cas["stitched_front"]["points"] == []  # no evaluation yet: shown as missing, not an error
    assert (tmp_path / "study_cascades_fmnist-deit.png").is_file()


def test_tiny_auc_and_gain(run, tmp_path):
    fam, path = run
    # two of the three arms (each arm is the same code with another selection; three cost 30 s more)
    cfg = st_auc.AucCfg(steps=2, batch_size=16, n_stitches=2, test_samples=40, seeds=(0, 1), val_samples=16,
                        init_samples=64, methods=("klas", "min-kl"), admission_val_samples=200)
    rec = st_auc.auc_study(path, tmp_path, cfg, family=fam, progress=False)
    assert set(rec["summary"]) == {"klas", "min-kl", "anchors-only"}
    for m in ("klas", "min-kl"):
        vals = [rec["per_seed"][s]["auc"][m] for s in ("0", "1")]
        assert rec["summary"][m]["mean"] == pytest.approx(np.mean(vals))
        assert rec["summary"][m]["std"] == pytest.approx(np.std(vals, ddof=1))
    g = st_auc.gain_sweep(path, tmp_path, steps_list=(2, 3), cfg=cfg, family=fam, progress=False)
    assert [p["steps"] for p in g["points"]] == [2, 3]
    assert g["points"][0]["auc"] == rec["per_seed"]["0"]["auc"]["klas"]  # reused the AUC study's run
    assert (path / "study" / "gain" / "klas_steps3_seed0" / "compare.json").is_file()
    assert (tmp_path / "study_gain_fmnist-deit.png").is_file() and (tmp_path / "study_auc_fmnist-deit.png").is_file()


def test_cli_study_bad_input_is_one_line(tmp_path, capsys):
    from klas.cli import main

    assert main(["study", "sensitivity", "--run-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "run.json" in err[0]
