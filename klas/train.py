"""The training-loop parts shared by the anchor trainer, the probes and supernet finetuning.

Each loop keeps its own data order, forward and loss (anchors train from scratch, probes on frozen features,
finetuning samples a stitch configuration per step under DDP); what they share lives here:

* ``WarmupCosineLR``: the one learning-rate schedule, a ``torch.optim.lr_scheduler.LRScheduler``;
* ``Trainer``: AdamW (optionally timm's no-decay groups), that schedule, gradient clipping, and a checkpoint
  (model + optimizer + schedule + torch RNG + step, written atomically) that resumes exactly;
* ``epoch_generator`` (seeded data order) and ``progress_bar`` (tqdm on the main rank only).

Exact resume rests on the rest being a function of the seed and the step: the learning rate is a closed form of the
step (restored with the scheduler), and a loop's data order comes from a generator seeded per epoch.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
import torch.nn as nn
from torch.optim.lr_scheduler import LRScheduler
from tqdm import tqdm

from klas.io import save_checkpoint

CHECKPOINT_FORMAT = "klas-train-v1"  # checkpoints of the loops before klas.train do not resume (other layout)
NO_DECAY = ("*pos_embed", "*cls_token", "*dist_token", "*reg_token")  # with biases and norms (all 1-D parameters)


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
