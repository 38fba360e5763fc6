"""The data interface of every stage (``klas.data.open_split`` + ``batches``): in memory or streamed from disk by a
DataLoader with workers, the family's timm preprocessing, identical batches either way."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from _user_fixtures import CLASSES, make_image_folder
from klas.config import DataConfig
from klas.data import ImageSet, StreamSet, batches, load_dataset, open_split
from klas.errors import KlasError
from klas.families import AnchorCfg, FamilyCfg, register_family

RGB32 = FamilyCfg("test-stream-rgb32", (AnchorCfg("a", "resnet18"), AnchorCfg("b", "resnet18")), (3, 32, 32),
                  dataset="imagefolder", num_classes=4,
                  input=dict(interpolation="bicubic", crop_pct=0.875, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3)),
                  source="test")
GREY24 = FamilyCfg("test-stream-grey24", RGB32.anchors, (1, 24, 24), dataset="imagefolder", num_classes=4,
                   input=dict(interpolation="bilinear", crop_pct=1.0, mean=(0.4,), std=(0.3,)), source="test")
for _f in (RGB32, GREY24):
    register_family(_f)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("folder"), n_train=25, n_val=6, size=40, rgb=True)


def _reference(folder: Path, sub: str, data_config: dict, channels: int) -> torch.Tensor:
    """timm's own eval transform, image by image (PIL, channel conversion first), in ImageFolder order."""
    from PIL import Image
    from timm.data import create_transform

    tf = create_transform(**data_config, is_training=False)
    files = [f for c in sorted(CLASSES) for f in sorted((folder / sub / c).glob("*.png"))]
    return torch.stack([tf(Image.open(f).convert("L" if channels == 1 else "RGB")) for f in files])


@pytest.mark.parametrize("fam", [RGB32, GREY24])
def test_eval_batches_are_timms_transform(folder, fam):
    """Test split, streamed with 2 workers: every image equals timm's create_transform(**data_config) (resize to
    36 bicubic + centre crop 32 for RGB32; RGB files converted to one channel and resized to 24 for GREY24)."""
    dc = fam.data_config
    assert dc["input_size"] == fam.input_shape
    test = open_split(fam, "test", DataConfig(in_memory="no", workers=2), root=folder)
    assert isinstance(test, StreamSet) and len(test) == 4 * 6
    xs, ys = zip(*batches(test, 7))
    x, y = torch.cat(xs), torch.cat(ys)
    ref = _reference(folder, "val", dc, fam.input_shape[0])
    assert x.shape == ref.shape == (24, *fam.input_shape)
    # uint8 after the image stage, then /255 - mean / std: timm's ToTensor + Normalize up to float rounding
    assert torch.allclose(x, ref, atol=1e-5, rtol=0)
    assert y.tolist() == [k for k in range(4) for _ in range(6)]


def test_in_memory_and_streamed_give_identical_batches(folder):
    """Same split, same seed: shuffled, augmented (light), sharded batches are bit-identical in memory and streamed
    (0 and 2 workers), and the klas val split is held out of train."""
    mem = open_split(RGB32, "train", DataConfig(in_memory="yes"), root=folder)
    st0 = open_split(RGB32, "train", DataConfig(in_memory="no", workers=0), root=folder)
    st2 = open_split(RGB32, "train", DataConfig(in_memory="no", workers=2), root=folder)
    val = open_split(RGB32, "val", DataConfig(in_memory="no"), root=folder)
    assert isinstance(mem, ImageSet) and isinstance(st2, StreamSet)
    assert len(mem) == len(st2) == 90 and len(val) == 10
    assert torch.equal(mem.labels, st2.labels)
    for kw in (dict(), dict(shuffle=True, train_augment=True, drop_last=True), dict(shuffle=True, rank=1, world_size=2)):
        runs = []
        for d in (mem, st0, st2):
            g = torch.Generator().manual_seed(3)
            runs.append([(x.clone(), y.clone()) for x, y in batches(d, 16, gen=g, **kw)])
        assert len(runs[0]) == len(runs[1]) == len(runs[2]) > 0
        for a, b, c in zip(*runs):
            assert torch.equal(a[0], b[0]) and torch.equal(a[0], c[0]) and torch.equal(a[1], c[1])
    # a val image is never a train image (the split is a partition of root/train)
    tr_names = {st2.source.names[i] for i in st2.index.tolist()}
    assert not tr_names & {val.source.names[i] for i in val.index.tolist()}


def test_timm_train_transform_is_seeded_and_random(folder):
    """Inputs above 64 px get timm's per-image train transform (random resized crop, flip, jitter): reproducible
    for a seed whatever the worker count, different across epochs, and not the eval images."""
    big = FamilyCfg("test-stream-rgb72", RGB32.anchors, (3, 72, 72), dataset="imagefolder", num_classes=4,
                    source="test")
    register_family(big)
    d0 = open_split(big, "train", DataConfig(workers=0), root=folder, augment=True)
    d2 = open_split(big, "train", DataConfig(workers=2), root=folder, augment=True)
    assert isinstance(d2, StreamSet) and d2.train_mode == "timm"
    a = [x for x, _ in batches(d0, 32, shuffle=True, gen=torch.Generator().manual_seed(1), train_augment=True)]
    b = [x for x, _ in batches(d2, 32, shuffle=True, gen=torch.Generator().manual_seed(1), train_augment=True)]
    c = [x for x, _ in batches(d2, 32, shuffle=True, gen=torch.Generator().manual_seed(2), train_augment=True)]
    e = [x for x, _ in batches(d2, 32, shuffle=True, gen=torch.Generator().manual_seed(1))]
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[0], e[0])


def test_embedded_family_keeps_its_exact_data():
    """fmnist-deit: 28 x 28 grey, its own mean/std, no resize or crop -- the very ImageSet of before."""
    d = open_split("fmnist-deit", "val")
    raw = load_dataset("fashion-mnist", "val")
    assert isinstance(d, ImageSet) and d.spec == raw.spec and torch.equal(d.images, raw.images)
    x, _ = next(batches(d, 64))
    assert torch.equal(x, (raw.images[:64].float() / 255 - 0.2860) / 0.3530)


def test_array_dataset_resized_for_another_family():
    """Fashion-MNIST fed to an RGB 32 x 32 family: converted to 3 channels and resized by timm's transform."""
    from PIL import Image
    from timm.data import create_transform

    fam = FamilyCfg("test-stream-rgb32-10", RGB32.anchors, (3, 32, 32), dataset="fashion-mnist", num_classes=10,
                    input=RGB32.input, source="test")
    register_family(fam)
    d = open_split(fam, "test", DataConfig(in_memory="no", workers=0)).subset(5)
    raw = load_dataset("fashion-mnist", "test").subset(5)
    x, _ = next(batches(d, 5))
    tf = create_transform(**fam.data_config, is_training=False)
    ref = torch.stack([tf(Image.fromarray(raw.images[i, 0].numpy(), "L").convert("RGB")) for i in range(5)])
    assert x.shape == (5, 3, 32, 32) and torch.allclose(x, ref, atol=1e-5, rtol=0)


def test_folder_errors_are_one_line(tmp_path, folder):
    with pytest.raises(KlasError, match="missing train/"):
        open_split(RGB32, "train", DataConfig(), root=tmp_path)
    with pytest.raises(KlasError, match="needs a root directory"):
        open_split(RGB32, "train", DataConfig(dataset="imagefolder"))
    bad = make_image_folder(tmp_path / "bad", n_train=3, n_val=1, size=16, rgb=False)
    (bad / "train" / sorted(CLASSES)[0] / "broken.png").write_bytes(b"not a png")
    with pytest.raises(KlasError, match=r"broken\.png"):
        for split in ("train", "val"):  # wherever the seeded split put it
            list(batches(open_split(GREY24, split, DataConfig(in_memory="no", workers=0), root=bad), 64))
    two = FamilyCfg("test-stream-2cls", RGB32.anchors, (3, 32, 32), dataset="imagefolder", num_classes=2,
                    source="test")
    register_family(two)
    with pytest.raises(KlasError, match="has 4 classes, but the anchors of family test-stream-2cls predict 2"):
        open_split(two, "val", DataConfig(), root=folder)
