"""Atomic artifacts: every file klas writes appears whole or not at all (temp file in the same dir + rename).

``atomic_path`` and ``sha256_file`` live in the torch-free runtime (``klas_runtime.io``, which the zoo manifest
writes through) and are re-exported here: one copy. No torch import at module level.
"""
from __future__ import annotations

import json
from pathlib import Path

from klas.errors import KlasError
from klas_runtime.io import atomic_path, sha256_file  # noqa: F401  (re-exported)


def save_json(obj, path: Path | str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o):
    if hasattr(o, "tolist") and hasattr(o, "dim"):  # a torch.Tensor, without importing torch here
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def load_json(path: Path | str):
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise KlasError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise KlasError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def save_checkpoint(obj, path: Path | str) -> None:
    """torch.save to a temp file beside ``path``, flushed to disk (fsync), then renamed onto it: the previous
    checkpoint stays valid until the new one is whole. A failed write (a full disk) is one line naming the file and
    the cause; the temp file is removed. Load it back with ``load_checkpoint`` (weights_only)."""
    import os

    import torch

    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                torch.save(obj, f)
                f.flush()
                os.fsync(f.fileno())
    except (OSError, RuntimeError) as e:  # torch reports a failed write as a RuntimeError of its stream writer
        import shutil

        cause = os.strerror(e.errno) if isinstance(e, OSError) and e.errno else "the write failed"
        try:
            cause += f"; {shutil.disk_usage(path.parent).free / 2 ** 20:.1f} MiB free on {path.parent}"
        except OSError:
            pass
        kept = "the previous checkpoint is kept" if path.is_file() else "no checkpoint was written"
        raise KlasError(f"{path}: checkpoint not written ({cause}); {kept}; free space and run the same command "
                        f"to resume") from None


def load_checkpoint(path: Path | str):
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise KlasError(f"{path}: checkpoint not found") from None
    except Exception as e:  # a truncated or foreign file: say which one
        raise KlasError(f"{path}: unreadable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None


def save_tensors(tensors: dict[str, "torch.Tensor"], path: Path | str, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    out, seen = {}, set()
    for k, v in tensors.items():
        v = v.detach().contiguous().cpu()
        if v.numel() and v.data_ptr() in seen:  # tied weights (a decoder's embedding and head): stored as copies
            v = v.clone()
        seen.add(v.data_ptr())
        out[k] = v
    with atomic_path(path) as tmp:
        save_file(out, str(tmp), metadata=metadata)


def load_tensors(path: Path | str) -> dict[str, "torch.Tensor"]:
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise KlasError(f"{path}: tensor file not found")
    try:
        return load_file(str(path))
    except Exception as e:
        raise KlasError(f"{path}: not a safetensors file ({str(e).splitlines()[0][:120]})") from None


def swap_dirs(new: Path | str, old: Path | str) -> None:
    """Put folder ``new`` in place of folder ``old`` in one step, so that a kill at any moment leaves the old or the
    new folder whole at ``old``; the previous contents end up at ``new`` (the caller deletes them). Linux
    ``renameat2(RENAME_EXCHANGE)``; elsewhere (or where the file system lacks it) two renames, whose gap is one
    system call wide."""
    import ctypes
    import errno
    import os

    new, old = Path(new), Path(old)
    if not old.exists():
        os.replace(new, old)
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        fn = None
    if fn is not None:
        at_fdcwd, rename_exchange = -100, 2
        if fn(at_fdcwd, os.fsencode(new), at_fdcwd, os.fsencode(old), rename_exchange) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(err, os.strerror(err), str(old))
    aside = new.with_name(new.name + ".old")
    os.replace(old, aside)
    os.replace(new, old)
    os.replace(aside, new)


def tensor_metadata(path: Path) -> dict | None:
    """The metadata of a safetensors file (None when it is missing or unreadable)."""
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}
    except Exception:  # noqa: BLE001 -- a torn or foreign file: train the stitch again
        return None
