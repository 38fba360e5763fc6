"""Block view over timm architectures (random weights, small inputs) and the family registry."""
import pytest
import timm
import torch

import klas
from klas.errors import KlasError
from klas.families import block_view, count_flops, stitch_layer_flops, stitchable, stitched_flops

# Small instances of the three supported architecture types: (timm name, overrides, input shape)
ARCHS = {
    "deit": ("deit_tiny_patch16_224", dict(img_size=32, patch_size=8, embed_dim=24, depth=3, num_heads=2), (3, 32, 32)),
    "swin": ("swin_tiny_patch4_window7_224", dict(img_size=64, embed_dim=16, depths=(1, 1, 3, 1), num_heads=(1, 1, 2, 2),
                                                  window_size=4), (3, 64, 64)),
    "resnet": ("resnet18", dict(), (3, 48, 48)),
}


def _build(kind, num_classes=7):
    name, kw, shape = ARCHS[kind]
    model = timm.create_model(name, num_classes=num_classes, **kw).eval()
    return model, block_view(model, kind, shape), shape


@pytest.mark.parametrize("kind", list(ARCHS))
def test_block_view_reproduces_forward(kind, rng):
    model, view, shape = _build(kind)
    x = torch.randn(3, *shape, generator=rng) * 2.0
    with torch.no_grad():
        ref = model(x)
        assert torch.equal(view(x), ref)
        # any split point: stem + blocks[:k] + blocks[k:] + head is the same network
        for k in range(view.depth + 1):
            h = view.forward_blocks(view.forward_stem(x), 0, k)
            torch.testing.assert_close(view.forward_head(view.forward_blocks(h, k)), ref, rtol=0, atol=0)
        outs, logits = view.forward_all(x)
        assert torch.equal(logits, ref) and len(outs) == view.depth
        assert all(tuple(o.shape[1:]) == info.shape for o, info in zip(outs, view.infos))
    assert not model.training


@pytest.mark.parametrize("kind", list(ARCHS))
def test_flops_of_parts_sum_to_whole(kind):
    model, view, shape = _build(kind)
    whole = count_flops(model, torch.randn(1, *shape))
    assert whole > 0 and view.flops == whole
    assert view.stem_flops > 0 and all(b.flops > 0 for b in view.infos)


def test_stage_structure_and_stitchability():
    _, swin, _ = _build("swin")
    assert [b.stage for b in swin.infos] == [0, 1, 2, 2, 2, 3]
    assert stitchable(swin, 2, swin, 4) and not stitchable(swin, 1, swin, 2)
    _, res, _ = _build("resnet")
    assert [b.stage for b in res.infos] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert res.spatial(0) == (12, 12) and res.feature_dim(0) == 64
    # NCHW vs NHWC: not per token, but across layouts (a MixedStitchLayer)
    from klas.families.blockview import cross_layout, same_layout

    assert not same_layout(res, 0, swin, 0) and cross_layout(res, 0, swin, 0) and stitchable(res, 0, swin, 0)


def test_stitched_flops_formula():
    fam = klas.create_family("fmnist-deit")
    ti, b = fam[0], fam[2]
    assert stitch_layer_flops(ti, 3, b, 5) == 2 * 17 * 16 * 64
    f = stitched_flops(ti, 3, b, 5)
    assert f == ti.stem_flops + sum(x.flops for x in ti.infos[:4]) + 2 * 17 * 16 * 64 + \
        sum(x.flops for x in b.infos[6:]) + b.head_flops
    assert ti.flops < f < b.flops


def test_registry_and_ordering():
    assert {"deit", "swin", "resnet", "fmnist-deit"} <= set(klas.list_families())
    fam = klas.create_family("fmnist-deit")
    flops = [a.flops for a in fam]
    assert flops == sorted(flops) and 3.5 < flops[1] / flops[0] < 4.5 and 3.5 < flops[2] / flops[1] < 4.5
    assert [a.depth for a in fam] == [12, 12, 12]
    with pytest.raises(KlasError, match="unknown; registered"):
        klas.create_family("nope")
    with pytest.raises(KlasError, match="unknown anchor"):
        klas.create_family("fmnist-deit", anchors=["fmnist-deit-xl"])


def test_local_weights_file_through_timm(tmp_path, rng):
    """Offline users point a hub family at local files: loaded by timm's own pretrained path."""
    from safetensors.torch import save_file
    src = timm.create_model("resnet18", num_classes=1000)
    with torch.no_grad():
        for p in src.parameters():
            p.normal_(generator=rng)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "resnet18.safetensors"))
    fam = klas.create_family("resnet", weights=tmp_path, anchors=["resnet18"], input_shape=(3, 32, 32))
    got = fam["resnet18"].model.state_dict()
    for k, v in src.state_dict().items():
        assert torch.equal(got[k], v), k
    # a new dataset: same backbone, classifier replaced (timm drops the 1000-class head)
    fam10 = klas.create_family("resnet", weights=tmp_path, anchors=["resnet18"], num_classes=10,
                               input_shape=(3, 32, 32))
    assert fam10[0].model.fc.out_features == 10
    assert torch.equal(fam10[0].model.conv1.weight, src.conv1.weight)
    with pytest.raises(KlasError, match="no weights file for anchor 'resnet34'"):
        klas.create_family("resnet", weights=tmp_path, anchors=["resnet34"], input_shape=(3, 32, 32))
