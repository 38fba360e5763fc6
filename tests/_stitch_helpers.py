"""Shared by the stitch / supernet / evaluation tests: a tiny registered ViT family and selection.json fixtures."""
import json

import pytest
import torch

from klas.families import AnchorCfg, FamilyCfg, create_family, get_family_cfg, register_family

TINY = "klas-test-vit"
WIDTHS = (8, 16, 32)


def tiny_family():
    """Three 4-block ViTs (widths 8/16/32, 17 tokens) on Fashion-MNIST with random weights: fast to build and train."""
    try:
        get_family_cfg(TINY)
    except Exception:
        register_family(FamilyCfg(
            name=TINY, input_shape=(1, 28, 28), dataset="fashion-mnist", num_classes=10,
            anchors=tuple(AnchorCfg(f"tv-{w}", "vit_tiny_patch16_224",
                                    dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, depth=4, mlp_ratio=2.0,
                                         embed_dim=w, num_heads=max(1, w // 8))) for w in WIDTHS)))
    return create_family(TINY)


def write_selection(path, stitches, anchors=("tv-8", "tv-32"), family=TINY, method="test"):
    """A selection.json in the selection stage's schema; ``stitches`` are (source, i, target, j)."""
    sel = dict(family=family, method=method, params={}, anchors=list(anchors), anchor_pairs=[], candidates=[],
               selected=[dict(source=s, i=i, target=t, j=j, flops=None, D=None, cap=None, score=None, bucket=None)
                         for s, i, t, j in stitches])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(sel))
    return path


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core box, two OpenMP threads competing with other processes can make these
    tiny models 10-50x slower (spin-waiting), while one thread is never worse for them."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)
