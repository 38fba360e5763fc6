"""Independent jobs in forked worker processes of one intra-op thread each, on the CPU.

Why: the demo's networks are small, and a second intra-op thread helps them less than a second process -- a DeiT-B
(fmnist) forward + backward at batch 128 took 394 ms on one thread, 268 ms on two, and two single-thread processes
side by side made a step every 160 ms between them on a 2-core AMD EPYC with AVX2 (1.68x), 193 / 127 / 102 ms on
one with AVX-512 (1.24x; ``python benchmarks/fork_scaling.py``, docs/finetune.md). A job here is a pure function
of its input and the state the parent holds when it forks (the workers inherit it, nothing is pickled but the
results), so the results are those of running the jobs in the parent on one thread.

Used where a stage has several independent jobs: the finetune stage's stitches (independent / frozen recipes) and
the export stage's members. ``fork`` only: CUDA, which cannot be forked, and a torchrun job keep their own loops.
"""
from __future__ import annotations

import os
import pickle
import queue
import sys
import traceback
from typing import Callable, Iterable

from klas.errors import KlasError


def cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def available_memory() -> int | None:
    """Bytes of memory the kernel says a new process could take without swapping (MemAvailable), None unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def can_fork() -> bool:
    """Whether workers can be forked here: the platform has ``fork`` and this process has not initialised CUDA
    (a forked child cannot use it, and the parent's CUDA state is not fork-safe)."""
    import multiprocessing

    torch = sys.modules.get("torch")
    cuda = torch is not None and hasattr(torch, "cuda") and torch.cuda.is_initialized()
    return "fork" in multiprocessing.get_all_start_methods() and not cuda


def in_worker() -> bool:
    """Whether this process is a ``run_forked`` worker (which may not start processes of its own)."""
    return _IN_WORKER


_IN_WORKER = False


def worker_count(jobs: int, requested: int | None = None, job_bytes: int = 0) -> int:
    """How many workers ``jobs`` jobs get: ``requested`` (None: one per core), at most one per job, and no more
    than the available memory holds at ``job_bytes`` each (its private memory: what a job writes, not what it reads
    of the parent's); 1 (run in the parent) where fork is unavailable or in a worker."""
    if in_worker():
        return 1
    n = min(max(jobs, 1), requested if requested is not None else cores())
    free = available_memory() if job_bytes > 0 else None
    if free is not None:
        n = min(n, max(1, int(0.8 * free) // job_bytes))
    return n if n > 1 and can_fork() else 1


class Progress:
    """A worker's stand-in for the parent's tqdm bar: ``update`` / ``set_postfix`` travel to the parent, which
    draws one bar for every worker."""

    def __init__(self, messages):
        self.messages = messages

    def update(self, n: int = 1) -> None:
        self.messages.put(("update", None, n))

    def set_postfix(self, **kw) -> None:
        self.messages.put(("postfix", None, kw))


def _serve(fn, tasks, messages, threads: int) -> None:
    import torch

    from klas_runtime import session

    global _IN_WORKER
    _IN_WORKER = True
    torch.set_num_threads(threads)
    session.DEFAULT_THREADS = threads  # onnxruntime sessions opened without a thread count
    bar = Progress(messages)
    while True:
        item = tasks.get()
        if item is None:
            return
        try:
            messages.put(("done", item, fn(item, bar)))
        except BaseException as e:  # noqa: BLE001 -- reported to the parent, which raises it
            try:
                raw = pickle.dumps(e)
            except Exception:  # noqa: BLE001 -- an exception that does not pickle: its type and text
                raw = None
            messages.put(("error", item, (raw, f"{type(e).__name__}: {e}",
                                          "".join(traceback.format_exception(e)).rstrip())))
            return


class RemoteTraceback(Exception):
    """The traceback of a worker's exception, attached as its ``__cause__`` (as ``concurrent.futures`` does)."""

    def __str__(self) -> str:
        return self.args[0]


def _raised(raw: bytes | None, text: str, tb: str, what: str, item) -> BaseException:
    """A worker's exception as the parent raises it: the same exception (a KlasError or an OSError then reads as
    the same one line the CLI prints in-process), its worker traceback as the cause; one that does not unpickle
    becomes a KlasError naming the job."""
    try:
        e = pickle.loads(raw) if raw is not None else None
    except Exception:  # noqa: BLE001
        e = None
    if not isinstance(e, BaseException):
        return KlasError(f"{what} {item} failed in its worker process: {text}")
    if not isinstance(e, (KlasError, OSError)):
        e.add_note(f"(in the worker process of {what} {item})")
    e.__cause__ = RemoteTraceback(f"\n{tb}")
    return e


def run_forked(fn: Callable, items: Iterable, workers: int, bar=None, threads: int = 1, what: str = "job") -> dict:
    """``{item: fn(item, progress)}`` for every item, computed in ``workers`` forked processes of ``threads``
    intra-op threads each (torch's, and onnxruntime sessions' that name none), the items handed out in the order
    given (longest first balances the load). ``progress`` forwards to ``bar`` (tqdm-like: ``update``,
    ``set_postfix``). A job's exception is raised here as it was, its worker's traceback as the cause
    (``_raised``); a worker that dies, as a KlasError naming the ``what``. The remaining workers are stopped then
    (their checkpoints stay for a relaunch)."""
    import multiprocessing

    items = list(items)
    ctx = multiprocessing.get_context("fork")
    tasks, messages = ctx.SimpleQueue(), ctx.Queue()
    for item in items:
        tasks.put(item)
    for _ in range(workers):
        tasks.put(None)
    procs = [ctx.Process(target=_serve, args=(fn, tasks, messages, threads), daemon=True) for _ in range(workers)]
    sys.stdout.flush(), sys.stderr.flush()  # NOTE: a buffered line would be printed by every child too
    for p in procs:
        p.start()
    results: dict = {}
    try:
        while len(results) < len(items):
            try:
                kind, item, value = messages.get(timeout=1.0)
            except queue.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead or all(p.exitcode is not None for p in procs):
                    code = dead[0].exitcode if dead else 0
                    raise KlasError(f"a {what} worker process ended (exit code {code}) before finishing its "
                                    f"{what}; rerun to resume") from None
                continue
            if kind == "update" and bar is not None:
                bar.update(value)
            elif kind == "postfix" and bar is not None:
                bar.set_postfix(**value)
            elif kind == "done":
                results[item] = value
            elif kind == "error":
                raise _raised(*value, what, item)
    finally:
        for p in procs:
            if p.is_alive() and len(results) < len(items):
                p.terminate()
            p.join()
        messages.close()
    return results
