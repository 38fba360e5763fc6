"""``klas.io.swap_dirs``: the folder swap the export stage relies on, by ``renameat2(RENAME_EXCHANGE)`` and by the
three-rename fallback used where the C library or the file system lacks it."""
from __future__ import annotations

import ctypes
import errno
from pathlib import Path

import pytest

from klas.io import swap_dirs


def _folders(tmp: Path) -> tuple[Path, Path]:
    new, old = tmp / ".zoo.staging", tmp / "zoo"
    for folder, tag in ((new, "new"), (old, "old")):
        (folder / "sub").mkdir(parents=True)
        (folder / "manifest.json").write_text(tag)
        (folder / "sub" / f"{tag}.onnx").write_bytes(tag.encode() * 3)
    return new, old


def _check_swapped(tmp: Path, new: Path, old: Path) -> None:
    assert (old / "manifest.json").read_text() == "new" and (old / "sub" / "new.onnx").is_file()
    assert (new / "manifest.json").read_text() == "old" and (new / "sub" / "old.onnx").is_file()
    assert sorted(p.name for p in tmp.iterdir()) == [".zoo.staging", "zoo"]  # nothing left aside


def test_swap_by_renameat2(tmp_path):
    new, old = _folders(tmp_path)
    swap_dirs(new, old)
    _check_swapped(tmp_path, new, old)


class _Libc:
    """A C library whose renameat2 fails with ``err`` (or that has none)."""

    def __init__(self, err: int | None):
        self.err = err
        if err is not None:
            self.renameat2 = self._fail

    def _fail(self, *args):
        ctypes.set_errno(self.err)
        return -1


@pytest.mark.parametrize("err", [None, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP])
def test_three_rename_fallback(tmp_path, monkeypatch, err):
    """No renameat2 in the C library, or one the file system refuses: the same result by three renames."""
    new, old = _folders(tmp_path)
    monkeypatch.setattr(ctypes, "CDLL", lambda *a, **k: _Libc(err))
    swap_dirs(new, old)
    _check_swapped(tmp_path, new, old)


def test_other_errors_are_raised_and_nothing_moves(tmp_path, monkeypatch):
    new, old = _folders(tmp_path)
    monkeypatch.setattr(ctypes, "CDLL", lambda *a, **k: _Libc(errno.EACCES))
    with pytest.raises(PermissionError):
        swap_dirs(new, old)
    assert (old / "manifest.json").read_text() == "old" and (new / "manifest.json").read_text() == "new"


def test_first_zoo_is_a_plain_rename(tmp_path):
    new, old = _folders(tmp_path)
    import shutil
    shutil.rmtree(old)
    swap_dirs(new, old)
    assert (old / "manifest.json").read_text() == "new" and not new.exists()
