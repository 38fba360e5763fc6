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

import math
import sys
import time
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
        self.opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
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
    """The data-parallel wrapper: DDP (find_unused_parameters: each step trains one configuration) or FSDP."""
    from klas.errors import KlasError

    if parallel == "fsdp":
        if device.type != "cuda":
            raise KlasError("--parallel fsdp: torch's FSDP needs CUDA devices; use --parallel ddp on the CPU")
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        # NOTE: one root unit with original parameters, so the per-config forward of the shared recipe's supernetwork
        # (which reuses the anchors' submodules) keeps working; every rank runs the same configuration, so all-gathers
        # line up.
        return FSDP(net, device_id=device, use_orig_params=True, sync_module_states=True)
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(net, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)


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
