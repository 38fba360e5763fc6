"""Data: IDX reader, Fashion-MNIST protocol split, CIFAR-100 and ImageFolder loaders, batch augmentation."""
import gzip
import pickle

import numpy as np
import pytest
import torch

from klas.data import augment, batches, load_dataset, load_fashion_mnist, split_indices
from klas.data.idx import read_idx
from klas.errors import KlasError


def _write_idx(path, arr: np.ndarray, compress: bool):
    code = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D, np.dtype(">i2"): 0x0B}[arr.dtype]
    header = bytes([0, 0, code, arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
    data = header + arr.tobytes()
    (gzip.open if compress else open)(path, "wb").write(data)


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("shape,dtype", [((7, 5, 3), np.uint8), ((11,), ">i4")])
def test_idx_roundtrip(tmp_path, compress, shape, dtype):
    arr = np.random.default_rng().integers(0, 255 if dtype == np.uint8 else 2**30, size=shape).astype(dtype)
    p = tmp_path / ("x.idx.gz" if compress else "x.idx")
    _write_idx(p, arr, compress)
    out = read_idx(p, expect=None)
    assert out.shape == shape and np.array_equal(out, arr.astype(out.dtype))


def test_idx_malformed(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(KlasError, match="bad magic"):
        read_idx(bad)
    trunc = tmp_path / "trunc"
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(trunc, arr, False)
    trunc.write_bytes(trunc.read_bytes()[:-3])
    with pytest.raises(KlasError, match="payload"):
        read_idx(trunc)


@pytest.mark.parametrize("dtype,name", [(">f4", "float32 \\(code 0x0D\\)"), (">i2", "int16 \\(code 0x0B\\)")])
def test_idx_of_another_data_type_is_refused_not_reinterpreted(tmp_path, monkeypatch, dtype, name):
    """Fashion-MNIST-style files whose header declares float or int16 data: one line naming the file and both
    types, from the reader and through the dataset loader (before: read as if they were bytes)."""
    from klas.data.datasets import load_fashion_mnist

    root = tmp_path / "fm"
    root.mkdir()
    rng = np.random.default_rng(0)
    _write_idx(root / "train-images-idx3-ubyte.gz", rng.random((20, 28, 28)).astype(dtype), True)
    _write_idx(root / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, 20).astype(np.uint8), True)
    with pytest.raises(KlasError, match=rf"train-images-idx3-ubyte.gz: IDX data type {name}; expected unsigned "
                                        r"byte \(code 0x08\)"):
        load_fashion_mnist("train", root, n_val=5)
    assert read_idx(root / "train-labels-idx1-ubyte.gz").shape == (20,)  # bytes are still read


def test_fashion_mnist_protocol():
    train, val, test = (load_fashion_mnist(s) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (55000, 5000, 10000)
    assert train.images.shape[1:] == (1, 28, 28) and train.images.dtype == torch.uint8
    assert set(test.labels.unique().tolist()) == set(range(10))
    # the split is a deterministic partition of the official train set
    tr, va = split_indices(60000, 5000)
    tr2, va2 = split_indices(60000, 5000)
    assert torch.equal(tr, tr2) and torch.equal(va, va2)
    assert len(set(tr.tolist()) | set(va.tolist())) == 60000 and not set(tr.tolist()) & set(va.tolist())
    assert torch.equal(load_fashion_mnist("val").labels, val.labels)


def test_fashion_mnist_missing_root(tmp_path):
    with pytest.raises(KlasError, match="not found"):
        load_fashion_mnist("train", tmp_path / "nowhere")
    (tmp_path / "fm").mkdir()
    with pytest.raises(KlasError, match="missing train-images-idx3-ubyte"):
        load_fashion_mnist("train", tmp_path / "fm")
    with pytest.raises(KlasError, match="split"):
        load_fashion_mnist("holdout")


def test_cifar100_pickles(tmp_path):
    rng = np.random.default_rng()
    for name, n in (("train", 60), ("test", 20)):
        d = {"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8), "fine_labels": rng.integers(0, 100, n).tolist()}
        pickle.dump(d, open(tmp_path / name, "wb"))
    pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)]}, open(tmp_path / "meta", "wb"))
    tr = load_dataset("cifar100", "train", tmp_path, n_val=10)
    va = load_dataset("cifar100", "val", tmp_path, n_val=10)
    te = load_dataset("cifar100", "test", tmp_path)
    assert (len(tr), len(va), len(te)) == (50, 10, 20)
    assert tr.images.shape[1:] == (3, 32, 32) and tr.spec.num_classes == 100 and tr.spec.classes[3] == "c3"
    raw = pickle.load(open(tmp_path / "test", "rb"))
    assert np.array_equal(te.images[5].numpy().reshape(-1), raw["data"][5])
    (tmp_path / "test").write_bytes(b"garbage")
    with pytest.raises(KlasError, match="not a CIFAR-100 pickle"):
        load_dataset("cifar100", "test", tmp_path)


def test_image_folder(tmp_path):
    from PIL import Image
    rng = np.random.default_rng()
    for sub in ("train", "val"):
        for c in ("cat", "dog"):
            (tmp_path / sub / c).mkdir(parents=True)
            for k in range(10):
                Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(tmp_path / sub / c / f"{k}.png")
    te = load_dataset("imagefolder", "test", tmp_path, img_size=32)
    va = load_dataset("imagefolder", "val", tmp_path, img_size=32)
    assert te.images.shape == (20, 3, 32, 32) and te.spec.classes == ("cat", "dog") and len(va) == 2
    with pytest.raises(KlasError, match="missing train/"):
        load_dataset("imagefolder", "train", tmp_path / "cat")
    with pytest.raises(KlasError, match="needs a root"):
        load_dataset("imagefolder", "train")


def test_augment_is_a_shift_or_flip(rng):
    x = torch.randint(1, 256, (64, 1, 9, 11), dtype=torch.uint8, generator=rng)
    out = augment(x, torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng))), pad=2)
    assert out.shape == x.shape
    # each output equals the zero-padded input, possibly flipped, shifted by some (dy, dx) in [-2, 2]^2
    for k in range(64):
        ok = False
        for flip in (False, True):
            src = x[k].flip(-1) if flip else x[k]
            padded = torch.nn.functional.pad(src, (2, 2, 2, 2))
            for dy in range(5):
                for dx in range(5):
                    if torch.equal(padded[:, dy:dy + 9, dx:dx + 11], out[k]):
                        ok = True
        assert ok, f"image {k} is not a shifted/flipped copy"


def test_batches_cover_and_shard():
    data = load_fashion_mnist("val").subset(103)
    seen = torch.cat([y for _, y in batches(data, 10)])
    assert torch.equal(seen, data.labels)
    g1 = torch.Generator().manual_seed(3)
    whole = [y for _, y in batches(data, 10, shuffle=True, gen=g1)]
    shards = [[y for _, y in batches(data, 10, shuffle=True, gen=torch.Generator().manual_seed(3), rank=r,
                                     world_size=2)] for r in range(2)]
    for k, y in enumerate(whole):
        assert sorted(y.tolist()) == sorted(shards[0][k].tolist() + shards[1][k].tolist())
    x, _ = next(batches(data, 8))
    assert x.dtype == torch.float32 and abs(float(x.mean())) < 1.5
