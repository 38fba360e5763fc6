"""Selection: the bucket rule on hand-built tables, the automatic bucket count, SN-Net's mappings, anchor pairs,
every registered method end to end on a tiny run (through ``run(cfg, ctx)``), the method registry, and one-line
errors."""
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

import klas
from _stitch_helpers import probes as run_probes
from _stitch_helpers import scores as run_scores
from klas.contract import StageContext, specs
from klas.errors import KlasError
from klas.families import AnchorCfg, create_anchor, get_family_cfg
from klas.io import load_json
from klas.research import register_all
from klas.stitch import FitCfg
from klas.stages import s3_selection as s3
from klas.stages.s1_probes import ProbesConfig
from klas.stages.s2_scores import ScoresArtifact, ScoresConfig
from klas.stages.s3_selection import (SelectionArtifact, SelectionConfig, SelectionMethod, assign_buckets,
                                      auto_num_buckets, bucket_select, candidate_table, coverage, klas_anchor_pairs,
                                      nearest_pairs, snnet_paired, snnet_unpaired)

register_all()  # the baselines (mse, cka, ce, dm, tlm, fula) are klas.research's plug-ins
FIT = FitCfg(steps=3, batch_size=16, samples=32)  # the fitted baselines' budget in these tests (ctx.hooks["fit"])


def select(fam, path, cfg, **hooks):
    """The selection stage on the run ``path``, as the pipeline runs it."""
    return s3.run(cfg, StageContext.open(path, fam, progress=False, **hooks))



# ------------------------------------------------------------------------------------------- the bucket rule
def test_assign_buckets_edges_and_range():
    assert assign_buckets([100, 124, 125, 150, 199, 200, 99, 201], 100, 200, 4) == [0, 0, 1, 2, 3, 3, None, None]
    assert assign_buckets([100, 200], 100, 200, 1) == [0, 0]
    with pytest.raises(KlasError, match="--num-buckets 0"):
        assign_buckets([1], 0, 10, 0)


@pytest.mark.parametrize("scores,buckets,tau,expected", [
    ([1.0, 1.0, 2.0], [0, 0, 0], 0.0, [True, True, False]),  # ties at the minimum are all kept, tau = 0
    ([1.0, 1.05, 1.0501, 3.0], [0, 0, 0, 1], 0.05, [True, True, False, True]),  # (1 + tau) x min, inclusive
    ([5.0, 1.0, 9.0, 2.0], [0, 3, 0, 3], 0.0, [True, True, False, False]),  # empty buckets 1, 2 add nothing
    ([4.0, 3.0, 2.0, 1.0], [0, 1, 2, 3], 0.0, [True, True, True, True]),  # one configuration per bucket
    ([-1.0, -0.96, -0.9], [0, 0, 0], 0.05, [True, True, False]),  # negative scores: min + tau * |min|
    ([None, 2.0, float("nan"), 1.0], [0, 0, 0, None], 10.0, [False, True, False, False]),  # unscored / no bucket
])
def test_bucket_select_hand_built(scores, buckets, tau, expected):
    assert bucket_select(scores, buckets, tau) == expected


def _table(rows, lo=0, hi=100):
    """rows: (i, j, flops, score)."""
    return dict(source="s", target="t", lo=lo, hi=hi, i=[r[0] for r in rows], j=[r[1] for r in rows],
                flops=[r[2] for r in rows], score=[r[3] for r in rows], D=[0.0] * len(rows), cap=[1.0] * len(rows))


def test_auto_bucket_count_is_the_smallest_covering_every_target_block():
    # j = 2 wins wherever it shares a bucket; j = 0 (FLOPs 10) and j = 1 (FLOPs 60) need buckets of their own,
    # which first happens with 4 buckets: [0, 25) [25, 50) [50, 75) [75, 100]
    t = _table([(0, 0, 10, 5.0), (1, 1, 60, 4.0), (2, 2, 80, 1.0), (3, 2, 45, 1.0)])
    n, info = auto_num_buckets([t], tau=0.05, max_buckets=50)
    assert (n, info["complete"]) == (4, True)
    for k in (1, 2, 3):
        buckets = assign_buckets(t["flops"], 0, 100, k)
        can, got = coverage(t, buckets, bucket_select(t["score"], buckets, 0.05))
        assert can - got  # fewer buckets leave a target block out
    # a configuration tied in FLOPs with a much better one can never be covered: best coverage, smallest count
    t2 = _table([(0, 0, 30, 9.0), (1, 1, 30, 1.0), (2, 2, 90, 2.0)])
    n2, info2 = auto_num_buckets([t2], tau=0.05, max_buckets=40)
    assert info2["complete"] is False and n2 == 2


def test_auto_buckets_on_random_tables_cover_every_block(rng):
    for _ in range(5):
        # distinct FLOPs: 1000+ buckets isolate every configuration, so full coverage is always reachable
        flops = torch.randperm(1001, generator=rng)[:48].tolist()
        rows = [(k // 8, k % 8, f, float(torch.rand(1, generator=rng))) for k, f in enumerate(flops)]
        t = _table(rows, 0, 1000)
        n, info = auto_num_buckets([t], tau=0.05, max_buckets=2000)
        buckets = assign_buckets(t["flops"], 0, 1000, n)
        can, got = coverage(t, buckets, bucket_select(t["score"], buckets, 0.05))
        assert info["complete"] is True and can == got == set(range(8))
        if n > 1:
            b1 = assign_buckets(t["flops"], 0, 1000, n - 1)
            can1, got1 = coverage(t, b1, bucket_select(t["score"], b1, 0.05))
            assert can1 - got1  # n is the smallest


# ---------------------------------------------------------------------------------------------------- SN-Net
def _snnet_unpaired_definition(front: int, end: int) -> list[tuple[int, int]]:
    """SN-Net's unpaired rule, transcribed: target ids from nearest interpolation; (a, b) = source 0..a, target b..;
    in klas terms j = b - 1."""
    ids = F.interpolate(torch.arange(front, dtype=torch.float32)[None, None], end).squeeze().long().tolist()
    return [(a, b - 1) for a in range(front) for b, e in enumerate(ids) if e == a and a < b and b != 0]


def test_snnet_mappings_for_unequal_depths():
    assert snnet_paired(12, 24) == [(i, 2 * i + 1) for i in range(11)]
    assert snnet_unpaired(12, 24) == [(0, 0)] + [(a, j) for a in range(1, 12) for j in (2 * a - 1, 2 * a)]
    assert snnet_paired(12, 12) == [(a, a) for a in range(11)]  # SN-Net's window (a -> a + 1), i.e. i = j
    assert snnet_unpaired(12, 12) == []  # equal depths: SN-Net uses paired stitching instead
    for front, end in ((12, 24), (6, 18), (2, 18), (12, 18), (3, 7), (5, 5)):
        assert snnet_unpaired(front, end) == _snnet_unpaired_definition(front, end)
        paired = snnet_paired(front, end)
        assert all(round((i + 1) * end / front + 1e-9) == j + 1 and 0 <= j <= end - 2 for i, j in paired)


def test_anchor_pair_rules():
    names = ["ti", "s", "b"]
    deit_like = torch.tensor([[0.0, 0.2, 0.9], [0.2, 0.0, 0.3], [0.9, 0.3, 0.0]])
    swin_like = torch.tensor([[0.0, 0.6, 0.4], [0.6, 0.0, 0.5], [0.4, 0.5, 0.0]])
    assert klas_anchor_pairs(names, deit_like) == [("ti", "s"), ("s", "b")] == nearest_pairs(names)
    assert klas_anchor_pairs(names, swin_like) == [("ti", "b")]
    assert klas_anchor_pairs(["x", "y"], torch.zeros(2, 2)) == [("x", "y")]


# ----------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def run(one_thread, tmp_path_factory):
    torch.manual_seed(777)
    fam = klas.create_family("fmnist-deit", anchors=["fmnist-deit-ti", "fmnist-deit-s"])
    path = tmp_path_factory.mktemp("sel") / "run"
    run_probes(fam, path, ProbesConfig(epochs=1, batch_size=64, train_subset=256, val_subset=32))
    run_scores(fam, path, ScoresConfig(val_subset=96, dm_samples=48))
    return fam, path


def test_every_method_writes_the_schema(run):
    fam, path = run
    recs = {}
    assert set(s3.method_names()) == {"klas", "min-kl", "snnet-paired", "snnet-unpaired", "esta", "mse", "cka", "ce",
                                      "dm", "tlm", "fula"}
    for method in s3.method_names():
        rec = asdict(select(fam, path, SelectionConfig(method=method, max_pairs=6), fit=FIT))
        assert asdict(SelectionArtifact.load(path / "selection")) == rec
        recs[method] = rec
        assert {"family", "method", "params", "anchors", "anchor_pairs", "candidates", "selected"} <= rec.keys()
        assert {"tau", "num_buckets", "score_form"} <= rec["params"].keys()
        assert rec["anchors"] == ["fmnist-deit-ti", "fmnist-deit-s"] and rec["anchor_pairs"] == [list(rec["anchors"])]
        assert rec["selected"] and all(s in rec["candidates"] for s in rec["selected"])
        for c in rec["candidates"]:
            assert {"source", "target", "i", "j", "flops", "D", "cap", "score", "bucket"} <= c.keys()
        assert (path / "selection" / f"candidates-{method}.png").is_file()
        assert load_json(path / "selection" / "selection.json")["method"] == method
    klas_rec = recs["klas"]
    cov = klas_rec["params"]["coverage"]
    if cov["complete"]:  # every target block that can be selected is
        assert {s["j"] for s in klas_rec["selected"]} == {c["j"] for c in klas_rec["candidates"]
                                                         if c["bucket"] is not None and c["score"] is not None}
    lo, hi = fam[0].flops, fam[1].flops
    assert all(lo <= s["flops"] <= hi and s["bucket"] is not None for s in klas_rec["selected"])
    assert len(recs["min-kl"]["selected"]) == len(klas_rec["selected"])
    worst = max(s["D"] for s in recs["min-kl"]["selected"])
    assert all(c["D"] >= worst for c in recs["min-kl"]["candidates"]
               if c not in recs["min-kl"]["selected"] and c["bucket"] is not None)
    assert [(s["i"], s["j"]) for s in recs["snnet-paired"]["selected"]] == snnet_paired(12, 12)
    assert [(s["i"], s["j"]) for s in recs["esta"]["selected"]] == [(i, i) for i in range(11)]  # equal depths
    for m in ("tlm", "fula"):
        assert sum(c["score"] is not None for c in recs[m]["candidates"]) == 6
        assert recs[m]["params"]["cost"]["configs_fitted"] == 6 and recs[m]["params"]["cost"]["fit_wall_s"] >= 0
    # deterministic: the same settings give the same selection (up to its wall-time figures)
    again = asdict(select(fam, path, SelectionConfig()))
    assert again["selected"] == klas_rec["selected"] and again["candidates"] == klas_rec["candidates"]


def test_bad_input_is_one_line_error(run, tmp_path):
    fam, path = run
    with pytest.raises(KlasError, match="must be the cheaper anchor") as e:
        select(fam, path, SelectionConfig(anchor_pairs="fmnist-deit-s:fmnist-deit-ti"))
    assert "\n" not in str(e.value)
    StageContext.open(tmp_path / "deit-run", "deit")
    with pytest.raises(KlasError, match="belongs to family 'deit'"):
        select(fam, tmp_path / "deit-run", SelectionConfig())
    # an anchor pair with no stitchable blocks: 5 tokens (patch 14) vs the family's 17
    base = get_family_cfg("fmnist-deit").anchors[0]
    odd = create_anchor(AnchorCfg("odd", base.arch, dict(base.model_args, patch_size=14)), (1, 28, 28))
    fam2 = klas.families.Family(fam.cfg, [odd, fam[1]])
    with pytest.raises(KlasError, match="odd->fmnist-deit-s: no stitchable block pairs"):
        candidate_table(fam2, "odd", "fmnist-deit-s", torch.rand(12, 12), torch.rand(12), None)


def test_methods_are_looked_up_by_name(run, monkeypatch):
    """A method defined here and registered by name becomes a config choice and runs through the stage; a name that
    is not registered is a one-line error naming those that are."""
    fam, path = run

    class RawD(SelectionMethod):
        name = "test-raw-d"  # raw D through the KLAS buckets

        def tables(self, c):
            return c.tables(lambda p: c.d[p])

    monkeypatch.setattr(s3, "_METHODS", s3._METHODS.copy())  # the registration stays in this test
    s3.register_method(RawD())
    (spec,) = [sp for sp in specs(SelectionConfig) if sp.dotted == "method"]
    assert spec.allowed()[-1] == "test-raw-d" and spec.coerce("test-raw-d", "method") == "test-raw-d"
    rec = select(fam, path, SelectionConfig(method="test-raw-d", num_buckets=3))
    a, b = rec.anchor_pairs[0]
    d = ScoresArtifact.tensors(path / "scores")[0][f"D/{a}/{b}"].double()
    table = candidate_table(fam, a, b, d, torch.ones(d.shape[1], dtype=torch.float64), d)
    buckets = assign_buckets(table["flops"], table["lo"], table["hi"], 3)
    want = {(i, j) for i, j, keep in zip(table["i"], table["j"], bucket_select(table["score"], buckets, 0.05)) if keep}
    assert {(e["i"], e["j"]) for e in rec.selected} == want and rec.method == "test-raw-d"
    without = s3._METHODS.copy()
    without.remove("mse")
    monkeypatch.setattr(s3, "_METHODS", without)
    with pytest.raises(KlasError, match=r"selection method 'mse': not registered; registered: klas, min-kl") as e:
        select(fam, path, SelectionConfig(method="mse"))
    assert "\n" not in str(e.value) and "test-raw-d" in str(e.value)


@pytest.mark.parametrize("argv,needle", [
    (["--method", "nope"], "--method 'nope': expected one of klas"),
    (["--tau", "-1"], "--tau -1: expected >= 0"),
    (["--num-buckets", "-2"], "--num-buckets -2: expected >= 1"),
    (["--anchor-rule", "far"], "--anchor-rule 'far': expected one of"),
])
def test_cli_errors_are_one_line(tmp_path, argv, needle):
    r = subprocess.run([sys.executable, "-m", "klas", "select", "--run-dir", str(tmp_path / "r"), *argv],
                       capture_output=True, text=True)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and needle in lines[0], r.stderr
