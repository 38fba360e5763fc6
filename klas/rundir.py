"""A run directory: one folder per run, one subfolder per stage, a ``run.json`` naming the family it belongs to."""
from __future__ import annotations

import time
from pathlib import Path

from klas.errors import KlasError
from klas.io import load_json, save_json



def check_run_path(path: Path | str) -> Path:
    """``path`` as a run directory's path: one-line error when it, or a folder above it, is a regular file."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise KlasError(f"{path}: run directory is a file, not a directory (use another --run-dir)")
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise KlasError(f"{path}: run directory lies under {parent}, which is a file")
    return path


def read_run_meta(path: Path, family: str | None = None) -> dict | None:
    """The ``run.json`` of run directory ``path`` (None when there is none), checked: a JSON object naming the run's
    family, and that family when ``family`` is given; otherwise one line naming the file. Writes nothing."""
    meta_path = Path(path) / "run.json"
    if not meta_path.is_file():
        return None
    meta = load_json(meta_path)
    if not isinstance(meta, dict) or not isinstance(meta.get("family"), str):
        raise KlasError(f"{meta_path}: expected a JSON object naming the run's family (as klas writes it); move the "
                        f"folder aside or use another --run-dir")
    if family is not None and meta["family"] != family:
        raise KlasError(f"{path}: run directory belongs to family {meta['family']!r}, not {family!r} (use another "
                        f"--run-dir)")
    return meta


class RunDir:
    """``RunDir(path, family)`` creates or opens a run; opening one made for another family is an error."""

    def __init__(self, path: Path | str, family: str | None = None, dataset: str | None = None):
        self.path = check_run_path(path)
        meta_path = self.path / "run.json"
        if meta_path.is_file():
            self.meta = read_run_meta(self.path, family)
        else:
            if family is None:
                raise KlasError(f"{self.path}: not a klas run directory (no run.json); run `klas probe` first")
            from klas import __version__
            self.meta = dict(family=family, dataset=dataset, klas_version=__version__,
                             created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
            from klas import distributed as dist

            if dist.info().is_main:  # under torchrun only rank 0 writes
                save_json(self.meta, meta_path)

    @property
    def family(self) -> str:
        return self.meta["family"]

    def stage(self, name: str) -> Path:
        """The folder of stage ``name`` (created)."""
        from klas.stages import STAGES

        if name not in STAGES and name != "zoo":
            raise KlasError(f"unknown stage {name!r}: expected one of {', '.join(STAGES)}")
        d = self.path / name
        try:
            d.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise KlasError(f"{d}: exists and is not a directory") from None
        except PermissionError:
            raise KlasError(f"{d}: permission denied") from None
        return d

    def lock(self) -> "RunLock":
        return RunLock(self.path)

    def require(self, name: str, filename: str, hint: str | None = None) -> Path:
        """Path of an earlier stage's artifact, or a one-line error saying which command makes it."""
        p = self.path / name / filename
        if not p.is_file():
            raise KlasError(f"{p}: missing; run {hint or f'the {name} stage'} first")
        return p


class RunLock:
    """An exclusive lock on a run directory while a process works in it (``flock`` on ``.lock``, released by the
    kernel when the holder dies, so a lock left by a killed process is simply taken over, with a message). A second
    process gets one line naming the holder."""

    def __init__(self, path: Path):
        self.file = Path(path) / ".lock"
        self.fd = None

    def __enter__(self) -> "RunLock":
        import fcntl
        import os
        import socket
        import sys

        self.file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 400, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise KlasError(f"{self.file.parent}: run directory in use by {holder}; wait for it or use another "
                            f"--run-dir") from None
        previous = os.pread(fd, 400, 0).decode(errors="replace").strip()
        if previous:
            print(f"[run] {self.file.parent}: taking over the lock of {previous} (no longer running)", flush=True)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} ({' '.join(sys.argv[:3])[:200]})".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        import os

        if self.fd is not None:
            os.ftruncate(self.fd, 0)  # a clean exit leaves no holder behind
            os.close(self.fd)
            self.fd = None
