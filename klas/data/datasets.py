"""Image-classification datasets held in memory as uint8 tensors, and the deterministic split protocol.

Protocol (KLAS paper, App. B): probes and stitch layers train on ``train``, KL scores use ``val`` (a fixed,
seeded slice of the official training set), final accuracy is reported on the official ``test`` set.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from klas.data.idx import read_idx
from klas.data.safety import check_dataset, load_pickle, open_image
from klas.errors import KlasError

FASHION_MNIST_ROOT = Path(os.environ.get("KLAS_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
SPLITS = ("train", "val", "test")
SPLIT_SEED = 0


@dataclass(frozen=True)
class DataSpec:
    """What a model needs to know about its input."""

    name: str
    num_classes: int
    in_chans: int
    img_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...] = ()


@dataclass
class ImageSet:
    """A split held in memory: ``images`` uint8 [N, C, H, W], ``labels`` [N] class indices (int64), or [N, ...]
    targets of another task."""

    spec: DataSpec
    split: str
    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])  # targets may carry more than one value per sample (labels [N, ...])

    def normalize(self, images_u8: torch.Tensor) -> torch.Tensor:
        """uint8 images -> normalized float32, as the models were trained."""
        mean = torch.tensor(self.spec.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.spec.std).view(1, -1, 1, 1)
        return (images_u8.float() / 255.0 - mean) / std

    def subset(self, n: int | None) -> "ImageSet":
        """The first ``n`` samples (all when ``n`` is None); the order is already a fixed permutation."""
        if n is None or n >= len(self):
            return self
        return ImageSet(self.spec, self.split, self.images[:n], self.labels[:n])


FASHION_MNIST = DataSpec(
    name="fashion-mnist", num_classes=10, in_chans=1, img_size=28, mean=(0.2860,), std=(0.3530,),
    classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
             "Ankle boot"),
)
CIFAR100 = DataSpec("cifar100", 100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
"""CIFAR-100's statistics; the class names come from the root's ``meta`` file when it is read."""

BUILTIN_SPECS = {s.name: s for s in (FASHION_MNIST, CIFAR100)}
"""Datasets klas reads itself, with fixed classes, size and statistics (an ImageFolder's come from its folders)."""


def native_data_config(dataset: str | None) -> dict | None:
    """How a family trained on a built-in dataset sees its images when its input spec is silent: as they are
    (native size, no resize or crop), normalised with the dataset's own statistics -- the timm data-config keys.
    None for an ImageFolder (whose images have no native size: the architecture's pretrained cfg decides)."""
    spec = BUILTIN_SPECS.get(dataset)
    if spec is None:
        return None
    return dict(mean=spec.mean, std=spec.std, interpolation="bilinear", crop_pct=1.0, crop_mode="center")


FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find(root: Path, stem: str) -> Path:
    for cand in (root / f"{stem}.gz", root / stem):
        if cand.is_file():
            return cand
    expected = ", ".join(f"{a}[.gz]" for pair in FASHION_MNIST_FILES.values() for a in pair)
    raise KlasError(f"{root}: missing {stem}[.gz]; a Fashion-MNIST root holds {expected} "
                    f"(Debian: apt-get install dataset-fashion-mnist)")


def split_indices(n_total: int, n_val: int, seed: int = SPLIT_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic train/val partition of the official training set (a seeded permutation)."""
    if not 0 < n_val < n_total:
        raise KlasError(f"val size {n_val} must lie in (0, {n_total})")
    perm = torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))
    return perm[n_val:], perm[:n_val]


FOLDER_VAL = 10000  # images of root/train held out as klas's val split of an ImageFolder (at most a tenth of them)


def folder_split_indices(n_total: int, n_val: int = FOLDER_VAL) -> tuple[torch.Tensor, torch.Tensor]:
    """The ImageFolder protocol: klas's val is ``n_val`` images of ``root/train`` but at most a tenth of them (at
    least one), the rest is train; the folder's own ``val`` is the test split."""
    return split_indices(n_total, min(n_val, n_total // 10 or 1))


def load_fashion_mnist(split: str, root: Path | str | None = None, n_val: int = 5000) -> ImageSet:
    """Fashion-MNIST from the IDX files; ``val`` is ``n_val`` images held out of the official train set."""
    if split not in SPLITS:
        raise KlasError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
    root = Path(root) if root is not None else FASHION_MNIST_ROOT
    if not root.is_dir():
        raise KlasError(f"{root}: Fashion-MNIST directory not found (Debian: apt-get install dataset-fashion-mnist, "
                        f"or pass --data-root / set KLAS_FASHION_MNIST)")
    img_stem, lbl_stem = FASHION_MNIST_FILES["test" if split == "test" else "train"]
    images = read_idx(_find(root, img_stem))
    labels = read_idx(_find(root, lbl_stem))
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise KlasError(f"{root}: images {images.shape} and labels {labels.shape} do not form a dataset")
    x = torch.from_numpy(images.copy()).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    if split != "test":
        train_idx, val_idx = split_indices(len(y), n_val)
        idx = train_idx if split == "train" else val_idx
        x, y = x[idx], y[idx]
    return ImageSet(FASHION_MNIST, split, x.contiguous(), y)


def load_cifar100(split: str, root: Path | str, n_val: int = 5000) -> ImageSet:
    """CIFAR-100 from the python pickle directory (``train``, ``test``, ``meta`` files of cifar-100-python)."""
    if split not in SPLITS:
        raise KlasError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
    root = Path(root)
    fname = root / ("test" if split == "test" else "train")
    if not fname.is_file():
        raise KlasError(f"{root}: missing {fname.name}; a CIFAR-100 root (cifar-100-python) holds train, test, meta")
    d = load_pickle(fname, what="CIFAR-100 pickle")  # restricted: arrays and containers only (klas.data.safety)
    try:
        x = torch.from_numpy(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).copy())
        y = torch.tensor(d["fine_labels"], dtype=torch.int64)
    except (pickle.UnpicklingError, KeyError, ValueError, EOFError, TypeError, RuntimeError) as e:
        raise KlasError(f"{fname}: not a CIFAR-100 pickle (expected a dict with 'data' [N, 3072] uint8 and "
                        f"'fine_labels'; {type(e).__name__}: {str(e)[:80]})") from None
    names: tuple[str, ...] = ()
    if (root / "meta").is_file():
        meta = load_pickle(root / "meta", what="CIFAR-100 meta pickle")
        names = tuple(meta.get("fine_label_names", ())) if isinstance(meta, dict) else ()
    spec = replace(CIFAR100, classes=names)
    if split != "test":
        train_idx, val_idx = split_indices(len(y), n_val)
        idx = train_idx if split == "train" else val_idx
        x, y = x[idx], y[idx]
    return ImageSet(spec, split, x.contiguous(), y)


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def load_image_folder(split: str, root: Path | str, img_size: int = 224, n_val: int = FOLDER_VAL,
                      max_images: int | None = None) -> ImageSet:
    """ImageNet-layout folders (``root/train/<class>/*.jpg``, ``root/val/<class>/*.jpg``) resized into memory.

    ``val`` here is the klas scoring split, held out of ``root/train``; the folder's own ``val`` is the test set,
    as is usual for ImageNet where the official test labels are not public.
    """
    from torchvision import datasets, transforms

    if split not in SPLITS:
        raise KlasError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
    sub = Path(root) / ("val" if split == "test" else "train")
    if not sub.is_dir():
        raise KlasError(f"{root}: missing {sub.name}/; an ImageFolder root holds train/<class>/* and val/<class>/*")
    tf = transforms.Compose([transforms.Resize(int(img_size * 256 / 224)), transforms.CenterCrop(img_size),
                             transforms.PILToTensor()])
    try:
        ds = datasets.ImageFolder(str(sub), transform=tf, loader=open_image)  # pixel limit (klas.data.safety)
    except FileNotFoundError as e:  # torchvision: a class folder without image files, or no class folders
        raise KlasError(f"{sub}: {(str(e).splitlines() or ['no image files'])[0][:200]}") from None
    idx = torch.arange(len(ds))
    if split != "test":
        train_idx, val_idx = folder_split_indices(len(ds), n_val)
        idx = train_idx if split == "train" else val_idx
    if max_images is not None:
        idx = idx[:max_images]
    pairs = [ds[int(i)] for i in idx]
    x = torch.stack([p[0] for p in pairs]) if pairs else torch.empty(0, 3, img_size, img_size, dtype=torch.uint8)
    y = torch.tensor([p[1] for p in pairs], dtype=torch.int64)
    spec = DataSpec(f"imagefolder:{Path(root).name}", len(ds.classes), 3, img_size, IMAGENET_MEAN, IMAGENET_STD,
                    tuple(ds.classes))
    return ImageSet(spec, split, x, y)


DATASETS = {"fashion-mnist": load_fashion_mnist, "cifar100": load_cifar100, "imagefolder": load_image_folder}


def load_dataset(name: str, split: str, root: Path | str | None = None, **kw) -> ImageSet:
    """Load ``split`` of dataset ``name`` (one of ``DATASETS``) from ``root``."""
    if name not in DATASETS:
        raise KlasError(f"dataset {name!r}: expected one of {', '.join(DATASETS)}")
    if name != "fashion-mnist" and root is None:
        raise KlasError(f"dataset {name!r} needs a root directory (--data-root)")
    data = DATASETS[name](split, root, **kw)
    check_dataset(data, f"dataset {name} ({split}, {root or FASHION_MNIST_ROOT})")  # labels, image shape
    return data
