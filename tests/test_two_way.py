"""Two-way stitching (SN-Netv2, ``klas.stitch_path``): paths of segments against hand-composed forwards and the flop
counter, the large -> small KL of the scores accumulator against a float64 reference, two-way selection by Eq. 3
against a brute-force rule, and a round-trip path exported to ONNX with parity."""
import copy
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import klas
from _stitch_helpers import one_thread, tiny_family  # noqa: F401  (autouse fixture)
from klas.families import count_flops, stitch_layer_flops
from klas.stages.s2_scores import ScoreAccumulator, stitch_score
from klas.stitch import StitchConfig, StitchedNet, StitchLayer, stitch_mse
from klas.stitch_path import PathNet, StitchPath, fit_path, path_flops, two_way_candidates, two_way_select


@pytest.fixture(scope="module")
def fam():
    return tiny_family()


def _randomise(layers, rng):
    with torch.no_grad():
        for lay in layers:
            for p in lay.parameters():
                p.copy_(torch.randn(p.shape, generator=rng) * 0.3)


@pytest.mark.parametrize("i,j,k,m", [(0, 0, 1, 0), (2, 0, 3, 3), (1, 1, 3, 2), (3, 0, 2, 3)])
def test_round_trip_forward_and_flops_equal_hand_composed(fam, rng, i, j, k, m):
    large, small = fam[2], fam[0]
    views = {v.name: v for v in fam}
    path = StitchPath.round_trip(large.name, i, small.name, j, k, m)
    net = PathNet(views, path).eval()
    _randomise(net.layers, rng)
    x = torch.randn(3, *large.input_shape, generator=rng)
    l1, l2 = net.layers
    with torch.no_grad():  # hand-composed from the anchors' timm modules
        ml, ms = large.model, small.model
        h = ml.norm_pre(ml._pos_embed(ml.patch_embed(x)))
        for blk in ml.blocks[:i + 1]:
            h = blk(h)
        h = h @ l1.linear.weight.T + l1.linear.bias
        for blk in ms.blocks[j + 1:k + 1]:
            h = blk(h)
        h = h @ l2.linear.weight.T + l2.linear.bias
        for blk in ml.blocks[m + 1:]:
            h = blk(h)
        ref = ml.forward_head(ml.norm(h))
        torch.testing.assert_close(net(x), ref, rtol=1e-5, atol=1e-5)
    assert path.key == f"{large.name}[:{i + 1}]->{small.name}[{j + 1}:{k + 1}]->{large.name}[{m + 1}:]"
    assert path.transitions() == [(large.name, i, small.name, j), (small.name, k, large.name, m)]
    counted = count_flops(net, x[:1])
    parts = (large.stem_flops + sum(b.flops for b in large.infos[:i + 1]) + stitch_layer_flops(large, i, small, j)
             + sum(b.flops for b in small.infos[j + 1:k + 1]) + stitch_layer_flops(small, k, large, m)
             + sum(b.flops for b in large.infos[m + 1:]) + large.head_flops)
    assert counted == path_flops(fam, path) == parts


@pytest.mark.parametrize("src,tgt,i,j", [(0, 2, 1, 2), (2, 0, 2, 1), (1, 0, 3, 0)])
def test_two_segment_path_is_the_one_way_stitch(fam, rng, src, tgt, i, j):
    """One-way stitching (either direction) is the 2-segment path: same key, forward, FLOPs."""
    s, t = fam[src], fam[tgt]
    layer = StitchLayer(s.feature_dim(i), t.feature_dim(j))
    _randomise([layer], rng)
    cfg = StitchConfig(s.name, i, t.name, j)
    path = StitchPath.from_config(cfg)
    net = PathNet({v.name: v for v in fam}, path, [layer]).eval()
    one = StitchedNet(s, i, t, j, layer).eval()
    x = torch.randn(2, *s.input_shape, generator=rng)
    with torch.no_grad():
        torch.testing.assert_close(net(x), one(x), rtol=0, atol=0)
    assert path.key == cfg.key and path_flops(fam, path) == one.flops == count_flops(net, x[:1])
    with pytest.raises(klas.KlasError, match="start"):
        StitchPath(((s.name, 1, None),))


def test_fit_path_fits_each_transition_by_least_squares(fam, rng):
    views = {v.name: v for v in fam}
    large, small = fam[2], fam[1]
    path = StitchPath.round_trip(large.name, 1, small.name, 0, 2, 2)
    images = [torch.randn(40, *large.input_shape, generator=rng) for _ in range(2)]
    net = fit_path(views, path, images)
    for layer, (a, i, b, j) in zip(net.layers, path.transitions()):
        fitted = stitch_mse(views[a], i, views[b], j, layer, images)
        # a least-squares map is no worse than any perturbation of it on its own fitting data
        bumped = StitchLayer(layer.linear.in_features, layer.linear.out_features)
        with torch.no_grad():
            bumped.linear.weight.copy_(layer.linear.weight + 1e-2 * torch.randn(layer.linear.weight.shape,
                                                                                generator=rng))
            bumped.linear.bias.copy_(layer.linear.bias)
        assert fitted < stitch_mse(views[a], i, views[b], j, bumped, images)


def test_scores_reverse_tables_are_the_swapped_kl(rng):
    """scores.reverse: D[large, i -> small, j] = mean_x KL(p_large,i || p_small,j), float64 reference."""
    names, depths, n, c = ["s", "l"], [3, 5], 37, 7
    acc = ScoreAccumulator(names, depths, reverse=True)
    logits = {a: torch.randn(d + 1, n, c, generator=rng) * 3 for a, d in zip(names, depths)}
    acc.update({a: t[:, :20] for a, t in logits.items()})
    acc.update({a: t[:, 20:] for a, t in logits.items()})
    res = acc.results()
    lp = {a: torch.log_softmax(t.double(), -1) for a, t in logits.items()}
    ref = torch.stack([torch.stack([(lp["l"][i].exp() * (lp["l"][i] - lp["s"][j])).sum(-1).mean()
                                    for j in range(3)]) for i in range(5)])
    np.testing.assert_allclose(res["D"][("l", "s")].numpy(), ref.numpy(), rtol=1e-4, atol=1e-6)
    assert ("l", "s") not in ScoreAccumulator(names, depths).cross  # off by default


def test_two_way_selection_scores_and_eq3(fam, rng):
    small, large = fam[0].name, fam[2].name
    ds, dl = fam[0].depth, fam[2].depth
    d_fwd = torch.rand(ds, dl, generator=rng, dtype=torch.float64) + 0.1
    d_rev = torch.rand(dl, ds, generator=rng, dtype=torch.float64) + 0.1
    d_rev[1, 2] = math.nan  # a pair the scores stage could not score
    cap = {small: torch.rand(ds, generator=rng, dtype=torch.float64) + 0.5,
           large: torch.rand(dl, generator=rng, dtype=torch.float64) + 0.5}
    s_fwd = stitch_score(d_fwd, cap[large], "ratio", 1.0)
    s_rev = stitch_score(d_rev, cap[small], "ratio", 1.0)
    from klas.stages.s3_selection import _records, candidate_table

    tab = candidate_table(fam, small, large, d_fwd, cap[large], s_fwd)
    fwd = _records(tab, [None] * len(tab["i"]))
    c = SimpleNamespace(pairs=[(small, large)], family=fam, klas_score={(small, large): s_fwd},
                        d={(small, large): d_fwd}, scores_folder="scores")
    tensors = {f"D/{large}/{small}": d_rev, f"cap/{small}": cap[small]}
    cand, sel = two_way_select(c, tensors, fwd, 3, 0.05, "ratio", 1.0)
    by_dir = {d: [r for r in cand if r["direction"] == d] for d in ("forward", "reverse", "round-trip")}
    assert len(by_dir["forward"]) == len(fwd)
    # reverse: every (i, j) but the NaN one; round trip: j < k, m >= i
    assert len(by_dir["reverse"]) == dl * ds - 1
    n_rt = sum(1 for i in range(dl) for j in range(ds) if (i, j) != (1, 2)
               for k in range(j + 1, ds) for m in range(i, dl))
    assert len(by_dir["round-trip"]) == n_rt
    for r in by_dir["round-trip"]:
        (_, _, e1), (_, s2, e2), (_, s3, _) = r["path"]
        i, j, k, m = e1 - 1, s2 - 1, e2 - 1, s3 - 1
        assert r["score"] == pytest.approx(float(s_rev[i, j] + s_fwd[k, m]), rel=1e-12)
        assert r["flops"] == path_flops(fam, StitchPath(tuple(map(tuple, r["path"]))))
    # Eq. 3 over all directions together, by brute force
    lo, hi = fam[small].flops, fam[large].flops
    bucket = {id(r): None if not lo <= r["flops"] <= hi else min((r["flops"] - lo) * 3 // (hi - lo), 2) for r in cand}
    best = {}
    for r in cand:
        if bucket[id(r)] is not None and r["score"] is not None:
            best[bucket[id(r)]] = min(best.get(bucket[id(r)], math.inf), r["score"])
    want = [r for r in cand if bucket[id(r)] is not None and r["score"] is not None
            and r["score"] <= best[bucket[id(r)]] * 1.05]
    assert sel == want and sel
    with pytest.raises(klas.KlasError, match="scores.reverse"):
        two_way_select(c, {}, fwd, 3, 0.05, "ratio", 1.0)


def test_round_trip_path_exports_to_onnx_with_parity(fam, rng):
    import onnxruntime as ort

    from klas.export.graph import export_onnx, standalone

    views = {v.name: v for v in fam}
    path = StitchPath.round_trip(fam[2].name, 1, fam[0].name, 0, 2, 2)
    net = PathNet(views, path).eval()
    _randomise(net.layers, rng)
    example = torch.randn(2, *fam[2].input_shape, generator=rng)
    module = standalone(net, example)
    model, _ = export_onnx(module, example, 18, "torchscript")
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.randn(5, *fam[2].input_shape, generator=rng)  # another batch size than the example
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        ref = copy.deepcopy(net).double()(x.double()).numpy()  # float64 reference (copies: the views are shared)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    assert sum(p.numel() for p in module.parameters()) < sum(p.numel() for p in net.parameters())


def test_finetune_refuses_two_way_rows_with_one_line(fam, tmp_path):
    from klas.stitched import read_selection

    row = dict(source="tv-32", i=1, target="tv-8", j=0, direction="round-trip", key="tv-32[:2]->tv-8[1:3]->tv-32[3:]",
               path=[["tv-32", 0, 2], ["tv-8", 1, 3], ["tv-32", 3, None]])
    sel = dict(family=fam.name, anchors=["tv-8", "tv-32"], selected=[row])
    with pytest.raises(klas.KlasError, match="two-way path"):
        read_selection(sel, fam, tmp_path / "selection.json")
    assert len(read_selection(dict(sel, selected=[dict(row, direction="forward", source="tv-8", target="tv-32")]),
                              fam)) == 3
