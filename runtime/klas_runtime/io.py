"""File helpers shared with klas (``klas.io`` imports these): atomic writes and file hashes, standard library only."""
from __future__ import annotations

import hashlib
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: Path | str):
    """Yield a temp path next to ``path``; on success it is renamed onto ``path`` (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except OSError as e:  # e.g. a full disk while writing: the old file stays, the error names the file
        Path(tmp).unlink(missing_ok=True)
        if e.filename is None and e.errno is not None:
            raise OSError(e.errno, e.strerror or os.strerror(e.errno), str(path)) from e
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sha256_file(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


ZOO_LOCK = ".lock"  # the zoo's lock file, inside the zoo folder (also what a run directory's lock is called)


@contextmanager
def zoo_lock(zoo_dir: Path | str, wait_s: float = 600.0, say=print):
    """Hold the exclusive lock of a zoo folder while writing it (``flock`` on ``ZOO_DIR/.lock``, released by the
    kernel when the holder dies). Every writer takes it -- ``klas export`` around its swap, ``klas profile`` around
    its merge -- and re-reads the manifest under it, so no writer's records are lost. A second writer waits (one
    message naming the holder) up to ``wait_s`` seconds, then one ZooError line. Because an export swaps the whole
    folder, the lock is checked to still be the folder's own file after it is taken (else taken again there)."""
    import fcntl
    import socket
    import sys
    import time

    from klas_runtime.errors import ZooError

    lock, deadline, told = Path(zoo_dir) / ZOO_LOCK, time.monotonic() + wait_s, False
    while True:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 400, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            if time.monotonic() > deadline:
                raise ZooError(f"{lock.parent}: zoo in use by {holder} for more than {wait_s:g} s; wait for it to "
                               f"finish and run the same command again") from None
            if not told:
                say(f"[zoo] {lock.parent}: waiting for {holder} to finish writing the zoo", flush=True)
                told = True
            time.sleep(0.05)
            continue
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the folder was swapped while we waited: lock the new one's file
            os.close(fd)
            continue
        break
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} ({' '.join(sys.argv[:3])[:200]})".encode(), 0)
        yield lock
    finally:
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        os.close(fd)


def run_dir_of(zoo_dir: Path | str) -> Path | None:
    """The klas run directory whose zoo folder ``zoo_dir`` is (``RUN_DIR/zoo`` beside ``RUN_DIR/run.json``), or
    None."""
    zoo = Path(zoo_dir).absolute()
    return zoo.parent if zoo.name == "zoo" and (zoo.parent / "run.json").is_file() else None


def make_zoo_hint(zoo_dir: Path | str, extra: str = "") -> str:
    """A command line that (re)makes this zoo: ``klas export --run-dir RUN`` for a run's zoo folder, else how a
    run makes one (its folder is always ``RUN_DIR/zoo``)."""
    run = run_dir_of(zoo_dir)
    if run is not None:
        return f"run `klas export --run-dir {run}{extra}`"
    return (f"a zoo is made by a klas run, in RUN_DIR/zoo: `klas run CONFIG --run-dir RUN_DIR`, or `klas export "
            f"--run-dir RUN_DIR{extra}` for a run that has finished its evaluation")
