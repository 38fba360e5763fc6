"""Block views of every supported timm architecture, built small with random weights.

For each architecture: the view reproduces the model's own forward at every split point (float64), its stage-end
outputs are the tensors timm's own ``forward_intermediates`` returns, the FLOPs of stem + blocks + head equal the
whole model's count (and, for convolution/linear-only nets, a count made independently from module hooks, part by
part), and two widths of the architecture have stitch points at which a stitched network built by klas runs.
"""
import functools
import math

import pytest
import timm
import torch
import torch.nn as nn

import klas
from klas.errors import KlasError
from klas.families import blockview as bv
from klas.families import block_view, count_flops, input_note, register_view, stitchable, stitched_flops
from klas.stitch import StitchedNet, StitchLayer, lstsq_layer

NUM_CLASSES = 7
TINY_LEVIT = dict(img_size=64, key_dim=8, num_heads=(2, 2, 2), depth=(1, 2, 1))
TINY_CONVNEXT = dict(depths=(1, 1, 2, 1))

# name -> (timm model, constructor overrides, input shape, view class name). Every model here is small (<= ~1.2 M
# parameters, <= ~25 MFLOPs) at a small input size.
MODELS = {
    "deit-a": ("deit_tiny_patch16_224", dict(img_size=32, patch_size=8, embed_dim=24, depth=3, num_heads=2),
               (3, 32, 32), "ViTView"),
    "deit-b": ("deit_tiny_patch16_224", dict(img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=4),
               (3, 32, 32), "ViTView"),
    "swin-a": ("swin_tiny_patch4_window7_224", dict(img_size=64, embed_dim=16, depths=(1, 1, 3, 1),
                                                    num_heads=(1, 1, 2, 2), window_size=4), (3, 64, 64), "SwinView"),
    "swin-b": ("swin_tiny_patch4_window7_224", dict(img_size=64, embed_dim=24, depths=(1, 2, 2, 1),
                                                    num_heads=(1, 2, 2, 4), window_size=4), (3, 64, 64), "SwinView"),
    # ResNet: basic blocks (64..512 channels) and bottlenecks (256..2048), one or two blocks per stage
    "resnet-a": ("resnet18", dict(layers=(1, 1, 2, 1)), (3, 32, 32), "ResNetView"),
    "resnet-b": ("resnet50", dict(layers=(1, 1, 1, 1)), (3, 32, 32), "ResNetView"),
    # EfficientNet-style: TinyNet-E / -C (width 0.51 / 0.84), native sizes 106 / 184, both run at 32
    "efficientnet-a": ("tinynet_e", dict(), (3, 32, 32), "EfficientNetView"),
    "efficientnet-b": ("tinynet_c", dict(), (3, 32, 32), "EfficientNetView"),
    "mobilenetv2-a": ("mobilenetv2_035", dict(), (3, 32, 32), "EfficientNetView"),
    "mobilenetv2-b": ("mobilenetv2_050", dict(), (3, 32, 32), "EfficientNetView"),
    "mobilenetv3-a": ("mobilenetv3_small_050", dict(), (3, 32, 32), "MobileNetV3View"),
    "mobilenetv3-b": ("mobilenetv3_small_075", dict(), (3, 32, 32), "MobileNetV3View"),
    # ConvNeXt: one width with 1x1-conv MLPs (NCHW), the other with linear MLPs on NHWC: both of timm's code paths
    "convnext-a": ("convnext_atto", dict(TINY_CONVNEXT, dims=(8, 16, 24, 32)), (3, 64, 64), "ConvNeXtView"),
    "convnext-b": ("convnext_atto", dict(TINY_CONVNEXT, dims=(16, 32, 48, 64), conv_mlp=False), (3, 64, 64),
                   "ConvNeXtView"),
    "regnet-a": ("regnetx_002", dict(depth=8), (3, 64, 64), "RegNetView"),
    "regnet-b": ("regnetx_004", dict(depth=12), (3, 64, 64), "RegNetView"),
    "regnety": ("regnety_002", dict(depth=8), (3, 64, 64), "RegNetView"),  # squeeze-excitation blocks
    # LeViT: distilled (two heads averaged in eval) on tokens; the conv build on NCHW maps
    "levit-a": ("levit_128s", dict(TINY_LEVIT, embed_dim=(16, 32, 48)), (3, 64, 64), "LevitView"),
    "levit-b": ("levit_128s", dict(TINY_LEVIT, embed_dim=(24, 48, 64)), (3, 64, 64), "LevitView"),
    "levit-conv": ("levit_conv_128s", dict(TINY_LEVIT, embed_dim=(16, 32, 48)), (3, 64, 64), "LevitView"),
}
PAIRS = {arch: (f"{arch}-a", f"{arch}-b") for arch in
         ("deit", "swin", "resnet", "efficientnet", "mobilenetv2", "mobilenetv3", "convnext", "regnet", "levit")}
HIERARCHICAL = [k for k in MODELS if not k.startswith("deit")]
CNNS = [k for k in MODELS if k.split("-")[0] in ("resnet", "efficientnet", "mobilenetv2", "mobilenetv3", "convnext",
                                                 "regnet", "regnety")]


def _model(key, dtype=torch.float32):
    arch, kw, shape, _ = MODELS[key]
    torch.manual_seed(sum(map(ord, key)))
    model = timm.create_model(arch, pretrained=False, num_classes=NUM_CLASSES, **kw).eval().to(dtype)
    return model, shape


@functools.cache
def _build(key, dtype=torch.float32):
    """(model, view, input shape), built once per module run: tests only read them (stitched nets built on top of a
    view leave it untouched)."""
    model, shape = _model(key, dtype)
    return model, block_view(model, key, shape), shape


def _to_nchw(view, h):
    """A block output in timm's intermediate layout (NCHW): NHWC maps are permuted, token rows made square."""
    if not view.channels_last:
        return h
    if h.dim() == 4:
        return h.permute(0, 3, 1, 2)
    side = math.isqrt(h.shape[1])
    return h.transpose(1, 2).reshape(h.shape[0], h.shape[2], side, side)


@pytest.mark.parametrize("key", list(MODELS))
def test_view_class_and_every_split_reproduce_forward(key):
    model, view, shape = _build(key, torch.float64)
    assert type(view).__name__ == MODELS[key][3]
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2.0
    with torch.no_grad():
        ref = model(x)
        assert ref.shape == (2, NUM_CLASSES) and ref.abs().max() > 0
        h = view.forward_stem(x)
        for k in range(view.depth + 1):  # h: stem -> blocks[:k], run one block at a time
            out = view.forward_head(view.forward_blocks(h, k))
            torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12, msg=f"{key}: split after {k} blocks")
            h = view.forward_blocks(h, k, k + 1)
        outs, logits = view.forward_all(x)
    torch.testing.assert_close(logits, ref, rtol=1e-12, atol=1e-12)
    assert len(outs) == view.depth >= 3
    assert [tuple(o.shape[1:]) for o in outs] == [b.shape for b in view.infos]
    assert [b.stage for b in view.infos] == sorted(b.stage for b in view.infos)
    assert view.pool(outs[-1]).shape == (2, view.feature_dim(view.depth - 1))
    assert not model.training
    # no timm module runs twice or is skipped: the blocks are distinct modules and hold parameters
    assert len({id(b) for b in view.blocks}) == view.depth
    assert all(sum(p.numel() for p in b.parameters()) > 0 for b in view.blocks)


@pytest.mark.parametrize("key", HIERARCHICAL)
def test_stage_ends_are_timms_intermediates(key):
    """timm's own forward_intermediates (its feature_info taps) must be tensors the view produces at a split point:
    an independent reference for where the view puts stage boundaries."""
    model, view, shape = _build(key, torch.float64)
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        feats = model.forward_intermediates(x, intermediates_only=True)
        stem = view.forward_stem(x)
        outs, _ = view.forward_all(x)
    ours = [_to_nchw(view, h) for h in [stem, *outs]]
    # taps finer than the stem's output are inside the stem (ResNet's act1, before its max-pool): not split points
    taps = [(n, f) for n, f in enumerate(feats) if f.shape[-1] <= ours[0].shape[-1]]
    assert len(taps) >= 3
    for n, f in taps:
        hits = [k for k, o in enumerate(ours) if o.shape == f.shape and torch.allclose(o, f, rtol=1e-12, atol=1e-12)]
        assert hits, f"{key}: timm intermediate {n} {tuple(f.shape)} is no split point of the view"
    # the last stage's output is the last block's output
    torch.testing.assert_close(ours[-1], feats[-1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("key", list(MODELS))
def test_flops_of_parts_sum_to_the_models_count(key):
    model, view, shape = _build(key)
    whole = count_flops(model, torch.randn(1, *shape))
    assert whole > 0 and view.flops == whole
    assert view.stem_flops > 0 and view.head_flops > 0 and all(b.flops > 0 for b in view.infos)


def _hook_flops(fn, x, modules) -> int:
    """2 x MACs of every Conv2d / Linear called inside ``fn(x)``, from the shapes their forward hooks see (biases not
    counted): an independent count, no flop_counter involved."""
    total = [0]

    def hook(mod, inp, out):
        per_out = mod.weight.shape[1] * math.prod(mod.weight.shape[2:]) if isinstance(mod, nn.Conv2d) \
            else mod.in_features
        total[0] += 2 * (out.numel() // out.shape[0]) * per_out

    handles = [m.register_forward_hook(hook) for m in modules if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            fn(x)
    finally:
        for h in handles:
            h.remove()
    return total[0]


@pytest.mark.parametrize("key", CNNS)
def test_flops_per_part_match_an_independent_count(key):
    """CNNs compute only convolutions and linear maps: each part's FLOPs must equal the module-hook count."""
    model, view, shape = _build(key)
    mods = list(model.modules())
    x = torch.randn(1, *shape)
    assert _hook_flops(model, x, mods) == view.flops
    with torch.no_grad():
        h = view.forward_stem(x)
        assert _hook_flops(view.forward_stem, x, mods) == view.stem_flops
        for blk, info in zip(view.blocks, view.infos):
            assert _hook_flops(blk, h, mods) == info.flops, f"{key}: {info.name}"
            h = blk(h)
        assert _hook_flops(view.forward_head, h, mods) == view.head_flops


@pytest.mark.parametrize("key", ["resnet-a", "efficientnet-a", "mobilenetv3-a", "convnext-b", "regnet-a", "levit-a",
                                 "levit-conv", "swin-a"])
def test_identity_stitch_is_the_model(key):
    """A stitch of an anchor onto itself with an identity layer is the anchor, at every block: the stitch layer
    (per token, or 1x1 conv on NCHW) reads the view's layout correctly."""
    model, view, shape = _build(key, torch.float64)
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        ref = model(x)
        for i in range(view.depth):
            d = view.feature_dim(i)
            layer = StitchLayer(d, d, view.channels_last).double()
            layer.set_affine(torch.eye(d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64))
            torch.testing.assert_close(StitchedNet(view, i, view, i, layer)(x), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("arch", list(PAIRS))
def test_stitched_configurations_between_two_widths(arch):
    a_key, b_key = PAIRS[arch]
    (_, a, shape), (_, b, _) = _build(a_key), _build(b_key)
    assert a.widths != b.widths  # two widths of one architecture
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(8, *shape, generator=gen)
    with torch.no_grad():
        feats = {a.name: a.forward_all(x)[0], b.name: b.forward_all(x)[0]}
    for src, tgt in ((a, b), (b, a)):
        pairs = [(i, j) for i in range(src.depth) for j in range(tgt.depth) if stitchable(src, i, tgt, j)]
        assert pairs, f"{arch}: no stitchable block pair {src.name} -> {tgt.name}"
        # every resolution both anchors have offers a stitch
        assert {src.spatial(i) for i, _ in pairs} == {src.spatial(i) for i in range(src.depth)} & \
            {tgt.spatial(j) for j in range(tgt.depth)}
        # per resolution, the corner stitch points (first/last block on either side; the last ones leave only the
        # target's head) run end to end
        corners = set()
        for res in {src.spatial(i) for i, _ in pairs}:
            group = [(i, j) for i, j in pairs if src.spatial(i) == res]
            i_s, j_s = {i for i, _ in group}, {j for _, j in group}
            corners |= {(i, j) for i in (min(i_s), max(i_s)) for j in (min(j_s), max(j_s))}
        assert all(stitchable(src, i, tgt, j) for i, j in corners)
        for i, j in sorted(corners):
            layer = StitchLayer(src.feature_dim(i), tgt.feature_dim(j), src.channels_last)
            with torch.no_grad():
                out = StitchedNet(src, i, tgt, j, layer).eval()(x[:2])
            assert out.shape == (2, NUM_CLASSES) and torch.isfinite(out).all(), (src.name, i, tgt.name, j)
        # klas's least-squares initialisation fits the source's features onto the target's at one of them
        i, j = min(pairs, key=lambda p: src.feature_dim(p[0]) * tgt.feature_dim(p[1]))
        layer = lstsq_layer(feats[src.name][i], feats[tgt.name][j], src.channels_last, ridge=1e-3)
        with torch.no_grad():
            hs = layer(feats[src.name][i])
            out = StitchedNet(src, i, tgt, j, layer).eval()(x)
        assert hs.shape == feats[tgt.name][j].shape and torch.isfinite(out).all()
        assert (hs - feats[tgt.name][j]).square().mean() < feats[tgt.name][j].var()  # better than the mean
        i, j = pairs[len(pairs) // 2]
        net = StitchedNet(src, i, tgt, j, StitchLayer(src.feature_dim(i), tgt.feature_dim(j), src.channels_last))
        assert count_flops(net.eval(), x[:1]) == stitched_flops(src, i, tgt, j) == net.flops
        bad = [(i, j) for i in range(src.depth) for j in range(tgt.depth) if not stitchable(src, i, tgt, j)]
        if bad:
            i, j = bad[0]
            with pytest.raises(ValueError, match="not stitchable"):
                StitchedNet(src, i, tgt, j, StitchLayer(src.feature_dim(i), tgt.feature_dim(j), src.channels_last))


def test_split_granularity():
    """Where the views put their blocks (see the blockview module docstring for why)."""
    m, v, _ = _build("efficientnet-b")
    assert v.depth == sum(len(s) for s in m.blocks) and v.block_names[:3] == ["blocks.0.0", "blocks.1.0", "blocks.1.1"]
    # EfficientNet's stride-16 stages (40 and 64 channels here) share a resolution: stitches may cross them
    assert stitchable(v, v.block_names.index("blocks.3.0"), v, v.block_names.index("blocks.4.2"))
    m, v, _ = _build("convnext-a")
    assert v.block_names == ["stages.0.blocks.0", "stages.1.blocks.0", "stages.2.blocks.0", "stages.2.blocks.1",
                             "stages.3.blocks.0"]
    assert v.spatial(0) == (16, 16) and v.spatial(1) == (8, 8)  # stage 1's downsample runs inside its first block
    m, v, _ = _build("levit-a")
    assert v.block_names == ["stages.0.blocks.0", "stages.1.downsample", "stages.1.blocks.0", "stages.1.blocks.1",
                             "stages.2.downsample", "stages.2.blocks.0"]
    assert [v.tokens(i) for i in range(v.depth)] == [16, 4, 4, 4, 1, 1] and v.channels_last
    _, vc, _ = _build("levit-conv")
    assert not vc.channels_last and vc.spatial(1) == (2, 2)
    assert not bv.same_layout(v, 1, vc, 1) and bv.cross_layout(v, 1, vc, 1)  # tokens -> NCHW: across layouts
    _, v, _ = _build("regnet-a")
    assert v.block_names[0] == "s1.b1" and {b.stage for b in v.infos} == {0, 1, 2, 3}


def test_one_input_size_for_anchors_of_different_native_sizes(monkeypatch):
    """TinyNet-E and -C were made for 106 and 184 pixels: the family runs both at its one input_shape, says so, and
    their maps line up for stitching."""
    from klas.families._registry import _FAMILIES, AnchorCfg, FamilyCfg
    cfg = FamilyCfg(name="test-tinynet", anchors=(AnchorCfg("tn-e", "tinynet_e", dict(num_classes=NUM_CLASSES)),
                                                  AnchorCfg("tn-c", "tinynet_c", dict(num_classes=NUM_CLASSES))),
                    input_shape=(3, 64, 64), num_classes=NUM_CLASSES)
    monkeypatch.setitem(_FAMILIES, cfg.name, cfg)
    fam = klas.create_family(cfg.name)
    assert [a.input_shape for a in fam] == [(3, 64, 64)] * 2
    assert [a.native_input_shape for a in fam] == [(3, 106, 106), (3, 184, 184)]
    assert fam.input_shape == (3, 64, 64)
    assert fam.input_note == "input 3x64x64 for every anchor (native: tn-e 3x106x106, tn-c 3x184x184)"
    assert any(stitchable(fam[0], i, fam[1], j) for i in range(fam[0].depth) for j in range(fam[1].depth))
    # another size is one argument away, and every anchor follows it
    fam96 = klas.create_family(cfg.name, input_shape=(3, 96, 96))
    assert {a.spatial(0) for a in fam96} == {(48, 48)}
    mixed = [fam[0], fam96[1]]
    assert "different input sizes" in input_note(mixed)


def test_fixed_size_architecture_at_another_size_is_one_line_error():
    model, _ = _model("levit-a")  # LeViT's attention biases are built for 64x64
    with pytest.raises(KlasError, match=r"'levit-a' \(LevitDistilled\) cannot run at input 3x96x96") as e:
        block_view(model, "levit-a", (3, 96, 96))
    assert "\n" not in str(e.value)


def test_registry_most_specific_class_and_unknown_architecture(monkeypatch):
    bv._register_builtins()  # before the copy: the registrations below must not outlive this test
    monkeypatch.setattr(bv, "_VIEWS", dict(bv._VIEWS))
    monkeypatch.setattr(bv, "_PREDICATES", list(bv._PREDICATES))
    from timm.models.levit import LevitDistilled
    model, _ = _model("levit-a")
    assert isinstance(model, LevitDistilled) and bv.view_class(model) is bv.LevitView  # inherited from Levit

    class Unknown(nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(KlasError, match=r"'u' \(Unknown\): no block view") as e:
        block_view(Unknown(), "u", (3, 8, 8))
    msg = str(e.value)
    assert "\n" not in msg and all(n in msg for n in ("EfficientNet", "MobileNetV3", "ConvNeXt", "RegNet", "Levit",
                                                      "VisionTransformer", "SwinTransformer", "ResNet"))

    class MyResNetView(bv.ResNetView):
        pass

    from timm.models.resnet import ResNet

    class MyResNet(ResNet):
        pass

    register_view(MyResNet, MyResNetView)
    mine = MyResNet(block=timm.models.resnet.BasicBlock, layers=(1, 1, 1, 1), num_classes=3).eval()
    assert type(block_view(mine, "mine", (3, 32, 32))) is MyResNetView  # the subclass's own entry wins
    assert bv.view_class(timm.create_model("resnet18", num_classes=3)) is bv.ResNetView  # the base is unchanged

    class Tiny(nn.Module):  # duck-typed: a predicate registers a view for any model with ``layer1``..``layer4``
        def __init__(self):
            super().__init__()
            self.r = MyResNet(block=timm.models.resnet.BasicBlock, layers=(1, 1, 1, 1), num_classes=3)

    class TinyView(bv.ResNetView):
        def __init__(self, model, name, input_shape):
            super().__init__(model.r, name, input_shape)

    register_view(lambda m: isinstance(m, Tiny), TinyView, "Tiny-like")
    assert type(block_view(Tiny().eval(), "t", (3, 32, 32))) is TinyView
    assert "Tiny-like" in bv.supported_views()
    with pytest.raises(TypeError):
        register_view(ResNet, object)
