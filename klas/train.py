"""The training-loop parts shared by the anchor trainer, the probes and the finetune stage.

Each loop keeps its own data order, forward and loss (anchors train from scratch, probes on frozen features,
finetuning samples a stitch configuration per step under DDP); what they share lives here:

* ``WarmupCosineLR``: the one learning-rate schedule, a ``torch.optim.lr_scheduler.LRScheduler``;
* ``Trainer``: AdamW (optionally timm's no-decay groups), that schedule, gradient clipping, and a checkpoint
  (model + optimizer + schedule + torch RNG + step, written atomically) that resumes exactly;
* ``epoch_generator`` (seeded data order) and ``progress_bar`` (tqdm on the main rank only);
* ``run_epochs`` and its typed ``LoopState``: the one epoch loop of the finetune stage's recipes.

Exact resume rests on the rest being a function of the seed and the step: the learning rate is a closed form of the
step (restored with the scheduler), and a loop's data order comes from a generator seeded per epoch.
"""
from __future__ import annotations

import functools
import math
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from torch.optim.lr_scheduler import LRScheduler
from tqdm import tqdm

from klas.contract import setting
from klas.io import save_checkpoint

CHECKPOINT_FORMAT = "klas-train-v1"  # checkpoints of the loops before klas.train do not resume (other layout)
NO_DECAY = ("*pos_embed", "*cls_token", "*dist_token", "*reg_token")  # with biases and norms (all 1-D parameters)


@dataclass(frozen=True)
class AdamWSettings:
    """The settings every AdamW loop of klas has (the anchor trainer's recipe, the probes); a config extends it and
    sets its own defaults with ``klas.contract.overrides``."""

    epochs: int = setting(1, "training epochs", ge=1)
    batch_size: int = setting(256, "images per step", ge=1)
    lr: float = setting(1e-3, "AdamW peak learning rate", gt=0)
    weight_decay: float = setting(0.0, "AdamW weight decay", ge=0)


class WarmupCosineLR(LRScheduler):
    """Linear warm-up from ``lr / warmup_steps`` to ``lr`` over the first ``warmup_steps`` steps, then cosine decay
    from ``lr`` towards ``min_lr`` over the remaining ones (``lr``: each param group's initial lr).

    ``get_lr`` is the closed form of ``last_epoch`` (here: the number of optimizer steps taken), not a chained
    update, so the lr of step s is the same whether the run was resumed or not. It is the expression finetuning
    used before, bit for bit; the anchor trainer's and the probes' old schedules rounded the cosine's argument as
    ``(pi * k) / n`` instead of ``pi * (k / n)`` (at most 7e-13 relative in double; the float32 step sizes AdamW
    applies were identical over the shipped recipes). LambdaLR (``base_lr * factor``) rounds the warm-up and the
    ``min_lr`` blend differently, SequentialLR(LinearLR, CosineAnnealingLR) chains a recursion that drifts.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0,
                 min_lr: float = 0.0):
        self.total_steps, self.warmup_steps, self.min_lr = total_steps, warmup_steps, min_lr
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        s, warm = self.last_epoch, self.warmup_steps
        if s < warm:
            return [base * (s + 1) / warm for base in self.base_lrs]
        t = (s - warm) / max(self.total_steps - warm, 1)
        return [self.min_lr + 0.5 * (base - self.min_lr) * (1 + math.cos(math.pi * t)) for base in self.base_lrs]


class Trainer:
    """Optimizer, schedule, clipping and checkpoint of one training loop; the loop runs forward and backward.

    Per step: ``loss.backward()`` then ``trainer.update()``. ``step`` counts optimizer steps (a resumed loop
    derives its position from it); ``lr`` is the learning rate the next ``update`` applies.

    Args:
        model: the module whose parameters train (the unwrapped one under DDP); its ``state_dict`` is checkpointed.
        no_decay: timm's grouping -- no weight decay on biases, norms, position embeddings and class tokens
            (finetuning); False: ``weight_decay`` on every parameter (the anchor recipe, the probes).
        clip_grad: max global gradient norm over ``model.parameters()`` (0: no clipping).
        lr_scale: optional ``f(parameter name) -> multiplier`` of the learning rate (and so of the decoupled weight
            decay) per parameter, e.g. anchors at a fraction of the stitch layers' rate; None: one rate for all.
    """

    def __init__(self, model: nn.Module, *, lr: float, weight_decay: float, total_steps: int, warmup_steps: int = 0,
                 min_lr: float = 0.0, clip_grad: float = 0.0, no_decay: bool = False, lr_scale=None):
        self.model, self.clip_grad = model, clip_grad
        if no_decay:
            from timm.optim import param_groups_weight_decay

            params = param_groups_weight_decay(model, weight_decay, no_weight_decay_list=NO_DECAY)
        else:
            params = model.parameters()
        if lr_scale is not None:  # optional: per-parameter learning-rate multipliers (see scale_groups)
            params = scale_groups(model, params, lr_scale)
        params = list(params)
        # NOTE: fused: one kernel over all tensors (CPU too): 3x faster steps than the default per-tensor loop on
        # CPU (5 vs 16 ms for 5.4M parameters here), same update; not for sharded (DTensor) parameters
        tensors = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
        fused = all(type(p.data) is torch.Tensor and p.device.type in ("cpu", "cuda") for p in tensors)
        self.opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)
        self.sched = (WarmupCosineLR if lr_scale is None else ScaledWarmupCosineLR)(self.opt, total_steps,
                                                                                   warmup_steps, min_lr)
        self.opt.zero_grad(set_to_none=True)  # whatever an earlier fit left on shared parameters

    @property
    def step(self) -> int:
        return self.sched.last_epoch

    @property
    def lr(self) -> float:
        return self.opt.param_groups[0]["lr"]

    def update(self) -> None:
        """Clip the gradients the caller's backward left, take the AdamW step, advance the schedule, clear them."""
        if self.clip_grad > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)  # params without a grad are skipped
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)

    # --- checkpoint -------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return dict(format=CHECKPOINT_FORMAT, step=self.step, model=self.model.state_dict(),
                    opt=self.opt.state_dict(), sched=self.sched.state_dict(), rng=torch.get_rng_state())

    def save(self, path: Path | str, resume_tag, **extra) -> None:
        """Write the training state, what it was made for (``resume_tag``: settings, inputs) and the loop's
        ``extra`` (its history) atomically."""
        save_checkpoint({**self.state_dict(), "resume_tag": resume_tag, **extra}, path)

    @staticmethod
    def matches(ck: dict, resume_tag) -> bool:
        """Whether checkpoint ``ck`` was saved by a Trainer with this ``resume_tag`` (else it must not be resumed)."""
        return ck.get("format") == CHECKPOINT_FORMAT and ck.get("resume_tag") == resume_tag

    def load_state_dict(self, ck: dict) -> None:
        """Continue exactly where ``ck`` stopped: weights, AdamW moments, schedule position and torch's RNG."""
        self.model.load_state_dict(ck["model"])
        self.opt.load_state_dict(ck["opt"])
        self.sched.load_state_dict(ck["sched"])
        torch.set_rng_state(ck["rng"])


class ScaledWarmupCosineLR(WarmupCosineLR):
    """``WarmupCosineLR`` times each param group's ``lr_scale`` (1 when absent): the whole schedule of a group, warm-up
    and ``min_lr`` included, is the scaled one, so a group with scale 0 never moves (AdamW's decoupled weight decay
    is multiplied by the lr too). Still a closed form of the step, so resumes stay exact."""

    def get_lr(self) -> list[float]:
        return [lr * g.get("lr_scale", 1.0) for lr, g in zip(super().get_lr(), self.optimizer.param_groups)]


def scale_groups(model: nn.Module, groups, lr_scale) -> list[dict]:
    """Split optimizer param groups (``model.parameters()`` or timm's decay / no-decay dicts) by a learning-rate
    multiplier ``lr_scale(parameter name) -> float``, kept in each group as ``lr_scale`` (for
    ``ScaledWarmupCosineLR``). Groups at scale 1 come first, so ``Trainer.lr`` reports the unscaled rate."""
    names = {id(p): n for n, p in model.named_parameters()}
    groups = list(groups)
    if groups and not isinstance(groups[0], dict):
        groups = [dict(params=groups)]
    out = []
    for g in groups:
        by_scale: dict[float, list] = {}
        for p in g["params"]:
            by_scale.setdefault(float(lr_scale(names[id(p)])), []).append(p)
        for s in sorted(by_scale, key=lambda s: (s != 1.0, s)):
            out.append({**g, "params": by_scale[s], "lr_scale": s})
    return sorted(out, key=lambda g: g["lr_scale"] != 1.0)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator of epoch ``epoch``'s data order (and augmentation): a function of (seed, epoch) only, so a
    loop resumed at an epoch boundary sees the batches of the uninterrupted run."""
    return torch.Generator().manual_seed(seed * 1000 + epoch)


def progress_bar(iterable=None, *, enabled: bool = True, **kw) -> tqdm:
    """tqdm on stdout that stays quiet on ranks other than 0 and leaves no line behind (override with ``kw``)."""
    from klas import distributed as kd

    kw = dict(dict(file=sys.stdout, leave=False, mininterval=2), **kw)
    return tqdm(iterable, disable=not enabled or not kd.info().is_main, **kw)


@dataclass
class LoopState:
    """What a training loop carries across steps and into its checkpoint: per-epoch history, every step's loss,
    training wall time; the ``shared`` recipe also counts steps per configuration and keeps the val accuracy before
    training. Checkpointed as a plain dict (``as_dict``), so checkpoints load with ``weights_only=True``."""

    history: list = field(default_factory=list)
    losses: list = field(default_factory=list)
    wall_s: float = 0.0
    counts: list | None = None
    val_init: list | None = None
    curves: dict | None = None  # independent / frozen: each stitch's step losses, by configuration key

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LoopState":
        return cls(**{k: d[k] for k in ("history", "losses", "wall_s", "counts", "val_init", "curves") if k in d})


def run_epochs(tr: Trainer, state: LoopState, *, total: int, steps_per_epoch: int, epoch_batches, step, bar,
               save, ckpt_every: int = 0, on_step=None) -> None:
    """The one epoch loop of the finetune stage's recipes, from ``tr.step`` to ``total`` optimizer steps.

    ``epoch_batches(step)`` yields the batches from global ``step`` to the end of its epoch (a resumed epoch replays
    its seeded order up to there); ``step(batch) -> (loss, label)`` runs forward and backward (``label`` names what
    trained, for the progress bar); the loop then takes the optimizer step, records the loss, calls ``on_step(step)``
    (a test hook) and checkpoints (``save()``) at every epoch end and every ``ckpt_every`` steps within an epoch.
    """
    lr = tr.lr
    while tr.step < total:
        epoch = tr.step // steps_per_epoch
        t0 = time.perf_counter()
        for batch in epoch_batches(tr.step):
            lr = tr.lr  # this step's learning rate (the history records the last one of each epoch)
            loss, label = step(batch)
            tr.update()
            state.losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", cfg=label)
            if on_step is not None:
                on_step(tr.step)
            if ckpt_every and tr.step % ckpt_every == 0 and tr.step % steps_per_epoch:
                state.wall_s += time.perf_counter() - t0
                t0 = time.perf_counter()
                save()
        state.wall_s += time.perf_counter() - t0
        done = state.losses[epoch * steps_per_epoch:]  # the whole epoch, also when it was resumed midway
        state.history.append(dict(epoch=epoch + 1, step=tr.step, lr=lr, loss=sum(done) / len(done)))
        save()


# --- the finetune stage's deterministic schedule and data-parallel wrapper ------------------------------------------

def derive_seed(seed: int, *tags) -> int:
    """A 63-bit seed derived from the run seed and tags: independent streams without arithmetic seed collisions."""
    import hashlib
    import json

    h = hashlib.sha256(json.dumps([seed, *tags]).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def config_at(step: int, n_configs: int, seed: int, sampling: str = "balanced") -> int:
    """Index of the configuration trained at global step ``step``; the same on every rank and after any resume."""
    if sampling == "uniform":
        g = torch.Generator().manual_seed(derive_seed(seed, "uniform", step))
        return int(torch.randint(n_configs, (1,), generator=g))
    block, pos = divmod(step, n_configs)
    g = torch.Generator().manual_seed(derive_seed(seed, "balanced", block))
    return int(torch.randperm(n_configs, generator=g)[pos])


def _stream(data, batch_size: int, augment: bool, seed: int, epoch: int, rank: int, world: int):
    """Training batches of epoch ``epoch``: seeded passes over the data, repeated as needed, rank-sharded."""
    from klas.data import batches

    gen = torch.Generator().manual_seed(derive_seed(seed, "data", epoch))
    while True:
        yield from batches(data, batch_size, shuffle=True, gen=gen, train_augment=augment, drop_last=True,
                           rank=rank, world_size=world)


def rest_of_epoch(step: int, spe: int, train, batch_size: int, augment: bool, seed: int, rank: int, world: int,
                  device):
    """The training batches from global ``step`` to the end of its epoch, on ``device``: a resumed epoch replays its
    seeded data order up to the step it stopped at (cheap: indexing + augmentation) and goes on from there."""
    import itertools

    epoch, pos = divmod(step, spe)
    stream = itertools.islice(_stream(train, batch_size, augment, seed, epoch, rank, world), pos, None)
    for _ in range(pos, spe):
        x, y = next(stream)
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def data_parallel(net: nn.Module, parallel: str, device: torch.device) -> nn.Module:
    """The data-parallel wrapper of the finetune stage under torchrun: every rank runs the same configuration on its
    shard of the global batch and the gradients are averaged, so training equals the single-process run.

    ``ddp``: ``DistributedDataParallel(find_unused_parameters=True)`` around ``net`` (each step trains one
    configuration; the optimizer holds ``net``'s own parameters, built before or after).

    ``fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``), applied to ``net`` in place and returned: every block of
    every block view in ``net`` (transformer block, decoder layer, residual block) is one unit, then ``net`` the root
    unit (the rest: stems, heads, the stitch layer). Each parameter becomes a ``DTensor`` sharded on dim 0 over the
    ranks, all-gathered per unit for its forward and backward and freed after; gradients are reduce-scattered
    (averaged). CUDA (nccl) or CPU (gloo). Rank 0's weights are broadcast first (as DDP does); ``net`` may still be
    on the CPU: each unit moves to ``device`` as it is sharded, so the device holds at most one unit in full. Then:

    * build the optimizer AFTER this call (the parameters are new objects); parameters that no unit runs in a step
      (an anchor's unused blocks) get no gradient, on every rank alike, as in one process;
    * ``net.no_sync()`` exists, as DDP's (``set_requires_gradient_sync(False)`` meanwhile): micro-batches accumulate
      unreduced gradients until the last one;
    * checkpoint and resume with ``save_training`` / ``load_training`` (full tensors, the single-process format) and
      take the trained weights back with ``unshard``: collectives, every rank calls them;
    * FSDP2 reduces a unit's gradients as one buffer of one dtype: where a unit's trainable parameters mix dtypes
      (a float32 stitch layer between bfloat16 anchors), the submodules of the other dtypes become units of their own
      (``_fsdp_units``); such a submodule must run through its own ``forward`` (``module(x)``).
    """
    from klas.errors import KlasError

    if parallel == "fsdp":
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        if not (dist.is_available() and dist.is_initialized()):
            raise KlasError("--parallel fsdp: needs a process group (run under torchrun)")
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        with _collectives("FSDP2 weight broadcast"):
            _broadcast_states(net, device)
        for unit in _fsdp_units(net):
            fully_shard(unit, mesh=mesh)
        # NOTE: an instance attribute: DDP's no_sync() interface, which the finetune stage's accumulation uses
        net.no_sync = functools.partial(_no_gradient_sync, net)
        return net
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(net, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` was sharded by ``data_parallel(..., "fsdp")`` (FSDP2)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _fsdp_units(net: nn.Module) -> list[nn.Module]:
    """The modules ``fully_shard`` is applied to, bottom-up, ``net`` last: the blocks of every block view in ``net``
    (``BlockView.blocks``, or any module's plain-list ``blocks`` of modules) and ``net``, each preceded by the
    submodules split off it so that every unit's trainable parameters have one dtype (``_dtype_units``).

    A block that is a wrapper outside ``net``'s module tree (the LM view's ``DecoderBlock`` around a HF decoder
    layer, a view's ``nn.Sequential`` of a downsample and a block) is replaced by its topmost submodules inside the
    tree: FSDP2 finds a unit's parameters through registered children and stops at nested units, so a unit the tree
    does not reach would also be claimed by the root."""
    from klas.families.blockview import BlockView

    registered = {id(m) for m in net.modules()}

    def placed(m: nn.Module) -> list[nn.Module]:
        return [m] if id(m) in registered else [u for c in m.children() for u in placed(c)]

    blocks, seen = [], {id(net)}
    for m in net.modules():
        group = m.blocks if isinstance(m, BlockView) or isinstance(getattr(m, "blocks", None), list) else ()
        for blk in group:
            for u in placed(blk) if isinstance(blk, nn.Module) else ():
                if id(u) not in seen and next(u.parameters(), None) is not None:
                    seen.add(id(u))
                    blocks.append(u)
    covered: set[int] = set()  # parameters already in a unit
    units: list[nn.Module] = []
    for u in blocks + [net]:
        units += _dtype_units(u, covered)
    return units


def _trainable(m: nn.Module, covered: set[int], recurse: bool = True) -> list[nn.Parameter]:
    return [p for p in m.parameters(recurse=recurse) if p.requires_grad and id(p) not in covered]


def _dtype_units(u: nn.Module, covered: set[int]) -> list[nn.Module]:
    """``u`` as a unit (last) and before it the submodules that must be units of their own so that the trainable
    parameters left to ``u`` share one dtype: ``u``'s own direct parameters' dtype, else its most common one."""
    from klas.errors import KlasError

    rest = _trainable(u, covered)
    dtypes = {p.dtype for p in rest}
    out: list[nn.Module] = []
    if len(dtypes) > 1:
        direct = {p.dtype for p in _trainable(u, covered, recurse=False)}
        if len(direct) > 1:
            raise KlasError(f"--parallel fsdp: {type(u).__name__} holds trainable parameters of dtypes "
                            f"{sorted(map(str, direct))} itself; FSDP2 needs one dtype per sharded module")
        keep = next(iter(direct)) if direct else max(
            dtypes, key=lambda d: sum(p.numel() for p in rest if p.dtype == d))

        def split(m: nn.Module) -> None:  # the largest submodules of m holding trainable parameters of other dtypes
            inner = {p.dtype for p in _trainable(m, covered)}
            if inner <= {keep}:
                return
            if keep in inner and {p.dtype for p in _trainable(m, covered, recurse=False)} <= {keep}:
                for c in m.children():  # m itself is fine: only some of its submodules are not
                    split(c)
            else:
                out.extend(_dtype_units(m, covered))

        for c in u.children():
            split(c)
    covered.update(id(p) for p in u.parameters())
    return out + [u]


def _broadcast_states(net: nn.Module, device: torch.device) -> None:
    """Rank 0's parameters and buffers on every rank (DDP's and FSDP1's ``sync_module_states``), one tensor at a
    time through ``device`` (nccl needs device tensors)."""
    import torch.distributed as dist

    with torch.no_grad():
        for t in net.state_dict(keep_vars=True).values():
            buf = t.detach() if t.device == device else t.detach().to(device)
            dist.broadcast(buf, 0)
            if t.device != device:
                t.copy_(buf)


@contextmanager
def _no_gradient_sync(model: nn.Module):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


@contextmanager
def _collectives(what: str):
    """A collective that fails (a dead or hung peer) ends the job with klas's one-line error."""
    import torch.distributed as dist

    from klas import distributed as kd
    from klas.errors import KlasError

    try:
        yield
    except KlasError:
        raise
    except (RuntimeError, dist.DistError) as e:
        raise kd.peer_failure(e, what) from None


def _full(t):
    """A sharded ``DTensor``'s whole tensor (an all-gather: every rank calls); anything else as it is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def training_state(tr: Trainer) -> dict | None:
    """``tr.state_dict()`` with full tensors: under FSDP2 an all-gather per sharded tensor (every rank calls, in the
    same order; rank 0 gets the dict, with the tensors on the CPU, the others None), so the checkpoint has the
    single-process layout and resumes on any number of ranks, under any wrapper. Otherwise ``tr.state_dict()``."""
    sd = tr.state_dict()
    if not is_sharded(tr.model):
        return sd
    import torch.distributed as dist

    main = dist.get_rank() == 0

    def full(v):
        v = _full(v)
        return v.cpu() if main and isinstance(v, torch.Tensor) else v

    # NOTE: new dicts: the optimizer's state_dict() shares its per-parameter state dicts with the optimizer
    model = {k: full(v) for k, v in sd["model"].items()}
    state = {i: {n: full(v) for n, v in s.items()} for i, s in sd["opt"]["state"].items()}
    return {**sd, "model": model, "opt": {**sd["opt"], "state": state}} if main else None


def save_training(tr: Trainer, path: Path | str, rank: int, resume_tag, **extra) -> None:
    """``tr.save(path, resume_tag, **extra)`` on rank 0 (call it on every rank): under FSDP2 every rank takes part in
    gathering the full tensors (``training_state``) and rank 0 writes them."""
    if not is_sharded(tr.model):
        if rank == 0:
            tr.save(path, resume_tag, **extra)
        return
    with _collectives("FSDP2 checkpoint gather"):
        sd = training_state(tr)
    if rank == 0:
        save_checkpoint({**sd, "resume_tag": resume_tag, **extra}, path)


def load_training(tr: Trainer, ck: dict) -> None:
    """``tr.load_state_dict(ck)`` for any wrapper: under FSDP2 each rank takes its shards of the checkpoint's full
    tensors (every rank read the same file: no communication), weights and AdamW moments alike."""
    if not is_sharded(tr.model):
        tr.load_state_dict(ck)
        return
    from torch.distributed.tensor import DTensor, distribute_tensor

    def shard(full, like):
        if not isinstance(like, DTensor) or not isinstance(full, torch.Tensor) or full.shape != like.shape:
            return full  # buffers, AdamW's step counts
        return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements,
                                 src_data_rank=None)

    current = tr.model.state_dict()
    tr.model.load_state_dict({k: shard(v, current.get(k)) for k, v in ck["model"].items()})
    params = [p for g in tr.opt.param_groups for p in g["params"]]
    opt = ck["opt"]
    # NOTE: AdamW counts its steps in place in the tensor it is handed: a clone, so ``ck`` stays as it was read
    state = {i: {n: shard(v, params[int(i)]) if n != "step" else (v.clone() if isinstance(v, torch.Tensor) else v)
                 for n, v in s.items()} for i, s in opt["state"].items()}
    tr.opt.load_state_dict({**opt, "state": state})
    tr.sched.load_state_dict(ck["sched"])
    torch.set_rng_state(ck["rng"])


def unshard(model: nn.Module, plain: nn.Module) -> nn.Module:
    """The trained weights of a network sharded by ``data_parallel(..., "fsdp")`` in an ordinary module: ``plain`` (an
    unsharded module of the same structure, e.g. a fresh build) with ``model``'s full parameters and buffers, on
    every rank (an all-gather per parameter: every rank calls). ``model`` itself when it is not sharded."""
    if not is_sharded(model):
        return model
    with _collectives("FSDP2 weight gather"):
        full = {k: _full(v) for k, v in model.state_dict().items()}
    plain.load_state_dict(full)
    return plain


def plot_training(losses: list[float], path: Path, curves: dict[str, list[float]] | None = None) -> None:
    if not losses:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from klas.io import atomic_path

    def smooth(v: list[float]) -> list[float]:
        w = max(1, len(v) // 50)
        return [sum(v[max(0, s - w + 1):s + 1]) / len(v[max(0, s - w + 1):s + 1]) for s in range(len(v))]

    fig, ax = plt.subplots(figsize=(6, 3.5))
    if curves:  # independent / frozen: one curve per stitch, each over its own steps
        for key, v in curves.items():
            ax.plot(smooth(v), lw=1.2, label=key)
        ax.set_title("finetuning, one network per stitch (moving mean)")
        ax.legend(fontsize=6)
    else:
        ax.plot(losses, lw=0.5, alpha=0.4, label="step loss (sampled config)")
        ax.plot(smooth(losses), lw=1.5, label=f"moving mean ({max(1, len(losses) // 50)} steps)")
        ax.set_title("supernetwork finetuning")
        ax.legend()
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
