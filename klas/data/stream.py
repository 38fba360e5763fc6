"""The one data interface of the stages: ``open_split(family, split, data)`` -> a split that ``klas.data.batches``
turns into normalized float batches, either held in memory (``ImageSet``, uint8) or streamed from disk
(``StreamSet``: a ``torch.utils.data.DataLoader`` with worker processes).

Preprocessing is the family's (``Family.data_config``, a timm data config) through timm's own transforms:
``timm.data.create_transform(**data_config, is_training=...)``. Its image stage (resize with the family's
interpolation, centre crop by ``crop_pct``; for training timm's random resized crop, flip and colour jitter) runs per
image, after the image is converted to the channels the family expects (grayscale or RGB, whatever the file holds),
and yields uint8 [C, H, W]; its tensor stage (``ToTensor`` + ``Normalize``: x / 255, minus mean, over std) runs on
whole batches in the main process, where the light augmentation of small images (random shifts, flips;
``klas.data.loader.augment``) also runs. So an in-memory split (the uint8 images after the image stage, decoded
once) and the same split streamed from disk give *identical* batches (``tests/test_streaming.py``); memory use of
the streamed one does not grow with the number of images (file names and labels only, as numpy arrays, which
forked workers share without copying).

Sharding under torchrun is the in-memory one: each rank takes ``idx[rank::world]`` of every global batch (a
distributed sampler that keeps the union of the shards equal to the single-process batch, which the DDP loss
scaling relies on).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from klas.data.datasets import BUILTIN_SPECS, SPLITS, DataSpec, ImageSet, folder_split_indices, load_dataset
from klas.errors import KlasError

IMG_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")
SMALL_INPUT = 64  # train_transform = auto: light augmentation up to this input size, timm's above


def open_image(path: Path | str):
    """Decode one image file (PIL, pixel-limited: ``klas.data.safety.open_image``); any failure is one line naming
    the file. The channel conversion is ``Preprocess.convert``'s."""
    from klas.data.safety import open_image as safe_open

    return safe_open(path, mode=None)


# --------------------------------------------------------------------------------------------------- transforms
class Preprocess:
    """The family's transforms split in two: ``image(pil, train)`` -> uint8 [C, H, W] (channel conversion, then
    timm's image stage) and ``normalize(uint8 batch)`` -> float (timm's ``ToTensor`` + ``Normalize``)."""

    def __init__(self, data_config: dict):
        from timm.data import create_transform

        self.config = dict(data_config)
        self.channels = int(data_config["input_size"][0])
        self.size = tuple(int(s) for s in data_config["input_size"][1:])
        kw = {k: data_config[k] for k in ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")}
        self.eval_stage = _image_stage(create_transform(**kw, is_training=False))
        self.train_stage = _image_stage(create_transform(**kw, is_training=True))
        self.mean = torch.tensor(data_config["mean"], dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(data_config["std"], dtype=torch.float32).view(1, -1, 1, 1)

    def convert(self, img):
        """Grayscale or RGB, whatever the file holds, to the family's channels."""
        want = "L" if self.channels == 1 else "RGB"
        return img if img.mode == want else img.convert(want)

    def image(self, img, train: bool = False) -> torch.Tensor:
        out = (self.train_stage if train else self.eval_stage)(self.convert(img))
        x = torch.from_numpy(np.asarray(out, dtype=np.uint8).copy())
        x = x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)
        if tuple(x.shape) != (self.channels, *self.size):
            raise KlasError(f"preprocessing produced {tuple(x.shape)}, expected {(self.channels, *self.size)}")
        return x.contiguous()

    def normalize(self, x_u8: torch.Tensor) -> torch.Tensor:
        return (x_u8.float() / 255.0 - self.mean) / self.std

    def is_identity(self, shape: tuple[int, ...]) -> bool:
        """Whether the eval image stage leaves images of ``shape`` (C, H, W) unchanged (no resize, no crop)."""
        h, w = self.size
        return tuple(shape) == (self.channels, h, w) and \
            math.floor(h / self.config["crop_pct"]) == h and math.floor(w / self.config["crop_pct"]) == w


def _image_stage(tf):
    """The transforms of a timm Compose before its ``ToTensor`` (what acts on PIL images)."""
    from torchvision import transforms

    stage = []
    for t in getattr(tf, "transforms", [tf]):
        if type(t).__name__ in ("MaybeToTensor", "ToTensor", "Normalize", "MaybePILToTensor", "PILToTensor",
                                "RandomErasing", "ToNumpy"):
            break
        stage.append(t)
    return transforms.Compose(stage)


# -------------------------------------------------------------------------------------------------------- sources
class FolderSource:
    """An ImageFolder directory: file names and labels as numpy arrays (no per-image Python objects)."""

    def __init__(self, folder: Path, class_to_idx: dict[str, int] | None = None):
        self.folder = folder
        classes = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
        if class_to_idx is None:
            class_to_idx = {c: k for k, c in enumerate(classes)}
        extra = [c for c in classes if c not in class_to_idx]
        if extra:
            raise KlasError(f"{folder}: class folder {extra[0]!r} is not among the train classes")
        names, labels, empty = [], [], []
        for c in classes:
            files = sorted(e.name for e in os.scandir(folder / c)
                           if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS))
            names += [f"{c}/{f}" for f in files]
            labels += [class_to_idx[c]] * len(files)
            if not files:
                empty.append(c)
        if empty and names:  # a class with no images would be learned (or scored) on nothing, without a word
            raise KlasError(f"{folder}: {len(empty)} of {len(classes)} class folders hold no image files "
                            f"({', '.join(IMG_EXTENSIONS)}): {', '.join(map(repr, empty[:5]))}"
                            f"{' ...' if len(empty) > 5 else ''}; add images or remove the folder(s)")
        if not names:
            raise KlasError(f"{folder}: no image files ({', '.join(IMG_EXTENSIONS)}) under its class folders")
        self.classes = tuple(sorted(class_to_idx, key=class_to_idx.get))
        self.names = np.array([n.encode() for n in names])  # fixed-width bytes: one buffer, shared by workers
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, i: int):
        return open_image(self.folder / self.names[i].decode())

    def shape(self, i: int) -> tuple[int, int, int] | None:
        return None  # not known without decoding


class ArraySource:
    """Images already in memory (Fashion-MNIST IDX, CIFAR-100 pickles) as uint8 [N, C, H, W]."""

    def __init__(self, data: ImageSet):
        self.images, self.labels, self.classes = data.images, data.labels, data.spec.classes

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, i: int):
        from PIL import Image

        a = self.images[i].numpy()
        return Image.fromarray(a[0], "L") if a.shape[0] == 1 else Image.fromarray(a.transpose(1, 2, 0), "RGB")


class _Batches(torch.utils.data.Dataset):
    """What a DataLoader worker computes: a whole batch (index list, optional augmentation seed) -> uint8."""

    def __init__(self, source, prep: Preprocess, train: bool):
        self.source, self.prep, self.train = source, prep, train

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, item) -> torch.Tensor:
        idx, seed = item
        out = []
        for k, i in enumerate(idx.tolist()):
            if self.train:  # timm's random train transform, seeded per image: the same whatever the worker count
                import random
                random.seed(seed + k)
                torch.manual_seed(seed + k)
            out.append(self.prep.image(self.source.load(i), self.train))
        return torch.stack(out) if out else torch.empty(0, self.prep.channels, *self.prep.size, dtype=torch.uint8)


# ------------------------------------------------------------------------------------------------------ the split
@dataclass
class StreamSet:
    """A split read from its source batch by batch by a DataLoader with ``workers`` processes; the same interface
    as ``ImageSet`` (``spec``, ``split``, ``labels``, ``len``, ``subset``, ``normalize``, ``images[a:b]``)."""

    spec: DataSpec
    split: str
    source: Any
    index: torch.Tensor  # positions in the source, in split order
    prep: Preprocess
    workers: int = 2
    train_mode: str = "light"  # augmentation of batches(train_augment=True): light (uint8 batch) or timm (per image)
    labels: torch.Tensor = field(init=False)

    def __post_init__(self):
        self.labels = self.source.labels[self.index]

    def __len__(self) -> int:
        return len(self.index)

    def subset(self, n: int | None) -> "StreamSet":
        if n is None or n >= len(self):
            return self
        return replace(self, index=self.index[:n])

    def normalize(self, images_u8: torch.Tensor) -> torch.Tensor:
        return self.prep.normalize(images_u8)

    @property
    def images(self) -> "_LazyImages":
        """``images[a:b]`` (or an index tensor): uint8 after the image stage, decoded here (for small reads)."""
        return _LazyImages(self)

    def fetch(self, idx: torch.Tensor) -> torch.Tensor:
        return _Batches(self.source, self.prep, False)[(self.index[idx], 0)]

    def stream(self, plan: list[torch.Tensor], seeds: list[int] | None = None):
        """uint8 batches of ``plan`` (split positions per batch), read by the DataLoader's workers, in order."""
        from torch.utils.data import DataLoader

        train = seeds is not None
        items = [(self.index[idx], int(seeds[k]) if train else 0) for k, idx in enumerate(plan)]
        if self.workers == 0 or len(items) <= 1:
            ds = _Batches(self.source, self.prep, train)
            yield from (ds[it] for it in items)
            return
        loader = DataLoader(_Batches(self.source, self.prep, train), batch_size=None, sampler=items,
                            num_workers=min(self.workers, len(items)), prefetch_factor=2,
                            persistent_workers=False, multiprocessing_context="fork")
        yield from loader


class _LazyImages:
    def __init__(self, data: StreamSet):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, key) -> torch.Tensor:
        if isinstance(key, slice):
            idx = torch.arange(len(self.data))[key]
        elif isinstance(key, int):
            return self.data.fetch(torch.tensor([key]))[0]
        else:
            idx = torch.as_tensor(key)
        return self.data.fetch(idx)


# ----------------------------------------------------------------------------------------------------- open_split
def _family_parts(family) -> tuple[dict, int, str, str]:
    """(data config, num_classes, name, default dataset) of a built Family, a FamilyCfg or a registered name."""
    from klas.families import Family, FamilyCfg, get_family_cfg

    if isinstance(family, Family):
        return family.data_config, family.cfg.num_classes, family.name, family.cfg.dataset
    cfg = family if isinstance(family, FamilyCfg) else get_family_cfg(family)
    return cfg.data_config, cfg.num_classes, cfg.name, cfg.dataset


def resolve_train_mode(setting: str, data_config: dict) -> str:
    """``train_transform = auto``: light augmentation for inputs up to 64 px (a random resized crop down to 8 % of
    a 28 x 28 image leaves little to classify; the embedded anchors were trained with shifts and flips), timm's
    train transform above."""
    if setting != "auto":
        return setting
    return "light" if max(data_config["input_size"][1:]) <= SMALL_INPUT else "timm"


def open_split(family, split: str, data=None, *, root: Path | str | None = None, dataset: str | None = None,
               augment: bool = False):
    """``split`` (train / val / test) of the run's dataset, preprocessed for ``family`` (a Family, FamilyCfg or
    registered name): an ``ImageSet`` (in memory) or a ``StreamSet`` (from disk), by ``data`` (the ``[data]``
    settings; default: all defaults). ``augment``: the caller will ask for training augmentation (a split that
    gets timm's per-image train transform is streamed)."""
    from klas.config import DataConfig

    data = data if data is not None else DataConfig()
    if split not in SPLITS:
        raise KlasError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
    dc, num_classes, fam_name, fam_dataset = _family_parts(family)
    name = dataset or data.dataset or fam_dataset
    root = root if root is not None else data.root
    prep = Preprocess(dc)
    train_mode = resolve_train_mode(data.train_transform, dc)
    shape = (prep.channels, *prep.size)
    if name == "imagefolder":
        if root is None:
            raise KlasError("dataset 'imagefolder' needs a root directory ([data] root or --data-root)")
        source, index, spec_name = _folder(Path(root), split)
    elif name in BUILTIN_SPECS:
        raw = load_dataset(name, split, root)
        _check_classes(raw.spec.num_classes, num_classes, name, fam_name)
        spec = replace(raw.spec, in_chans=shape[0], img_size=shape[1], mean=tuple(dc["mean"]), std=tuple(dc["std"]))
        if prep.is_identity(tuple(raw.images.shape[1:])) and not (augment and train_mode == "timm"):
            # the fast path: the images are already what the family takes
            return raw if spec == raw.spec else ImageSet(spec, split, raw.images, raw.labels)
        source, index, spec_name = ArraySource(raw), torch.arange(len(raw)), raw.spec.name
    else:
        raise KlasError(f"dataset {name!r}: expected one of imagefolder, fashion-mnist, cifar100")
    classes = tuple(source.classes)
    _check_classes(len(classes), num_classes, name, fam_name, str(root))
    spec = DataSpec(spec_name, len(classes), shape[0], shape[1], tuple(dc["mean"]), tuple(dc["std"]), classes)
    stream = StreamSet(spec, split, source, index, prep, data.workers, train_mode)
    nbytes = len(index) * shape[0] * shape[1] * shape[2]
    keep = data.in_memory == "yes" or (data.in_memory == "auto" and nbytes <= data.memory_mb * 2 ** 20)
    if augment and train_mode == "timm":
        if data.in_memory == "yes":
            raise KlasError("[data] in_memory = yes: timm's train transform reads the original images; set "
                            "train_transform = light, or in_memory = auto")
        keep = False
    return materialize(stream) if keep else stream


def materialize(stream: StreamSet, batch: int = 256) -> ImageSet:
    """Decode a StreamSet once (by its DataLoader workers) into an in-memory ImageSet of the same batches."""
    n = len(stream)
    plan = [torch.arange(s, min(s + batch, n)) for s in range(0, n, batch)]
    parts = list(stream.stream(plan))
    x = torch.cat(parts) if parts else torch.empty(0, stream.prep.channels, *stream.prep.size, dtype=torch.uint8)
    return ImageSet(stream.spec, stream.split, x, stream.labels.clone())


def _check_classes(n_data: int, n_family: int, dataset: str, family: str, where: str = "") -> None:
    if n_data > n_family:
        raise KlasError(f"{where + ': ' if where else ''}{dataset} has {n_data} classes, but the anchors of family "
                        f"{family} predict {n_family}: give anchors with a {n_data}-class head (model_args "
                        f"num_classes) or a dataset of at most {n_family} classes")


def _folder(root: Path, split: str):
    """ImageFolder protocol: klas's val is held out of ``root/train`` (a seeded 10,000 images, at most a tenth),
    train is the rest; the folder's own ``val`` is the test split."""
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise KlasError(f"{root}: missing train/; an ImageFolder root holds train/<class>/* and val/<class>/*")
    train_src = _folder_source(train_dir)
    if split == "test":
        if not (root / "val").is_dir():
            raise KlasError(f"{root}: missing val/ (the test split); an ImageFolder root holds train/<class>/* "
                            f"and val/<class>/*")
        src = _folder_source(root / "val", dict(zip(train_src.classes, range(len(train_src.classes)))))
        return src, torch.arange(len(src)), f"imagefolder:{root.name}"
    n = len(train_src)
    if n < 2:
        raise KlasError(f"{train_dir}: {n} image(s); klas holds a val split out of train, so it needs at least 2")
    train_idx, val_idx = folder_split_indices(n)
    return train_src, (train_idx if split == "train" else val_idx), f"imagefolder:{root.name}"


_SOURCES: dict[tuple, FolderSource] = {}


def _folder_source(folder: Path, class_to_idx=None) -> FolderSource:
    """Folder listings are cached per process (every stage opens train and val of the same folder)."""
    st = folder.stat()
    key = (str(folder.resolve()), st.st_mtime_ns, tuple(sorted((class_to_idx or {}).items())))
    if key not in _SOURCES:
        if len(_SOURCES) >= 4:
            _SOURCES.pop(next(iter(_SOURCES)))
        _SOURCES[key] = FolderSource(folder, class_to_idx)
    return _SOURCES[key]
