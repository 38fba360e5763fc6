"""Reader for the IDX format of (Fashion-)MNIST, plain or gzip-compressed."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from klas.errors import KlasError

# IDX magic: two zero bytes, a dtype code, the number of dimensions.
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


_NAMES = {0x08: "unsigned byte", 0x09: "signed byte", 0x0B: "int16", 0x0C: "int32", 0x0D: "float32",
          0x0E: "float64"}


def read_idx(path: Path, expect: int | None = 0x08) -> np.ndarray:
    """Read one IDX file (``.gz`` or raw) into a numpy array of its declared shape. ``expect``: the only data type
    code the caller can use (default unsigned bytes, as (Fashion-)MNIST ships pixels and labels; None: any); a file
    of another type is one line, not values reinterpreted as bytes."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise KlasError(f"{path}: cannot read IDX file ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise KlasError(f"{path}: not an IDX file (bad magic number)")
    if expect is not None and raw[2] != expect:
        raise KlasError(f"{path}: IDX data type {_NAMES[raw[2]]} (code 0x{raw[2]:02X}); expected "
                        f"{_NAMES[expect]} (code 0x{expect:02X}), as (Fashion-)MNIST ships its images and labels")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise KlasError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(raw[4 + 4 * k: 8 + 4 * k], "big") for k in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise KlasError(f"{path}: IDX payload is {len(raw) - header} bytes, header {shape} promises {expected}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))
