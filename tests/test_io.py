"""``klas.io``: the folder swap the export stage relies on (``renameat2(RENAME_EXCHANGE)`` and the
three-rename fallback used where the C library or the file system lacks it), and checkpoints on a full disk."""
from __future__ import annotations

import ctypes
import io
import os
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


class _FillingDisk(io.RawIOBase):
    """A file that takes ``room`` bytes, then fails every write with ENOSPC (a disk filling up mid-checkpoint)."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def writable(self):
        return True

    def write(self, b):
        if len(b) > self.room:  # what fits goes to disk, then the write fails, as a buffered file's does
            self.f.write(bytes(b[:self.room]))
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.f.write(bytes(b))
        self.room -= len(b)
        return len(b)

    def fileno(self):
        return self.f.fileno()

    def close(self):
        self.f.close()
        super().close()


@pytest.mark.parametrize("room", [0, 300, 5000])
def test_checkpoint_on_a_full_disk_is_one_line_and_the_previous_one_stays(tmp_path, monkeypatch, room):
    """A disk that fills up while a checkpoint is written: one line naming the file and the cause, no temp file
    left, the previous checkpoint loads as it was, and the next write, with space again, succeeds."""
    import torch

    import klas.io as kio
    from klas.errors import KlasError

    path = tmp_path / "checkpoint.pt"
    old = {"w": torch.arange(10.0), "step": 3}
    kio.save_checkpoint(old, path)
    real_open = open
    monkeypatch.setattr(kio, "open", lambda p, mode="r": _FillingDisk(real_open(p, mode), room), raising=False)
    with pytest.raises(KlasError) as e:
        kio.save_checkpoint({"w": torch.randn(50_000), "step": 4}, path)
    msg = str(e.value)
    # torch's writer turns the failing write into its own error: the line says so and how much room is left
    assert "\n" not in msg and msg.startswith(f"{path}: checkpoint not written (")
    assert ("No space left on device" in msg or "the write failed" in msg) and f"MiB free on {tmp_path}" in msg
    assert "the previous checkpoint is kept" in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # no temp file behind
    back = kio.load_checkpoint(path)
    assert back["step"] == 3 and torch.equal(back["w"], old["w"])
    monkeypatch.undo()  # space freed: the same write goes through
    kio.save_checkpoint({"w": torch.ones(3), "step": 4}, path)
    assert kio.load_checkpoint(path)["step"] == 4
