"""Stitching across layouts (klas.stitch.MixedStitchLayer): every CNN <-> transformer pair of registered block views
(ResNet, EfficientNet, MobileNetV2/V3, ConvNeXt, RegNet against DeiT, Swin, LeViT), random weights, small inputs.
Per pair and direction: legal stitch points exist, the stitched forward equals one composed by hand from the two
timm models' parts with independent tensor code, its FLOPs equal the flop counter's, and least squares fits both
maps (grid and prefix tokens) as an independent float64 solver does."""
import functools

import pytest
import torch
import torch.nn.functional as F

from test_blockviews import MODELS, NUM_CLASSES

from klas.families import block_view, count_flops, stitched_flops
from klas.families.blockview import cross_layout
from klas.stitch import MixedStitchLayer, StitchedNet, make_stitch_layer, stitch_moments

CNNS = ["resnet-a", "efficientnet-a", "mobilenetv2-a", "mobilenetv3-a", "convnext-a", "regnet-a"]
TRANSFORMERS = ["deit-a", "swin-a", "levit-a"]
COMBOS = [(c, t) for c in CNNS for t in TRANSFORMERS]


@functools.cache
def _view(key, shape):
    import timm

    arch, kw, _, _ = MODELS[key]
    torch.manual_seed(sum(map(ord, key)))
    model = timm.create_model(arch, pretrained=False, num_classes=NUM_CLASSES, **kw).eval().double()
    return block_view(model, key, shape)


def _pair(cnn, trans):
    shape = MODELS[trans][2]  # transformers are built for one size; CNNs run at it
    return _view(cnn, shape), _view(trans, shape), shape


def _randomize(layer, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * (0.3 if p.dim() > 1 else 0.1))
    return layer


def _as_grid(view, h):
    """Independent of Layout: a block output as (prefix or None, NCHW grid), from the view's kind and the timm
    model's own attributes."""
    name = type(view).__name__
    if not view.channels_last:
        return None, h
    if h.dim() == 4:  # Swin: NHWC
        return None, h.permute(0, 3, 1, 2)
    p = int(getattr(view.model, "num_prefix_tokens", 0)) if name == "ViTView" else 0
    n = h.shape[1] - p
    side = int(round(n ** 0.5))
    return (h[:, :p] if p else None), h[:, p:].transpose(1, 2).reshape(h.shape[0], h.shape[2], side, side)


def _from_grid(view, like, prefix, grid):
    if not view.channels_last:
        return grid
    if like.dim() == 4:
        return grid.permute(0, 2, 3, 1)
    tokens = grid.flatten(2).transpose(1, 2)
    return tokens if prefix is None else torch.cat([prefix, tokens], 1)


def _hand(src, i, tgt, j, layer, x):
    """The stitched forward composed by hand: source stem + blocks 0..i, the grid resampled with adaptive average
    pooling or bilinear interpolation, W x + b per position by einsum, the prefix tokens from the pooled grid, the
    target's blocks j+1.. and head."""
    hs = src.forward_blocks(src.forward_stem(x), 0, i + 1)
    ht_like = tgt.forward_blocks(tgt.forward_stem(x[:1]), 0, j + 1)
    _, g = _as_grid(src, hs)
    pre_t, g_t = _as_grid(tgt, ht_like)
    size = g_t.shape[2:]
    if g.shape[2:] != size:
        g = F.adaptive_avg_pool2d(g, size) if g.shape[2] >= size[0] and g.shape[3] >= size[1] else \
            F.interpolate(g, size=size, mode="bilinear", align_corners=False)
    y = torch.einsum("bchw,dc->bdhw", g, layer.linear.weight) + layer.linear.bias[None, :, None, None]
    pre = None
    if pre_t is not None:
        pre = (g.mean((2, 3)) @ layer.prefix.weight.T + layer.prefix.bias).view(x.shape[0], pre_t.shape[1], -1)
    h = _from_grid(tgt, ht_like, pre, y)
    return tgt.forward_head(tgt.forward_blocks(h, j + 1))


@pytest.mark.parametrize("cnn,trans", COMBOS)
def test_cnn_transformer_stitches_both_ways(cnn, trans):
    a, b, shape = _pair(cnn, trans)
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for src, tgt in ((a, b), (b, a)):
        pairs = [(i, j) for i in range(src.depth) for j in range(tgt.depth) if cross_layout(src, i, tgt, j)]
        assert pairs, f"no legal stitch point {src.name} -> {tgt.name}"
        for k, (i, j) in enumerate(sorted({pairs[0], pairs[len(pairs) // 2], pairs[-1]})):
            layer = make_stitch_layer(src, i, tgt, j)
            assert isinstance(layer, MixedStitchLayer)
            net = StitchedNet(src, i, tgt, j, _randomize(layer.double(), 10 * k + i + j)).eval()
            with torch.no_grad():
                out = net(x)
                want = _hand(src, i, tgt, j, layer, x)
            assert out.shape == (3, NUM_CLASSES) and torch.isfinite(out).all()
            assert torch.allclose(out, want, rtol=1e-9, atol=1e-9), (src.name, i, tgt.name, j, layer.describe())
            with torch.no_grad():
                assert count_flops(net, x[:1]) == stitched_flops(src, i, tgt, j) == net.flops


@pytest.mark.parametrize("cnn,trans", [("resnet-a", "deit-a"), ("convnext-a", "swin-a"), ("regnet-a", "levit-a")])
def test_least_squares_fits_both_maps(cnn, trans):
    """The moments klas accumulates solve to what an independent float64 least-squares solver gives on the same
    rows (the grid map at every position; the prefix map per image), in both directions."""
    a, b, shape = _pair(cnn, trans)
    x = torch.randn(24, *shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for src, tgt in ((a, b), (b, a)):
        pairs = [(i, j) for i in range(src.depth) for j in range(tgt.depth) if cross_layout(src, i, tgt, j)]
        i, j = min(pairs, key=lambda p: src.feature_dim(p[0]) * tgt.feature_dim(p[1]))
        layer = make_stitch_layer(src, i, tgt, j).double()
        moms = stitch_moments(src, i, tgt, j, [x[:12], x[12:]], layer)
        layer.set_affines([m.solve(1e-8) for m in moms])
        with torch.no_grad():
            hs = src.forward_blocks(src.forward_stem(x), 0, i + 1)
            ht = tgt.forward_blocks(tgt.forward_stem(x), 0, j + 1)
        for k, (xr, yr) in enumerate(zip(layer.ls_rows(hs), layer.ls_targets(ht))):
            if xr.shape[0] <= xr.shape[1]:  # the per-image prefix map: too few rows here to be determined
                continue
            ones = torch.cat([xr, torch.ones(len(xr), 1, dtype=xr.dtype)], 1)
            sol = torch.linalg.lstsq(ones, yr, driver="gelsd").solution
            lin = layer.linear if k == 0 else layer.prefix
            # NOTE: features of random nets can be nearly rank-deficient, where solvers differ in what they cut off;
            # what must hold is optimality: klas's fit is as good as the reference least-squares solution
            with torch.no_grad():
                mine, ref = (lin(xr) - yr).square().mean(), (ones @ sol - yr).square().mean()
            assert mine <= ref * (1 + 1e-3) + 1e-12, (src.name, tgt.name, k, float(mine), float(ref))
            assert ref < yr.var()  # and both beat the mean
        with torch.no_grad():
            fit = layer(hs)
        assert fit.shape == ht.shape
        assert (fit - ht).square().mean() < ht.var()  # better than predicting the mean


def test_mixed_stitches_export_to_onnx():
    """Fashion-MNIST-sized anchors (a ResNet's 7x7 / 4x4 / 2x2 maps, a ViT's 4x4 tokens + class token): the
    adaptive 7x7 -> 4x4 pooling (a fixed averaging matrix), the 2x2 -> 4x4 interpolation and the tokens -> map
    direction all export to ONNX and agree with float64 PyTorch."""
    import timm

    from klas.export.graph import export_onnx, standalone
    from klas.export.parity import float64_parity

    torch.manual_seed(0)
    cnn = block_view(timm.create_model("resnet18", in_chans=1, num_classes=10, layers=(1, 1, 1, 1),
                                       channels=(8, 16, 32, 64), stem_width=8).eval(), "r", (1, 28, 28))
    vit = block_view(timm.create_model("vit_tiny_patch16_224", img_size=28, patch_size=7, in_chans=1, num_classes=10,
                                       depth=3, embed_dim=16, num_heads=1).eval(), "v", (1, 28, 28))
    seen = set()
    for src, i, tgt, j in ((cnn, 0, vit, 0), (cnn, 2, vit, 1), (vit, 1, cnn, 1)):
        layer = _randomize(make_stitch_layer(src, i, tgt, j), i + j)
        seen.add(layer.resample)
        net = StitchedNet(src, i, tgt, j, layer).eval()
        x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(i))
        module = standalone(net, x)
        model, info = export_onnx(module, x, 18)
        p = float64_parity(model.SerializeToString(), module, torch.randn(3, 1, 28, 28), 3)
        assert p.same_shape and p.relative_diff < 1e-4, (layer.describe(), info)
        with torch.no_grad():
            assert count_flops(net, x[:1]) == stitched_flops(src, i, tgt, j)
    assert seen == {"adaptive-avgpool", "bilinear", "identity"}
