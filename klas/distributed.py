"""Scale-out helpers shared by the heavy stages (probes, scores, finetune, evaluation): one place that knows torchrun.

Every stage calls ``init()`` first. Outside torchrun (``WORLD_SIZE`` unset or 1) it returns rank 0 of 1 and every
helper below is a no-op, so single-process code paths stay exactly as they were. Under ``torchrun`` it joins the
process group the launcher describes (env:// rendezvous), with a timeout on every collective, so that a rank that
died or hangs ends the job with a clear error instead of a hang. See docs/scale-out.md.

Conventions (why they hold the results equal to the single-process run):
- data is sharded per global batch (``klas.data.batches(rank=, world_size=)``): the union of the shards is the
  single-process batch, so sums over a batch are unchanged;
- streaming statistics are additive (float64 sums + counts) and are combined with ONE ``all_reduce`` each;
- only rank 0 writes artifacts (atomically, through ``klas.io``); the others wait at a barrier, then read them.
"""
from __future__ import annotations

import datetime
import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from klas.errors import KlasError

TIMEOUT_ENV = "KLAS_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 600.0  # long enough for a slow checkpoint write on rank 0, short enough to notice a dead peer


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job: global rank, world size, rank on its node, and its device."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def timeout_s() -> float:
    """Collective timeout in seconds (``KLAS_DIST_TIMEOUT_S``, default 600)."""
    raw = os.environ.get(TIMEOUT_ENV, "")
    try:
        t = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise KlasError(f"{TIMEOUT_ENV}={raw!r}: expected a number of seconds") from None
    if not t > 0:
        raise KlasError(f"{TIMEOUT_ENV}={raw!r}: must be > 0")
    return t


def init(backend: str | None = None) -> DistInfo:
    """Join torchrun's process group if this process was launched by it (``WORLD_SIZE`` > 1) and nobody has yet.

    Backend: nccl when CUDA is present, else gloo (override with ``backend``). Idempotent: every stage calls it.
    """
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local}" if cuda else "cpu")
    if env_world > 1 and dist.is_available() and not dist.is_initialized():
        backend = backend or ("nccl" if cuda else "gloo")
        if cuda:
            torch.cuda.set_device(device)
        timeout = datetime.timedelta(seconds=timeout_s())
        try:
            store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
            # NOTE: after an elastic restart (--max-restarts) torchrun hands the new workers the same store; without
            # a per-attempt prefix they read the dead attempt's gloo addresses and fail to connect.
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            store = dist.PrefixStore(f"klas/attempt_{attempt}", store)
            dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
        except Exception as e:  # rendezvous failures: name the address the job tried
            addr = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
            raise KlasError(f"rank {os.environ.get('RANK', '?')}: could not join the process group at {addr} "
                            f"({type(e).__name__}: {_first_line(e)})") from None
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local, device)
    return DistInfo(0, 1, 0, device)


def info() -> DistInfo:
    """The current position without joining anything (rank 0 of 1 outside a process group)."""
    if dist.is_available() and dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
        return DistInfo(dist.get_rank(), dist.get_world_size(), local, device)
    return DistInfo()


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0][:200] if s else type(e).__name__


def peer_failure(e: BaseException, what: str) -> KlasError:
    """The one-line error a rank raises when a collective fails: a peer died, hung past the timeout or diverged."""
    return KlasError(f"rank {info().rank}/{info().world}: distributed {what} failed -- a peer rank died or did not "
                     f"answer within {timeout_s():.0f}s ({TIMEOUT_ENV}); the job stops. Relaunch (or torchrun "
                     f"--max-restarts) to resume from the last checkpoint. [{type(e).__name__}: {_first_line(e)}]")


def _collective(fn, what: str):
    try:
        return fn()
    except KlasError:
        raise
    except (RuntimeError, dist.DistError) as e:
        raise peer_failure(e, what) from None


def barrier(what: str = "barrier") -> None:
    """Wait for every rank (no-op in a single process)."""
    if info().distributed:
        _collective(dist.barrier, what)


def all_reduce_(tensors: Iterable[torch.Tensor], what: str = "all_reduce") -> None:
    """In-place SUM over ranks of every tensor (one flat float64 all_reduce per dtype; no-op in one process)."""
    tensors = list(tensors)
    if not info().distributed or not tensors:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for ts in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in ts])
        _collective(lambda: dist.all_reduce(flat, op=dist.ReduceOp.SUM), what)
        offset = 0
        for t in ts:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


def all_reduce_int(value: int, what: str = "all_reduce") -> int:
    """Sum of an integer over ranks (exact: int64)."""
    t = torch.tensor([value], dtype=torch.int64)
    all_reduce_([t], what)
    return int(t.item())


def all_reduce_pairwise_kl(accs: Iterable, what: str = "KL accumulators") -> None:
    """Combine ``klas.ops.PairwiseKL`` accumulators of disjoint data shards in place: their float64 ``sum`` tables
    and sample ``count`` are additive, so after this every rank holds the single-process state. One all_reduce for
    all tables and counts together (counts ride along as float64: exact below 2**53 samples)."""
    accs = list(accs)
    if not info().distributed or not accs:
        return
    counts = torch.tensor([float(a.count) for a in accs], dtype=torch.float64, device=accs[0].sum.device)
    all_reduce_([a.sum for a in accs] + [counts], what)
    for a, c in zip(accs, counts.tolist()):
        a.count = int(c)


def gather_objects(obj, what: str = "gather") -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank (``[obj]`` in one process)."""
    if not info().distributed:
        return [obj]
    out = [None] * info().world
    _collective(lambda: dist.all_gather_object(out, obj), what)
    return out


def broadcast_object(obj, src: int = 0, what: str = "broadcast"):
    """Rank ``src``'s ``obj`` on every rank."""
    if not info().distributed:
        return obj
    box = [obj]
    _collective(lambda: dist.broadcast_object_list(box, src=src), what)
    return box[0]


def check_divisible(batch_size: int, world: int, flag: str = "--batch-size") -> None:
    """Equal shards keep DDP's gradient average equal to the single-process mean over the global batch."""
    if world > 1 and batch_size % world:
        raise KlasError(f"{flag} {batch_size}: the global batch must split evenly over {world} ranks")
