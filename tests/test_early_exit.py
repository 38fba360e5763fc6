"""Stitched early exit (klas.research.early_exit): the handoff from the source anchor's block-i activation is the
frozen-recipe stitched network; its FLOPs formula matches a FLOP counter on the cascade as executed; the equal-cost
comparison picks what a brute-force reference picks; the cascade curves match the evaluation stage's."""
import copy

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from _stitch_helpers import one_thread, tiny_family  # noqa: F401  (autouse fixture)
from klas.families import stitch_layer_flops
from klas.research import early_exit as ee
from klas.stages import s5_evaluation as s5
from klas.stitched import trainable_stitch
from klas.stitch import LoRALinear, StitchConfig, StitchLayer, merge_lora

X = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def fam():
    return tiny_family()


def _frozen(fam, i=1, j=1, src="tv-8", tgt="tv-32", seed=0):
    """A frozen-recipe stitched network with a random stitch layer and random (non-zero) LoRA factors, so that its
    suffix differs from the target anchor's; the adapters merged (unmerged, their low-rank products would add
    FLOPs that the deployed, merged network does not have)."""
    g = torch.Generator().manual_seed(seed)
    s, t = fam[src], fam[tgt]
    torch.manual_seed(seed)
    layer = StitchLayer(s.feature_dim(i), t.feature_dim(j))
    sn = trainable_stitch(s, t, StitchConfig(src, i, tgt, j), layer, "frozen", generator=g)
    with torch.no_grad():
        for m in sn.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(0, 0.5, generator=g)
    assert merge_lora(sn) > 0  # folded into the Linear layers, as load_supernet / load_stitched deliver it
    return sn.eval()


@pytest.mark.parametrize("i,j", [(1, 1), (0, 2), (2, 0)])
def test_handoff_from_block_i_activation_equals_stitched_forward_float64(fam, i, j):
    sn = _frozen(fam, i, j).double()
    src = copy.deepcopy(fam["tv-8"]).double().eval()  # the untouched anchor (its own copy, in float64)
    x = X.double()
    h = ee.Handoff(src, sn)
    run = ee.handoff_cascade(h, x, threshold=float("inf"))  # every image deferred
    with torch.no_grad():
        ref = sn(x)
        tgt_only = fam["tv-32"].double().forward_head(fam["tv-32"].forward_blocks(sn.layer(run["activation"]), j + 1))
        fam["tv-32"].float()
    assert run["deferred"].all()
    assert (run["logits"] - ref).abs().max() < 1e-12
    assert (run["activation"] - src.forward_blocks(src.forward_stem(x), 0, i + 1)).abs().max() == 0
    assert (run["small"] - src(x)).abs().max() < 1e-12
    assert (tgt_only - ref).abs().max() > 1e-3  # the suffix is the stitched net's (LoRA), not the target anchor's
    # a threshold in between: answers from the anchor where confident, from the stitched net where deferred
    _, conf = ee.TASK.predict(run["small"])
    t = float(conf.median())
    mixed = ee.handoff_cascade(h, x, threshold=t)
    d = mixed["deferred"]
    assert 0 < int(d.sum()) < len(x) and torch.equal(d, conf < t)
    assert (mixed["logits"][d] - ref[d]).abs().max() < 1e-12
    assert torch.equal(mixed["logits"][~d], run["small"][~d])
    assert ee.source_identity(src, sn)["identical"]


def test_source_identity_tells_frozen_from_finetuned_prefix(fam):
    sn = _frozen(fam, i=1, j=1)
    src = fam["tv-8"]
    rep = ee.source_identity(src, sn)
    assert rep["identical"] and rep["prefix_max_abs_diff"] == 0 and rep["prefix_tensors"] > 0
    later = copy.deepcopy(sn)
    with torch.no_grad():  # a block after i changed: not identical, but the prefix still is
        later.src.blocks[2].mlp.fc1.weight.add_(0.1)
    rep = ee.source_identity(src, later)
    assert not rep["identical"] and rep["prefix_max_abs_diff"] == 0
    w = sn.src.blocks[1].attn.qkv.weight
    noise = 0.25 * torch.randn(w.shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():  # a prefix block changed (what the independent recipe does): the prefix differs
        w.add_(noise)
    rep = ee.source_identity(src, sn)
    assert not rep["identical"] and rep["prefix_max_abs_diff"] == pytest.approx(float(noise.abs().max()), rel=1e-5)
    assert (ee.Handoff(src, sn)(X) - sn(X)).abs().max() > 1e-4  # then the handoff is a different network


def _count(fn, *args) -> int:
    with FlopCounterMode(display=False) as c:
        fn(*args)
    return int(c.get_total_flops())


@pytest.mark.parametrize("i,j", [(1, 1), (0, 2), (3, 0)])
def test_handoff_flops_formula_matches_flop_counter(fam, i, j):
    sn = _frozen(fam, i, j)
    src, tgt = fam["tv-8"], fam["tv-32"]
    h = ee.Handoff(src, sn)
    extra = ee.handoff_extra_flops(src, sn)
    with torch.no_grad():
        act = h.prefix(X[:1])
        assert _count(h.suffix, act) == extra  # the suffix run on one image, counted
        assert _count(h.prefix, X[:1]) == ee.prefix_flops(src, i)
    # the same from the block FLOPs: stitch layer + target blocks j+1.. + head
    assert extra == stitch_layer_flops(src, i, tgt, j) + sum(b.flops for b in tgt.infos[j + 1:]) + tgt.head_flops
    assert ee.prefix_flops(src, i) + extra == sn.flops
    # the cascade as executed: source on every image, suffix on the deferred ones only
    _, conf = ee.TASK.predict(src(X).detach())
    t = float(conf.quantile(0.4))
    run = ee.handoff_cascade(h, X, threshold=t)
    n_def = int(run["deferred"].sum())
    assert 0 < n_def < len(X)
    counted = _count(ee.handoff_cascade, h, X, t)
    avg, worst = ee.handoff_costs(src.flops, extra, n_def / len(X))
    assert counted == pytest.approx(avg * len(X), rel=1e-12)
    assert counted == len(X) * src.flops + n_def * extra
    assert worst == src.flops + extra < src.flops + tgt.flops
    # the curves' accounting on the same images: cascade_points with the real cascade's outputs
    y = torch.randint(0, 10, (len(X),), generator=torch.Generator().manual_seed(1))
    small = ee.TASK.predict(run["small"])
    large = ee.TASK.predict(h(X).detach())
    out = {"val": small, "test": small}
    pts = ee.cascade_points("handoff", "h", out, {"val": large, "test": large}, {"val": y, "test": y}, src.flops,
                            extra, ts=[t])
    assert pts[0]["flops_avg"]["val"] == pytest.approx(avg) and pts[0]["flops_worst"] == worst
    assert torch.equal(pts[0]["_correct"]["val"], run["logits"].argmax(-1) == y)


def _random_outputs(rng, n, k=10):
    pred = torch.from_numpy(rng.integers(0, k, n))
    conf = torch.from_numpy(rng.uniform(0.1, 1.0, n).astype(np.float32))
    return pred, conf


def _np_cascade(small, large, y, t, fs, fl):
    sp, sc = small[0].numpy(), small[1].numpy()
    deferred = sc < t
    pred = np.where(deferred, large[0].numpy(), sp)
    return 100.0 * np.mean(pred == y.numpy()), fs + np.mean(deferred) * fl


@pytest.mark.parametrize("seed", range(6))
def test_equal_cost_choice_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = 60 if seed % 2 else 400  # small n: many accuracy ties, which the tie-breaking must settle alike
    ys = {s: torch.from_numpy(rng.integers(0, 10, n)) for s in ee.SPLITS}
    models = {f"m{q}": {s: _random_outputs(rng, n) for s in ee.SPLITS} for q in range(5)}
    flops = {name: float(f) for name, f in zip(models, sorted(rng.integers(1, 50, 5) * 1000))}
    refs = [ee.single_point("anchor", m, models[m], ys, flops[m]) for m in models]
    for a in ("m0", "m1"):
        for b in ("m2", "m3", "m4"):
            refs += ee.cascade_points("cascade", f"{a}>{b}", models[a], models[b], ys, flops[a], flops[b])
    A, H = "m1", {s: _random_outputs(rng, n) for s in ee.SPLITS}
    extra = float(rng.integers(1, 40) * 1000)
    pts = ee.cascade_points("handoff", "h", models[A], H, ys, flops[A], extra)
    recs, best = ee.compare(pts, refs)

    # brute force, from the raw outputs with numpy only
    def np_point(p, split):
        if p["kind"] == "handoff":
            return _np_cascade(models[A][split], H[split], ys[split], p["threshold"], flops[A], extra)
        if p["kind"] == "anchor":
            return 100.0 * np.mean(models[p["name"]][split][0].numpy() == ys[split].numpy()), flops[p["name"]]
        a, b = p["name"].split("@")[0].split(">")
        return _np_cascade(models[a][split], models[b][split], ys[split], p["threshold"], flops[a], flops[b])

    rv = np.array([np_point(r, "val") for r in refs])
    rt = np.array([np_point(r, "test") for r in refs])
    pv = np.array([np_point(p, "val") for p in pts])
    pt = np.array([np_point(p, "test") for p in pts])
    np.testing.assert_allclose(rv[:, 0], [r["val_acc"] for r in refs])
    np.testing.assert_allclose(pv[:, 1], [p["flops_avg"]["val"] for p in pts])
    want_ref, diffs = [], []
    for k in range(len(pts)):
        cand = np.flatnonzero(rv[:, 1] <= pv[k, 1])
        if not len(cand):
            want_ref.append(None)
            diffs.append(-np.inf)
            continue
        order = np.lexsort((cand, rv[cand, 1], -rv[cand, 0]))  # best val acc, then fewer FLOPs, then first
        r = int(cand[order[0]])
        want_ref.append(r)
        diffs.append(pv[k, 0] - rv[r, 0])
        assert recs[k]["diff_test"] == pytest.approx(pt[k, 0] - rt[r, 0])
    assert [r["reference"] for r in recs] == want_ref
    assert want_ref[0] is not None  # the source anchor alone is never dearer than a handoff point
    order = np.lexsort((np.arange(len(pts)), pv[:, 1], -np.array(diffs)))
    assert best == int(order[0])


def test_thresholds_and_cascade_points_match_the_evaluation_stage():
    rng = np.random.default_rng(11)
    n = 300
    ys = {s: torch.from_numpy(rng.integers(0, 10, n)) for s in ee.SPLITS}
    small = {s: _random_outputs(rng, n) for s in ee.SPLITS}
    large = {s: _random_outputs(rng, n) for s in ee.SPLITS}
    outputs = {"S": (small["val"], small["test"]), "L": (large["val"], large["test"])}
    members = [dict(kind="anchor", key="S", name="S", flops=1000, val_acc=10.0),
               dict(kind="anchor", key="L", name="L", flops=5000, val_acc=20.0)]
    theirs = s5._cascade_candidates(ee.TASK, members, outputs, ys["val"], ys["test"])
    ours = ee.cascade_points("cascade", "S>L", small, large, ys, 1000, 5000)
    assert [c["threshold"] for c in theirs] == ee.cascade_thresholds(small["val"][1]) == [p["threshold"] for p in ours]
    for c, p in zip(theirs, ours):
        assert c["name"] == p["name"] and c["flops"] == p["flops_worst"]
        assert c["flops_avg"] == pytest.approx(p["flops_avg"]) and c["deferral"] == pytest.approx(p["deferral"])
        assert (c["val_acc"], c["test_acc"]) == (p["val_acc"], p["test_acc"])
