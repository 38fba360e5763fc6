"""Evaluation: Pareto front and AUC against brute-force float64 references, latency measurement, the evaluation
stage end to end (accuracy, FLOPs, params recomputed independently) and ``klas compare`` at equal cost."""
import copy
import json
import math

import numpy as np
import pytest
import torch

from _stitch_helpers import one_thread, tiny_family, write_selection  # noqa: F401  (autouse fixture)
from klas.research.compare import Arm, compare, equalize
from klas.data import load_dataset
from klas.metrics import auc, normalize_flops, pareto_mask, staircase
from _stitch_helpers import evaluate, finetune
from klas.stages.s5_evaluation import EvaluationArtifact, EvaluationConfig, measure_latency
from klas.families import count_flops, stitched_flops
from klas.stitch import FitCfg
from klas.stages.s4_finetune import FinetuneConfig
from klas.stitched import load_stitched


def _points(rng, n, ties):
    if ties:  # few distinct values: equal FLOPs and equal accuracies happen
        return (torch.randint(0, 5, (n,), generator=rng).double().tolist(),
                torch.randint(0, 4, (n,), generator=rng).double().mul(25).tolist())
    return ((torch.rand(n, generator=rng, dtype=torch.float64) * 1e9).tolist(),
            (torch.rand(n, generator=rng, dtype=torch.float64) * 100).tolist())


@pytest.mark.parametrize("n", [1, 2, 5, 37])
@pytest.mark.parametrize("ties", [False, True])
def test_pareto_mask_matches_brute_force(rng, n, ties):
    f, a = _points(rng, n, ties)
    ref = [not any(f[q] <= f[p] and a[q] >= a[p] and (f[q] < f[p] or a[q] > a[p]) for q in range(n))
           for p in range(n)]
    assert pareto_mask(f, a) == ref


@pytest.mark.parametrize("n", [1, 3, 40])
@pytest.mark.parametrize("ties", [False, True])
def test_auc_is_integral_of_staircase(rng, n, ties):
    f, a = _points(rng, n, ties)
    f = [v * 1e6 for v in f] if ties else f
    span = (max(f) - min(f)) or 1.0
    lo, hi = min(f) + 0.1 * span - 0.5, max(f) - 0.1 * span + 0.5  # some points fall outside: clipped
    got = auc(f, a, lo, hi)
    # reference: exact integral of A(x) over [0, 1], A evaluated (brute force) at the midpoint of every piece
    xs = np.clip((np.array(f) - lo) / (hi - lo), 0.0, 1.0)
    acc = np.array(a) / 100.0
    cuts = np.unique(np.concatenate([[0.0, 1.0], xs]))
    ref = sum((r - l) * max([v for x, v in zip(xs, acc) if x <= (l + r) / 2], default=0.0)
              for l, r in zip(cuts[:-1], cuts[1:]))
    assert got == pytest.approx(ref, rel=1e-12, abs=1e-15)
    assert 0.0 <= got <= max(acc) + 1e-15
    # properties: a dominated point changes nothing, a better point never lowers it
    assert auc(f + [max(f)], a + [min(a)], lo, hi) == pytest.approx(got, rel=1e-12, abs=1e-15)
    assert auc(f + [lo], a + [100.0], lo, hi) == pytest.approx(1.0)


def test_staircase_and_normalization():
    assert normalize_flops(30.0, 10.0, 50.0) == 0.5
    xs, acc = [0.0, 0.5, 0.3], [60.0, 80.0, 90.0]
    assert [staircase(xs, acc, x) for x in (-0.1, 0.0, 0.29, 0.3, 0.99)] == [0.0, 60.0, 60.0, 90.0, 90.0]
    with pytest.raises(Exception, match="largest anchor"):
        normalize_flops(1.0, 5.0, 5.0)


def test_measure_latency(rng):
    net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 10))
    threads = torch.get_num_threads()
    lat = measure_latency(net, (64,), warmup=2, repeats=7, threads=1)
    assert torch.get_num_threads() == threads and lat["threads"] == 1 and lat["repeats"] == 7
    assert 0 < lat["p10_ms"] <= lat["median_ms"] <= lat["p90_ms"] and math.isfinite(lat["p90_ms"])


STITCHES = [("tv-8", 1, "tv-32", 1), ("tv-8", 2, "tv-32", 0), ("tv-8", 0, "tv-16", 2), ("tv-16", 2, "tv-32", 3)]
BUDGET = FinetuneConfig(recipe="shared", distill=None, max_stitches=None, epochs=1, steps_per_epoch=4, batch_size=32, train_subset=256, val_images=0,
                        init=FitCfg(samples=64, batch_size=64))


@pytest.fixture(scope="module")
def fam():
    return tiny_family()


def res_dir(tmp_path):
    return tmp_path / "run" / "evaluation"


def test_evaluate_run_end_to_end(tmp_path, fam):
    sel = write_selection(tmp_path / "sel.json", STITCHES[:2])
    finetune(tmp_path / "run", BUDGET, seed=0, selection_path=sel, family=copy.deepcopy(fam), progress=False)
    res = evaluate(tmp_path / "run", EvaluationConfig(test_subset=300, latency_repeats=3), progress=False)
    saved = json.loads((tmp_path / "run" / "evaluation" / "evaluation.json").read_text())
    assert saved["auc"] == res.auc and len(saved["configs"]) == 4 and EvaluationArtifact.load(res_dir(tmp_path)) == res
    test = load_dataset("fashion-mnist", "test").subset(300)
    x, y = test.normalize(test.images), test.labels
    f_min, f_max = fam[0].flops, fam[2].flops
    for row in saved["configs"]:
        net = load_stitched(tmp_path / "run", row["config"])
        with torch.no_grad():
            acc = (net(x).argmax(-1) == y).double().mean().item() * 100
        assert row["test_acc"] == pytest.approx(acc, abs=1e-9)
        assert row["flops"] == count_flops(net, torch.randn(1, 1, 28, 28))
        assert row["flops_norm"] == pytest.approx((row["flops"] - f_min) / (f_max - f_min))
        assert row["params"] == net.num_params and row["latency_ms"] > 0 and isinstance(row["pareto"], bool)
    flops, accs = [r["flops"] for r in saved["configs"]], [r["test_acc"] for r in saved["configs"]]
    assert [r["pareto"] for r in saved["configs"]] == pareto_mask(flops, accs)
    assert saved["auc"] == pytest.approx(auc(flops, accs, f_min, f_max)) and saved["n_pareto"] == sum(pareto_mask(
        flops, accs))
    for f in ("evaluation.png", "evaluation.md"):
        assert (tmp_path / "run" / "evaluation" / f).stat().st_size > 0
    # before finetuning: pretrained anchors (handed in again) and the stitch layers as initialised
    init = evaluate(tmp_path / "run", EvaluationConfig(test_subset=300, latency=False), state="init",
                    family=copy.deepcopy(fam), progress=False)
    assert (tmp_path / "run" / "evaluation" / "init" / "evaluation.json").is_file()
    anchors = [r for r in init.configs if r["anchor"]]
    with torch.no_grad():
        acc8 = (fam[0](x).argmax(-1) == y).double().mean().item() * 100
    assert anchors[0]["key"] == "tv-8" and anchors[0]["test_acc"] == pytest.approx(acc8, abs=1e-9)


def test_equalize_spreads_over_flops(fam):
    sel = [dict(source=s, i=i, target=t, j=j) for s, i, t, j in STITCHES]
    two = equalize(sel, 2, fam)
    fl = sorted(stitched_flops(fam[e["source"]], e["i"], fam[e["target"]], e["j"]) for e in sel)
    got = [stitched_flops(fam[e["source"]], e["i"], fam[e["target"]], e["j"]) for e in two]
    assert got == [fl[0], fl[-1]] and equalize(sel, 9, fam) == sel


def test_compare_at_equal_cost(tmp_path, fam):
    a = write_selection(tmp_path / "a.json", STITCHES[:3], method="klas")
    b = write_selection(tmp_path / "b.json", STITCHES[2:], method="snnet-paired")
    res = compare(tmp_path / "cmp", [Arm("klas", a), Arm("snnet", b, init="random")], BUDGET,
                  EvaluationConfig(test_subset=200, latency=False), seed=0, family=fam, progress=False)
    assert res["n_stitches"] == 2 and [r["n_stitches"] for r in res["arms"]] == [2, 2]
    assert all(r["steps"] == 4 and r["n_configs"] == 4 for r in res["arms"])
    for r in res["arms"]:
        ev = json.loads((tmp_path / "cmp" / r["label"] / "evaluation" / "evaluation.json").read_text())
        assert r["auc"] == ev["auc"] and r["n_pareto"] == ev["n_pareto"]
        xs, acc = [c["flops_norm"] for c in ev["configs"]], [c["test_acc"] for c in ev["configs"]]
        assert r["acc_at"]["0.5"] == staircase(xs, acc, 0.5) and r["before"]["auc"] is not None
    assert res["best_auc"] == max(res["arms"], key=lambda r: r["auc"])["label"]
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| klas |" in md and "| snnet |" in md
    for f in ("compare.json", "compare.png", "compare-init.png"):
        assert (tmp_path / "cmp" / f).stat().st_size > 0
