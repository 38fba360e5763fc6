"""Scores: streamed D / Cap / anchor KL / baseline metrics equal float64 references computed from stored outputs;
baseline metrics are plug-ins the stage looks up in its registry."""
import math

import pytest
import torch

import klas
from _stitch_helpers import probes as run_probes
from _stitch_helpers import scores as run_scores
from klas.data import load_dataset
from klas.errors import KlasError
from klas.io import load_tensors
from klas.research import register_all
from klas.research.metrics import FeatureMoments, mmd2_table
from klas.stages import s2_scores as s2
from klas.stages.s1_probes import ProbesConfig, anchor_features, load_probes
from klas.stages.s2_scores import CAP_EPS, ScoreAccumulator, ScoresArtifact, ScoresConfig, stitch_score

register_all()  # the baseline tables (mse, cka, ce, dm) below are klas.research's plug-ins



def kl_ref(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Independent float64 mean_n KL(softmax a[n] || softmax b[n]) for a, b [N, C]."""
    a, b = a.double(), b.double()
    pa = torch.exp(a - torch.logsumexp(a, -1, keepdim=True))
    return (pa * ((a - torch.logsumexp(a, -1, keepdim=True)) - (b - torch.logsumexp(b, -1, keepdim=True)))
            ).sum(-1).mean()


def test_accumulator_matches_float64_reference(rng):
    depths, n, c = [2, 3, 5], 37, 7
    names = ["a", "b", "c"]
    # extreme logits: large spread, a large per-sample offset (softmax-invariant) and near-duplicate rows
    logits = {}
    for k, (name, d) in enumerate(zip(names, depths)):
        t = torch.randn(d + 1, n, c, generator=rng) * torch.tensor([0.01, 3.0, 40.0])[k % 3]
        t = t + 300.0 * torch.randn(1, n, 1, generator=rng)
        logits[name] = t
    logits["c"][2] = logits["c"][1] + 1e-3 * torch.randn(n, c, generator=rng)
    acc = ScoreAccumulator(names, depths)
    for s in range(0, n, 10):  # chunks 10, 10, 10, 7
        acc.update({k: v[:, s:s + 10] for k, v in logits.items()})
    res = acc.results()
    assert res["count"] == n
    for (x, y), d in res["D"].items():
        ref = torch.tensor([[kl_ref(logits[x][i], logits[y][j]) for j in range(depths[names.index(y)])]
                            for i in range(depths[names.index(x)])], dtype=torch.float64)
        torch.testing.assert_close(d, ref, rtol=1e-4, atol=1e-6)
    for x, d in zip(names, depths):
        ref = torch.stack([kl_ref(logits[x][j], logits[x][j + 1]) for j in range(d)])  # last: probe -> own head
        torch.testing.assert_close(res["cap"][x], ref, rtol=1e-4, atol=1e-6)
        lp = torch.log_softmax(logits[x].double(), -1)
        # each sample's entropy is float32 arithmetic by design (entropy_sum), summed in float64: float32-sized slack
        # (an entropy near 0 has no relative precision left; 7.7e-9 absolute was seen on one random draw)
        torch.testing.assert_close(res["entropy"][x], -(lp.exp() * lp).sum(-1).mean(-1), rtol=1e-5, atol=1e-7)
    ref = torch.tensor([[kl_ref(logits[x][-1], logits[y][-1]) for y in names] for x in names], dtype=torch.float64)
    torch.testing.assert_close(res["anchor_kl"], ref, rtol=1e-4, atol=1e-6)
    assert set(res["D"]) == {("a", "b"), ("a", "c"), ("b", "c")}


def test_score_forms(rng):
    d = torch.rand(4, 6, generator=rng, dtype=torch.float64) * 5
    cap = torch.rand(6, generator=rng, dtype=torch.float64) * 2 + 1e-3
    torch.testing.assert_close(stitch_score(d, cap, "ratio", 1.0), d / (cap[None] + CAP_EPS))
    torch.testing.assert_close(stitch_score(d, cap, "difference", 0.7), d - 0.7 * cap[None])
    torch.testing.assert_close(stitch_score(d, cap, "kl", 1.0), d)
    with pytest.raises(KlasError, match="score form 'nope'"):
        stitch_score(d, cap, "nope", 1.0)


def test_feature_moments_and_mmd_match_references(rng):
    n = 53
    fa = [torch.randn(n, c, generator=rng) * s + o for c, s, o in ((3, 1e3, 1e4), (5, 0.2, -7.0))]
    fb = [torch.randn(n, c, generator=rng) for c in (4, 2, 6)]
    fb[1] = fa[0][:, :2] @ torch.randn(2, 2, generator=rng) + 0.5  # exactly affine in source block 0
    mom = FeatureMoments({"a": [3, 5], "b": [4, 2, 6]}, [("a", "b")])
    for s in range(0, n, 20):
        mom.update({"a": [f[s:s + 20] for f in fa], "b": [f[s:s + 20] for f in fb]})
    mse, cka = mom.lstsq_residual("a", "b"), mom.linear_cka("a", "b")
    for i, x in enumerate(fa):
        for j, y in enumerate(fb):
            x1 = torch.cat([x.double(), torch.ones(n, 1, dtype=torch.float64)], 1)
            res = y.double() - x1 @ torch.linalg.lstsq(x1, y.double()).solution
            yc = y.double() - y.double().mean(0)
            torch.testing.assert_close(mse[i, j], (res ** 2).sum() / (yc ** 2).sum(), rtol=1e-5, atol=1e-8)
            h = torch.eye(n, dtype=torch.float64) - 1.0 / n
            k, l_ = h @ x.double() @ x.double().T @ h, h @ y.double() @ y.double().T @ h
            ref = (k * l_).sum() / torch.sqrt((k * k).sum() * (l_ * l_).sum())
            torch.testing.assert_close(cka[i, j], ref, rtol=1e-6, atol=1e-9)
    assert mse[0, 1] < 1e-8  # the affine target is fully explained

    p = torch.softmax(torch.randn(2, 19, 5, generator=rng) * 4, -1)
    q = torch.softmax(torch.randn(3, 19, 5, generator=rng) * 4, -1)
    sigma = 0.37
    got = mmd2_table(p, q, sigma)

    def k(x, y):
        return math.exp(-float(((x.double() - y.double()) ** 2).sum()) / (2 * sigma ** 2))

    for i in range(2):
        for j in range(3):
            xs, ys = p[i], q[j]
            ref = (sum(k(a, b) for a in xs for b in xs) + sum(k(a, b) for a in ys for b in ys)
                   - 2 * sum(k(a, b) for a in xs for b in ys)) / 19 ** 2
            assert abs(float(got[i, j]) - ref) < 1e-9


@pytest.fixture(scope="module")
def family(one_thread):
    torch.manual_seed(4321)
    return klas.create_family("fmnist-deit", anchors=["fmnist-deit-ti", "fmnist-deit-s"])


@pytest.fixture(scope="module")
def probed(family, tmp_path_factory):
    """A run with trained probes (the scores stage's upstream)."""
    run = tmp_path_factory.mktemp("scores") / "run"
    run_probes(family, run, ProbesConfig(epochs=1, batch_size=64, train_subset=256, val_subset=32))
    return run


def test_streamed_scores_equal_stored_logits(family, probed):
    run = probed
    rec = run_scores(family, run, ScoresConfig(batch_size=16, val_subset=70, dm_samples=40))
    assert ScoresArtifact.load(run / "scores") == rec  # 16 x 4 + 6 images: a ragged last batch
    t = load_tensors(run / "scores" / "scores.safetensors")
    m = load_tensors(run / "scores" / "metrics.safetensors")
    assert rec.n_val == 70 and (run / "scores" / "heatmap_fmnist-deit-ti__fmnist-deit-s.png").is_file()

    # reference: every logit and feature of the 70 images stored, then float64 from scratch
    nets = load_probes(run, family)
    val = load_dataset("fashion-mnist", "val").subset(70)
    x = val.normalize(val.images)
    feats, logits = {}, {}
    for v in family:
        f, head = anchor_features(v, x)
        feats[v.name] = f
        with torch.no_grad():
            logits[v.name] = torch.cat([nets[v.name](f), head[None]])
    a, b = (v.name for v in family)
    d_ref = torch.tensor([[kl_ref(logits[a][i], logits[b][j]) for j in range(12)] for i in range(12)],
                         dtype=torch.float64)
    cap_ref = torch.stack([kl_ref(logits[b][j], logits[b][j + 1]) for j in range(12)])
    torch.testing.assert_close(t[f"D/{a}/{b}"], d_ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(t[f"cap/{b}"], cap_ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(t[f"S/{a}/{b}"], d_ref / (cap_ref[None] + CAP_EPS), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(t["anchor_kl"][0, 1], kl_ref(logits[a][-1], logits[b][-1]), rtol=1e-4, atol=1e-6)
    assert bool(t[f"mask/{a}/{b}"].all())

    la, lb = torch.log_softmax(logits[a][:12].double(), -1), torch.log_softmax(logits[b][:12].double(), -1)
    ce_ref = -torch.einsum("inc,jnc->ij", la.exp(), lb) / 70
    torch.testing.assert_close(m[f"ce/{a}/{b}"], ce_ref, rtol=1e-4, atol=1e-6)
    for i in (0, 7):
        for j in (3, 11):
            y = feats[b][j].double()
            x1 = torch.cat([feats[a][i].double(), torch.ones(70, 1, dtype=torch.float64)], 1)
            res = y - x1 @ torch.linalg.lstsq(x1, y).solution
            ref = ((res ** 2).sum() / ((y - y.mean(0)) ** 2).sum()).clamp(0, 1)
            torch.testing.assert_close(m[f"mse/{a}/{b}"][i, j], ref, rtol=1e-4, atol=1e-7)
    dm_ref = mmd2_table(la[:, :40].exp(), lb[:, :40].exp(), 0.5)
    torch.testing.assert_close(m[f"dm/{a}/{b}"], dm_ref, rtol=1e-6, atol=1e-9)


def test_a_registered_metric_streams_in_the_same_pass(family, probed, monkeypatch):
    """A metric defined here, registered by name: it sees every batch of the one pass (logits, features, positions),
    its tables land in metrics.safetensors (masked like the others) and in the record; metrics = false skips it."""
    run = probed
    seen = {}

    class NegD:
        def __init__(self, sp):
            seen.update(pairs=sp.pairs, n_val=sp.n_val, positions=[])
            self.n = 0

        def update(self, batch):
            assert set(batch.logits) == set(batch.features) == {"fmnist-deit-ti", "fmnist-deit-s"}
            seen["positions"].append(batch.positions)
            self.n += len(batch.positions)

        def reduce(self):
            raise AssertionError("one process: nothing to reduce")

        def tables(self, a, b, res):
            return {"negd": -res["D"][(a, b)], "count": torch.full_like(res["D"][(a, b)], float(self.n))}

    monkeypatch.setattr(s2, "_METRICS", {})  # only this test's metric
    s2.register_metric("negd", NegD, tables=("negd", "count"))
    assert s2.metric_names() == ("negd", "count")
    art = run_scores(family, run, ScoresConfig(batch_size=16, val_subset=40))
    assert art.metrics == ["count", "negd"] and seen["n_val"] == 40
    assert seen["pairs"] == [("fmnist-deit-ti", "fmnist-deit-s")]
    assert torch.equal(torch.cat(seen["positions"]), torch.arange(40))  # 16 + 16 + 8, in split order
    t, m = ScoresArtifact.tensors(run / "scores")
    key = "fmnist-deit-ti/fmnist-deit-s"
    assert set(m) == {f"negd/{key}", f"count/{key}"}
    torch.testing.assert_close(m[f"negd/{key}"], -t[f"D/{key}"], rtol=0, atol=0, equal_nan=True)
    assert bool((m[f"count/{key}"] == 40).all())
    off = run_scores(family, run, ScoresConfig(batch_size=16, val_subset=40, metrics=False))
    assert off.metrics == [] and ScoresArtifact.tensors(run / "scores")[1] == {}
