"""Run-time preprocessing: an image -> the model's normalized input, exactly as the family was evaluated.

The manifest's input spec (``entry["input"]``) carries timm's evaluation transform
(``timm.data.create_transform(**data_config, is_training=False)``, timm 1.0 ``transforms_imagenet_eval``):

* ``shape`` ``["batch", C, H, W]`` and ``color`` (``grayscale`` or ``rgb``): the image is first converted to
  Pillow's ``L`` or ``RGB`` (an RGBA / palette / 16-bit file likewise, by Pillow's own conversion);
* ``resize`` ``[h, w]`` = ``[floor(H / crop_pct), floor(W / crop_pct)]``, ``interpolation`` (``bilinear``,
  ``bicubic``, ``nearest``, ``lanczos``, ``box``, ``hamming``: Pillow's filters, which is what torchvision's
  ``Resize`` runs on PIL images, antialiased), ``crop_pct`` and ``crop_mode`` as timm defines them:

  - ``center``: resize the shorter side to ``resize`` keeping the aspect ratio (for a square target torchvision's
    ``Resize(int)``: the long side becomes ``int(short_target * long / short)``; for a non-square one timm's
    ``ResizeKeepRatio``: both sides divided by ``min(h / rh, w / rw)`` and rounded), then a centre crop of
    ``H x W`` (torchvision's ``CenterCrop``: offsets ``round((size - crop) / 2)``, zero padding when the image is
    smaller);
  - ``squash``: resize to exactly ``resize`` (aspect ratio not kept), then the centre crop;
  - ``border``: resize the longer side to fit ``resize`` keeping the ratio (``ResizeKeepRatio(longest=1)``), then
    centre crop or pad to ``H x W`` with the mean colour ``round(255 * mean)``;

* ``scale`` (1/255), ``mean``, ``std``: ``(pixel * scale - mean) / std`` per channel, in float32 (torchvision's
  ``ToTensor`` + ``Normalize``).

Manifests written before these fields existed (schema version 3 and older) resized straight to the input size with
bilinear filtering: that is ``crop_mode = "squash"``, ``crop_pct = 1.0``, ``interpolation = "bilinear"``
(``LEGACY``), which ``geometry`` fills in. ``load_image`` reads a file through all of it, refusing an image too
large to decode safely. numpy + Pillow only (no torch): deployment hosts lack it.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from klas_runtime.errors import ZooError, first_line

INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos", "box", "hamming")
CROP_MODES = ("center", "squash", "border")
GEOMETRY = ("resize", "interpolation", "crop_pct", "crop_mode")  # the fields added in schema version 4
LEGACY = dict(interpolation="bilinear", crop_pct=1.0, crop_mode="squash")  # what a spec without them means
CROP_PCT_RANGE = (0.1, 2.0)


def resize_size(h: int, w: int, crop_pct: float) -> list[int]:
    """timm's ``scale_size``: ``[floor(h / crop_pct), floor(w / crop_pct)]``."""
    return [math.floor(h / crop_pct), math.floor(w / crop_pct)]


def geometry(spec: dict) -> dict:
    """``resize``, ``interpolation``, ``crop_pct``, ``crop_mode`` of an input spec; a spec without them (older
    manifests) means: resize straight to the input size, bilinear, no crop."""
    _, _, h, w = spec["shape"]
    out = {k: spec.get(k, LEGACY.get(k)) for k in ("interpolation", "crop_pct", "crop_mode")}
    out["resize"] = list(spec.get("resize") or resize_size(h, w, out["crop_pct"]))
    return out


def _pil_filter(name: str):
    from PIL import Image

    # torchvision's pil_modes_mapping: InterpolationMode -> Pillow filter
    table = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
             "lanczos": Image.LANCZOS, "box": Image.BOX, "hamming": Image.HAMMING}
    if name not in table:
        raise ZooError(f"input interpolation {name!r}: expected one of {', '.join(INTERPOLATIONS)}")
    return table[name]


def _resize(img, size_hw: tuple[int, int], resample):
    """torchvision ``F.resize`` on a PIL image to an exact (h, w): nothing when the size is already right."""
    h, w = size_hw
    if (img.size[1], img.size[0]) == (h, w):
        return img
    return img.resize((w, h), resample)


def _keep_ratio_size(ih: int, iw: int, target: list[int], longest: float) -> tuple[int, int]:
    """timm ``ResizeKeepRatio.get_params`` without randomness (same float expressions, Python's round)."""
    th, tw = target
    ratio_h, ratio_w = ih / th, iw / tw
    ratio = max(ratio_h, ratio_w) * longest + min(ratio_h, ratio_w) * (1. - longest)
    return round(ih * 1. / ratio), round(iw * 1. / ratio)


def _short_side_size(ih: int, iw: int, size: int) -> tuple[int, int]:
    """torchvision ``Resize(int)``: the shorter side to ``size``, the longer to ``int(size * long / short)``."""
    short, long = (iw, ih) if iw <= ih else (ih, iw)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if iw <= ih else (new_long, new_short)
    return new_h, new_w


def _center_crop_or_pad(arr: np.ndarray, h: int, w: int, fill) -> np.ndarray:
    """torchvision ``center_crop`` (fill 0) / timm ``center_crop_or_pad`` on an [H, W, C] uint8 array: pad
    ``(size - image) // 2`` left/top and the rest right/bottom when smaller, then crop at
    ``round((size - crop) / 2)``."""
    ih, iw = arr.shape[:2]
    if h > ih or w > iw:
        top, left = ((h - ih) // 2 if h > ih else 0), ((w - iw) // 2 if w > iw else 0)
        bottom, right = ((h - ih + 1) // 2 if h > ih else 0), ((w - iw + 1) // 2 if w > iw else 0)
        out = np.empty((ih + top + bottom, iw + left + right, arr.shape[2]), dtype=arr.dtype)
        out[...] = np.asarray(fill, dtype=arr.dtype).reshape(1, 1, -1)
        out[top:top + ih, left:left + iw] = arr
        arr = out
        ih, iw = arr.shape[:2]
    top, left = int(round((ih - h) / 2.0)), int(round((iw - w) / 2.0))
    return arr[top:top + h, left:left + w]


WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # Pillow's modes of 16-bit (and 32-bit integer) images


def to_8bit(img, path: Path | str = "image"):
    """An image of more than 8 bits per sample in the 8-bit range, as Pillow itself reads a 16-bit RGB PNG (the
    high byte: ``v >> 8``, so a 16-bit file saved from 8-bit values ``v * 257`` gives back exactly ``v``). Pillow's
    own ``convert`` clips 16-bit grayscale to 255 instead of scaling it: most pixels would turn white. A 16-bit
    grayscale PNG opens as ``I;16`` (or ``I``); other 32-bit integer and float images are refused in one line.
    Palette, CMYK, alpha and 8-bit images pass unchanged (``convert`` handles them as timm's loader does)."""
    if img.mode not in WIDE_MODES and img.mode != "F":
        return img
    Image, _ = _pil()
    if img.mode in WIDE_MODES[:4] or (img.mode == "I" and getattr(img, "format", None) == "PNG"):
        arr = np.asarray(img).astype(np.int64)
        if arr.min() < 0 or arr.max() > 65535:
            raise ZooError(f"{path}: {img.mode} image with values outside 0..65535; expected 8- or 16-bit samples")
        return Image.fromarray((arr >> 8).astype(np.uint8), "L")
    raise ZooError(f"{path}: {img.mode} image ({'32-bit float' if img.mode == 'F' else '32-bit integer'} samples); "
                   f"expected 8- or 16-bit samples (save it as an 8-bit or 16-bit PNG)")


def convert(img, spec: dict, path: Path | str = "image"):
    """The image in the channels the model takes: Pillow ``L`` (grayscale) or ``RGB``, whatever the file holds
    (16-bit samples scaled to 8 bits first: ``to_8bit``)."""
    want = "L" if spec["color"] == "grayscale" else "RGB"
    img = to_8bit(img, path)
    return img if img.mode == want else img.convert(want)


def resize_crop(img, spec: dict) -> np.ndarray:
    """Resize and crop an ``L``/``RGB`` PIL image as the spec says -> uint8 [H, W, C] of the input size."""
    _, c, h, w = spec["shape"]
    g = geometry(spec)
    resample = _pil_filter(g["interpolation"])
    rh, rw = g["resize"]
    ih, iw = img.size[1], img.size[0]
    fill = 0
    if g["crop_mode"] == "squash":
        img = _resize(img, (rh, rw), resample)
    elif g["crop_mode"] == "border":
        img = _resize(img, _keep_ratio_size(ih, iw, [rh, rw], 1.0), resample)
        fill = [round(255 * v) for v in spec["mean"]]
    elif g["crop_mode"] == "center":
        size = _short_side_size(ih, iw, rh) if rh == rw else _keep_ratio_size(ih, iw, [rh, rw], 0.0)
        img = _resize(img, size, resample)
    else:
        raise ZooError(f"input crop_mode {g['crop_mode']!r}: expected one of {', '.join(CROP_MODES)}")
    arr = np.asarray(img, dtype=np.uint8)
    arr = arr.reshape(arr.shape[0], arr.shape[1], -1)
    if arr.shape[2] != c:
        raise ZooError(f"image has {arr.shape[2]} channels after conversion, the model takes {c}")
    return _center_crop_or_pad(arr, h, w, fill)


def normalize(arr_hwc: np.ndarray, spec: dict) -> np.ndarray:
    """uint8 [H, W, C] -> float32 [C, H, W]: ``(x * scale - mean) / std`` in float32 (for scale 1/255 exactly
    torchvision's ``ToTensor`` (x / 255) + ``Normalize``)."""
    x = arr_hwc.transpose(2, 0, 1).astype(np.float32)
    inv = 1.0 / float(spec["scale"])
    x = x / np.float32(inv) if abs(inv - round(inv)) < 1e-9 else x * np.float32(spec["scale"])
    mean = np.asarray(spec["mean"], dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(spec["std"], dtype=np.float32).reshape(-1, 1, 1)
    return ((x - mean) / std).astype(np.float32)


def preprocess(img, spec: dict, path: Path | str = "image") -> np.ndarray:
    """A PIL image (any mode, any size) -> float32 [C, H, W], the model's input."""
    return normalize(resize_crop(convert(img, spec, path), spec), spec)


# --- image files ---------------------------------------------------------------------------------------------------

# Decoding limit for input images (width x height): a small file may declare a huge image (a decompression bomb).
MAX_IMAGE_PIXELS = 50_000_000  # the default limit; the environment variable KLAS_MAX_IMAGE_PIXELS overrides it


def max_image_pixels() -> int:
    """The pixel limit of every image decode: ``$KLAS_MAX_IMAGE_PIXELS`` (a positive integer; read when used, so a
    bad value is one line from the command that decodes an image, not a traceback on import), else
    ``MAX_IMAGE_PIXELS``."""
    raw = os.environ.get("KLAS_MAX_IMAGE_PIXELS")
    if raw is None or raw.strip() == "":
        return MAX_IMAGE_PIXELS
    try:
        value = int(raw.strip().replace("_", ""))
    except ValueError:
        value = 0
    if value < 1:
        raise ZooError(f"KLAS_MAX_IMAGE_PIXELS={raw!r}: expected a positive whole number of pixels (default "
                       f"{MAX_IMAGE_PIXELS:,})")
    return value


def _pil():
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise ZooError("Pillow is needed to read images: pip install pillow") from None
    return Image, UnidentifiedImageError


def _unreadable(path, e: BaseException) -> ZooError:
    return ZooError(f"{path}: not a readable image ({first_line(e, 120)})")


def check_image_file(path: Path | str) -> None:
    """Refuse, before opening it, anything but a regular file (a FIFO would block the reader forever, a device
    never ends): one ZooError line naming the path."""
    import stat

    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise ZooError(f"{path}: image not found") from None
    except OSError as e:
        raise ZooError(f"{path}: cannot read the image ({e.strerror or e})") from None
    if stat.S_ISDIR(mode):
        raise ZooError(f"{path}: is a directory, not an image")
    if not stat.S_ISREG(mode):
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else \
            "a socket" if stat.S_ISSOCK(mode) else "not a regular file"
        raise ZooError(f"{path}: {kind}, not a regular file; expected an image file")


def open_checked_image(path: Path | str, max_pixels: int | None = None):
    """``PIL.Image.open`` refusing, before decoding, an image larger than ``max_pixels`` (default
    ``MAX_IMAGE_PIXELS``, env ``KLAS_MAX_IMAGE_PIXELS``) and anything Pillow cannot identify: one-line ZooError."""
    Image, UnidentifiedImageError = _pil()
    limit = max_image_pixels() if max_pixels is None else int(max_pixels)
    check_image_file(path)
    try:
        img = Image.open(path)
    except FileNotFoundError:
        raise ZooError(f"{path}: image not found") from None
    except IsADirectoryError:
        raise ZooError(f"{path}: is a directory, not an image") from None
    except Image.DecompressionBombError:
        raise ZooError(f"{path}: image declares more pixels than Pillow's decompression-bomb limit; refusing to "
                       f"decode it") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise _unreadable(path, e) from None
    w, h = img.size
    if w * h > limit:
        img.close()
        raise ZooError(f"{path}: image of {w}x{h} = {w * h:,} pixels exceeds the limit of {limit:,} "
                       f"(KLAS_MAX_IMAGE_PIXELS); refusing to decode it")
    return img


def load_image(path: Path | str, spec: dict) -> np.ndarray:
    """An image file -> [1, C, H, W] float32 as the model expects: converted to grayscale/RGB, resized and centre
    cropped with the spec's interpolation, crop_pct and crop_mode (timm's evaluation transform; older manifests:
    straight to the input size), scaled, normalized (``preprocess``). Images above ``MAX_IMAGE_PIXELS`` are
    refused before decoding."""
    opened = open_checked_image(path)  # Pillow present, the file identified, within the pixel limit
    Image, UnidentifiedImageError = _pil()
    try:
        with opened as img:
            x = preprocess(img, spec, path)
    except FileNotFoundError:
        raise ZooError(f"{path}: image not found") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise _unreadable(path, e) from None
    except ZooError as e:
        raise ZooError(str(e) if str(e).startswith(str(path)) else f"{path}: {e}") from None
    return x[None]
