"""Reading untrusted dataset files safely, and checking what was read before any stage trains on it.

- ``load_pickle``: a restricted unpickler for the CIFAR-100 python files. It admits only the containers, strings,
  numbers and numpy arrays that format needs; any other global a pickle names (``os.system``, ``builtins.eval``,
  ...) is refused with one line before anything runs. Plain ``pickle.load`` would execute it.
- ``open_image``: Pillow decoding with an explicit pixel limit (``MAX_IMAGE_PIXELS``, env ``KLAS_MAX_IMAGE_PIXELS``)
  checked from the header, before decoding: a small file declaring a huge image is refused, naming the file.
- ``check_labels`` / ``check_images`` / ``check_dataset``: labels in ``[0, num_classes)`` and images of the shape
  the dataset (and so the family) expects, one line naming the dataset and what was expected.

Every error is a ``KlasError`` (one line, names the file or dataset). No torch import at module level.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

from klas.errors import KlasError, file_error
from klas_runtime.errors import ZooError
from klas_runtime.preprocess import max_image_pixels  # the one decoding limit (pixels), shared with the runtime


# --- pickles -------------------------------------------------------------------------------------------------------

def _latin1_encode(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles of ``bytes`` use it (``encode(str, 'latin1')``), text codecs only."""
    import codecs

    if not isinstance(obj, str) or codecs.lookup(encoding).name not in ("iso8859-1", "utf-8", "ascii"):
        raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r} is not allowed")
    return obj.encode(encoding, errors)


def _numpy_globals() -> dict[tuple[str, str], Any]:
    import numpy as np

    try:
        from numpy._core.multiarray import _reconstruct, scalar  # numpy >= 2
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct, scalar
    allowed = {}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):  # numpy 1.x pickles name the first
        allowed[(mod, "_reconstruct")] = _reconstruct
        allowed[(mod, "scalar")] = scalar
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    allowed[("_codecs", "encode")] = _latin1_encode
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """Admits dicts, lists, tuples, str, bytes, numbers and numpy arrays / dtypes / scalars; nothing else.

    Exactly the globals numpy needs to rebuild an array (``numpy.core.multiarray._reconstruct`` as numpy 1.x writes
    it, ``numpy._core.multiarray._reconstruct`` as numpy 2.x does, ``numpy.ndarray``, ``numpy.dtype``,
    ``...multiarray.scalar``) and ``_codecs.encode`` restricted to text codecs (protocol-2 pickles of bytes)."""

    def __init__(self, file, *, encoding: str = "latin1"):
        super().__init__(file, encoding=encoding)
        self._allowed = _numpy_globals()

    def find_class(self, module: str, name: str):
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing global {module}.{name} (only numpy arrays and plain containers "
                                         f"are allowed)") from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refusing persistent ids")


def load_pickle(path: Path | str, encoding: str = "latin1", what: str = "dataset pickle") -> Any:
    """Unpickle a dataset file with ``RestrictedUnpickler``; anything else is one KlasError line naming the file
    (``what`` says what it should have been)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(f, encoding=encoding).load()
    except OSError as e:
        raise file_error(path, e, what) from None
    except pickle.UnpicklingError as e:
        raise KlasError(f"{path}: not a {what} ({str(e).splitlines()[0][:160]})") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, UnicodeDecodeError,
            MemoryError, RecursionError) as e:
        raise KlasError(f"{path}: not a {what} ({type(e).__name__}: "
                        f"{(str(e).splitlines() or [''])[0][:120]})") from None


def loads_pickle(data: bytes, where: str = "pickle") -> Any:
    """``load_pickle`` for bytes already in memory."""
    try:
        return RestrictedUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as e:
        raise KlasError(f"{where}: not a safe dataset pickle ({str(e).splitlines()[0][:160]})") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, UnicodeDecodeError) as e:
        raise KlasError(f"{where}: not a readable dataset pickle ({type(e).__name__})") from None


# --- images --------------------------------------------------------------------------------------------------------

def open_image(path: Path | str, max_pixels: int | None = None, mode: str | None = "RGB"):
    """A decoded ``PIL.Image`` (converted to ``mode`` unless None), refusing before decoding an image whose
    header declares more than ``max_pixels`` pixels (default ``klas_runtime.preprocess.max_image_pixels()``); files Pillow cannot read are
    one KlasError line naming the file. Usable as torchvision's ImageFolder ``loader``."""
    from PIL import Image, UnidentifiedImageError

    from klas_runtime.preprocess import check_image_file, to_8bit

    limit = max_image_pixels() if max_pixels is None else int(max_pixels)
    try:
        check_image_file(path)  # a FIFO or device would block or never end
    except ZooError as e:
        raise KlasError(str(e)) from None
    try:
        with Image.open(path) as img:
            w, h = img.size
            if w * h > limit:
                raise KlasError(f"{path}: image of {w}x{h} = {w * h:,} pixels exceeds the decoding limit of "
                                f"{limit:,} (KLAS_MAX_IMAGE_PIXELS); refusing to decode it")
            img.load()
            img8 = to_8bit(img, path)  # 16-bit samples scaled to 8 bits, as Pillow reads 16-bit RGB
            return img8.convert(mode) if mode is not None and img8.mode != mode else img8.copy()
    except KlasError:
        raise
    except ZooError as e:
        raise KlasError(str(e)) from None
    except FileNotFoundError:
        raise KlasError(f"{path}: image not found") from None
    except Image.DecompressionBombError:
        raise KlasError(f"{path}: image declares more pixels than Pillow's decompression-bomb limit; refusing to "
                        f"decode it") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0][:120]
        raise KlasError(f"{path}: not a readable image ({first})") from None


# --- contents ------------------------------------------------------------------------------------------------------

def check_labels(labels, num_classes: int, where: str) -> None:
    """Every label an integer in ``[0, num_classes)``; else one line naming ``where``, the first bad label and
    its index."""
    import numpy as np

    y = np.asarray(labels.numpy() if hasattr(labels, "numpy") else labels)
    if y.size == 0:
        return
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise KlasError(f"{where}: labels must be a 1-D array of integers, got shape {tuple(y.shape)} {y.dtype}")
    bad = np.flatnonzero((y < 0) | (y >= num_classes))
    if bad.size:
        k = int(bad[0])
        raise KlasError(f"{where}: label {int(y[k])} at index {k} is outside [0, {num_classes}) "
                        f"({bad.size} such label(s)); expected class indices of a {num_classes}-class dataset")


def check_images(images, shape: tuple[int, int, int], where: str, n: int | None = None) -> None:
    """Images [N, C, H, W] with (C, H, W) == ``shape`` (and N == ``n`` labels when given); else one line."""
    got = tuple(int(d) for d in images.shape)
    c, h, w = shape
    if len(got) != 4 or got[1:] != (c, h, w):
        seen = f"{got[1]} channel(s) of {got[2]}x{got[3]}" if len(got) == 4 else f"an array of shape {got}"
        raise KlasError(f"{where}: images are {seen}; expected {c} channel(s) of {h}x{w} "
                        f"({'grayscale' if c == 1 else 'RGB' if c == 3 else f'{c}-channel'})")
    if n is not None and got[0] != n:
        raise KlasError(f"{where}: {got[0]} images but {n} labels")


def check_dataset(data, where: str | None = None) -> None:
    """An ``ImageSet`` against its own spec: images [N, in_chans, img_size, img_size], one label each, labels in
    ``[0, num_classes)``. Called by ``load_dataset``, so every stage checks its data when it first loads it."""
    spec = data.spec
    at = where or f"dataset {spec.name} ({data.split})"
    check_images(data.images, (spec.in_chans, spec.img_size, spec.img_size), at, n=len(data.labels))
    check_labels(data.labels, spec.num_classes, at)

