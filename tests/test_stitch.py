"""Stitch layers: least-squares fit against a float64 reference, layouts, FLOPs and parameters of stitched networks,
the gradient objectives (task loss, FuLA), and least squares beating a random stitch on real trained anchors."""
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

import klas
from _stitch_helpers import one_thread, tiny_family  # noqa: F401  (autouse fixture)
from klas.data import batches, load_dataset
from klas.families import block_view, count_flops, stitch_layer_flops, stitched_flops
from klas.research.metrics import FittedScorer
from klas.stitch import (FitCfg, Moments, StitchConfig, StitchedNet, StitchLayer, fit_stitch, fula_loss, fula_scales,
                         lstsq_layer, stitch_objective, target_latents, used_parameters)


def _lstsq_reference(x: np.ndarray, y: np.ndarray):
    x1 = np.concatenate([x, np.ones((x.shape[0], 1))], axis=1)
    sol = np.linalg.lstsq(x1, y, rcond=None)[0]
    return sol[:-1], sol[-1]


@pytest.mark.parametrize("n,d_in,d_out", [(1000, 7, 13), (257, 33, 1), (6, 9, 4), (64, 16, 64)])
@pytest.mark.parametrize("scale,offset", [(1.0, 0.0), (1e4, 1e4), (1e-3, -5.0)])
def test_least_squares_matches_float64_reference(rng, n, d_in, d_out, scale, offset):
    x = torch.randn(n, d_in, generator=rng, dtype=torch.float64) * scale + offset
    y = x @ torch.randn(d_in, d_out, generator=rng, dtype=torch.float64) / scale \
        + torch.randn(n, d_out, generator=rng, dtype=torch.float64) * 0.3 + 2.0
    mom = Moments(d_in, d_out)
    cuts = sorted(set(torch.randint(0, n, (3,), generator=rng).tolist()) | {0, n})  # uneven, maybe empty batches
    for a, b in zip(cuts, cuts[1:]):
        mom.update(x[a:b].float() if scale == 1.0 else x[a:b], y[a:b])
    w, b = mom.solve()
    xs = x.float().double() if scale == 1.0 else x
    w_ref, b_ref = _lstsq_reference(xs.numpy(), y.numpy())
    pred, pred_ref = (xs @ w + b).numpy(), xs.numpy() @ w_ref + b_ref
    # the fitted map is unique even when the system is rank-deficient (n < d_in + 1): compare predictions
    np.testing.assert_allclose(pred, pred_ref, rtol=1e-7, atol=1e-7 * np.abs(pred_ref).max())
    if n > 4 * d_in:
        np.testing.assert_allclose(w.numpy(), w_ref, rtol=1e-6, atol=1e-8 * np.abs(w_ref).max())


@pytest.mark.parametrize("channels_last", [True, False])
def test_stitch_layer_is_per_token_linear_or_1x1_conv(rng, channels_last):
    layer = StitchLayer(5, 11, channels_last=channels_last)
    w, b = torch.randn(5, 11, generator=rng) * 3, torch.randn(11, generator=rng)
    layer.set_affine(w, b)
    if channels_last:
        h = torch.randn(3, 17, 5, generator=rng) * 100
        ref = h.double() @ w.double() + b.double()
    else:
        h = torch.randn(2, 5, 7, 3, generator=rng) * 100
        ref = F.conv2d(h.double(), w.double().T[:, :, None, None], b.double())
    torch.testing.assert_close(layer(h).double(), ref, rtol=1e-5, atol=1e-3)


def test_config_roundtrip_and_validation():
    c = StitchConfig("a", 3, "b", 5)
    assert StitchConfig.from_dict(c.to_dict()) == c and c.key == "a[:4]->b[6:]" and not c.is_anchor
    assert StitchConfig.anchor("a").is_anchor
    with pytest.raises(klas.KlasError, match="integer i, j"):
        StitchConfig.from_dict({"source": "a", "i": "x", "target": "b", "j": 1})
    with pytest.raises(klas.KlasError, match="i = j = -1"):
        StitchConfig.from_dict({"source": "a", "i": 2, "target": "a", "j": 2})


@pytest.fixture(scope="module")
def fam():
    return tiny_family()


@pytest.mark.parametrize("i,j", [(0, 0), (2, 1), (3, 2), (1, 2)])
def test_stitched_flops_are_parts_sum(fam, i, j):
    src, tgt = fam[0], fam[2]
    layer = StitchLayer(src.feature_dim(i), tgt.feature_dim(j))
    net = StitchedNet(src, i, tgt, j, layer).eval()
    x = torch.randn(1, *src.input_shape)
    whole = count_flops(net, x)
    # each part counted on its own with torch.utils.flop_counter
    h = src.forward_stem(x)
    parts = count_flops(src.forward_stem, x)
    parts += count_flops(lambda t: src.forward_blocks(t, 0, i + 1), h)
    hs = src.forward_blocks(h, 0, i + 1)
    parts += count_flops(layer, hs)
    ht = layer(hs)
    parts += count_flops(lambda t: tgt.forward_blocks(t, j + 1), ht)
    parts += count_flops(tgt.forward_head, tgt.forward_blocks(ht, j + 1))
    assert whole == parts == stitched_flops(src, i, tgt, j) == net.flops
    assert count_flops(layer, hs) == stitch_layer_flops(src, i, tgt, j) == 2 * 17 * src.widths[i] * tgt.widths[j]


def test_stitched_flops_cnn_layout():
    r18 = block_view(timm.create_model("resnet18", num_classes=5).eval(), "r18", (3, 32, 32))
    r34 = block_view(timm.create_model("resnet34", num_classes=5).eval(), "r34", (3, 32, 32))
    i, j = 2, 4  # stage 2 of both (layer2.0 of r18, layer2.1 of r34): 128 channels at 4x4
    assert r18.infos[i].stage == r34.infos[j].stage
    net = StitchedNet(r18, i, r34, j, StitchLayer(r18.feature_dim(i), r34.feature_dim(j), channels_last=False))
    assert count_flops(net.eval(), torch.randn(1, 3, 32, 32)) == stitched_flops(r18, i, r34, j)


def test_used_parameters_count_only_the_modules_run(fam):
    src, tgt = fam[0], fam[1]
    assert used_parameters(src, src.input_shape) == src.num_params
    i, j = 1, 2
    net = StitchedNet(src, i, tgt, j, StitchLayer(src.feature_dim(i), tgt.feature_dim(j)))

    def count(mods):
        return sum(p.numel() for m in mods for p in m.parameters())

    m_s, m_t = src.model, tgt.model
    ref = (count([m_s.patch_embed, *m_s.blocks[:i + 1], net.layer, *m_t.blocks[j + 1:], m_t.norm, m_t.fc_norm,
                  m_t.head]) + m_s.cls_token.numel() + m_s.pos_embed.numel())
    assert net.num_params == ref < src.num_params + tgt.num_params


def _fula_reference(net, x, x_fit):
    """FuLA in float64 from its definition (docs/method.md): sum_k w_k MSE(h_k, t_k) / mean(t_k^2 over x_fit) over the
    stitch point and each downstream target block, w_k = (k+1) / sum(k+1)."""
    src, tgt, layer = net.src.double(), net.tgt.double(), net.layer.double()

    def target(images):
        ht = tgt.forward_blocks(tgt.forward_stem(images.double()), 0, net.j + 1)
        out = [ht]
        for k in range(net.j + 1, tgt.depth):
            out.append(tgt.blocks[k](out[-1]))
        return out

    hs = layer(src.forward_blocks(src.forward_stem(x.double()), 0, net.i + 1))
    preds = [hs]
    for k in range(net.j + 1, tgt.depth):
        preds.append(tgt.blocks[k](preds[-1]))
    n = len(preds)
    w = [(k + 1) / (n * (n + 1) / 2) for k in range(n)]
    out = sum(w[k] * ((p - t) ** 2).mean() / (f ** 2).mean()
              for k, (p, t, f) in enumerate(zip(preds, target(x), target(x_fit))))
    src.float(), tgt.float(), layer.float()
    return out


def _fula(net, x, x_fit):
    """klas.stitch's FuLA objective of ``net`` on ``x``, normalised by the target latents of ``x_fit``."""
    return stitch_objective(net, "fula", fula_scales([target_latents(net.tgt, x_fit, net.j)]))(x, None)


def test_fula_loss_matches_definition_and_vanishes_on_identity(rng):
    fam = tiny_family()
    src, tgt = fam[0], fam[2]
    net = StitchedNet(src, 2, tgt, 1, StitchLayer(src.feature_dim(2), tgt.feature_dim(1)))
    x, x_fit = (torch.randn(n, *src.input_shape, generator=rng) * 3 for n in (5, 9))
    torch.testing.assert_close(_fula(net, x, x_fit).double(), _fula_reference(net, x, x_fit), rtol=1e-4, atol=1e-6)
    # an anchor stitched onto itself through the identity reproduces all its latents: loss 0
    same = StitchedNet(tgt, 1, tgt, 1, StitchLayer(tgt.feature_dim(1), tgt.feature_dim(1)))
    same.layer.set_affine(torch.eye(tgt.feature_dim(1)), torch.zeros(tgt.feature_dim(1)))
    assert _fula(same, x, x_fit).item() < 1e-10


def test_fula_init_and_fula_metric_are_one_objective(rng):
    """The issue's check: ``--init fula`` (klas.stitch) and ``--method fula`` (FittedScorer) compute the same loss.
    With no gradient steps the metric's stitch is the least-squares one, so its validation score must equal the init
    objective of that very layer on the validation images, normalised by the training latents."""
    fam = tiny_family()
    src, tgt = fam[0], fam[1]
    x_tr, x_va = (torch.randn(n, *src.input_shape, generator=rng) for n in (48, 20))
    y_tr, y_va = (torch.randint(0, 10, (n,), generator=rng) for n in (48, 20))
    scorer = FittedScorer([src, tgt], x_tr, y_tr, x_va, y_va, FitCfg(steps=0))
    try:
        for i, j in [(1, 0), (2, 2), (3, 1)]:
            with torch.no_grad():
                layer = lstsq_layer(src.forward_blocks(src.forward_stem(x_tr), 0, i + 1),
                                    tgt.forward_blocks(tgt.forward_stem(x_tr), 0, j + 1))
                init = _fula(StitchedNet(src, i, tgt, j, layer), x_va, x_tr).item()
            assert scorer.fula(src.name, i, tgt.name, j) == pytest.approx(init, rel=1e-4)
    finally:
        scorer.close()


def test_fula_loss_rejects_mismatched_depths():
    fam = tiny_family()
    tgt = fam[1]
    h = torch.randn(2, 17, tgt.feature_dim(1))
    with pytest.raises(ValueError, match="FuLA at target block 1"):
        fula_loss(h, tgt, 1, target_latents(tgt, torch.randn(2, 1, 28, 28), 2), torch.ones(2))


@pytest.fixture(scope="module")
def data():
    return load_dataset("fashion-mnist", "train").subset(1024), load_dataset("fashion-mnist", "val").subset(500)


@pytest.fixture(scope="module")
def trained():
    """The shipped trained fmnist-deit Ti and S anchors."""
    return klas.create_family("fmnist-deit", pretrained=True, anchors=["fmnist-deit-ti", "fmnist-deit-s"])


def _objective(method, net, x, y):
    with torch.no_grad():
        return (_fula(net, x, x) if method == "fula" else F.cross_entropy(net(x), y)).item()


@pytest.mark.parametrize("method", ["task", "fula"])
def test_gradient_objectives_improve_on_least_squares(trained, data, method):
    src, tgt = trained[0], trained[1]
    before = [p.detach().clone() for p in list(src.parameters()) + list(tgt.parameters())]
    i, j = 5, 4
    ls, _ = fit_stitch(src, i, tgt, j, data[0], FitCfg(method="ls", samples=256))
    layer, st = fit_stitch(src, i, tgt, j, data[0], FitCfg(method=method, samples=256, steps=20, batch_size=64))
    x, y = next(batches(data[0].subset(256), 256))
    # the objective, on fixed images, is lower after the fit than at its least-squares starting point
    assert _objective(method, StitchedNet(src, i, tgt, j, layer), x, y) < \
        _objective(method, StitchedNet(src, i, tgt, j, ls), x, y)
    assert st["loss_first"] is not None and st["loss_last"] is not None
    after = list(src.parameters()) + list(tgt.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, after))  # anchors stay frozen


def test_least_squares_init_beats_random_on_trained_anchors(trained, data):
    """The issue's check, on the shipped trained fmnist-deit Ti and S: before any finetuning, the least-squares
    stitch gives a lower task loss (and lower stitch-point error) than a randomly initialised one."""
    src, tgt = trained[0], trained[1]
    train, val = data
    for i, j in [(3, 3), (8, 6)]:
        losses = {}
        for method in ("ls", "random"):
            layer, st = fit_stitch(src, i, tgt, j, train, FitCfg(method=method, samples=512, batch_size=256))
            net = StitchedNet(src, i, tgt, j, layer).eval()
            with torch.no_grad():
                losses[method] = sum(F.cross_entropy(net(x), y, reduction="sum").item()
                                     for x, y in batches(val, 250)) / len(val)
            losses[method + "_mse"] = st["stitch_mse"]
        assert losses["ls"] < losses["random"] and losses["ls_mse"] < losses["random_mse"], losses
