"""Training losses of the finetune stage: the task's supervised loss, and distillation from an untouched anchor.

What a loss *is* for a kind of model (cross-entropy over classes, next-token cross-entropy) is the task's
(``klas.tasks``); here is how the finetune stage combines them and which anchor teaches which configuration.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from klas.errors import KlasError

DISTILL_SELECTORS = ("target", "largest")


def teacher_name(config, distill: str | None, family) -> str | None:
    """The anchor whose untouched outputs ``config`` is distilled from (None: no distillation). ``distill``:
    "target" (the configuration's target anchor), "largest" or an anchor name."""
    if distill is None:
        return None
    if distill == "target":
        return config.target
    if distill == "largest":
        return max(family, key=lambda v: v.flops).name
    return distill


def check_distill(distill: str | None, family) -> None:
    names = [v.name for v in family]
    if distill is not None and distill not in DISTILL_SELECTORS and distill not in names:
        raise KlasError(f"--distill {distill!r}: expected none, target, largest or an anchor of {family.name} "
                        f"({', '.join(names)})")


def frozen_teachers(family, names: set[str], device: torch.device) -> dict[str, nn.Module]:
    """Frozen, eval-mode deep copies of the named anchors, made before anything trains: the teachers stay the
    untouched pretrained anchors even where the ``shared`` recipe trains the family's own in place."""
    out = {}
    for n in sorted(names):
        t = copy.deepcopy(family[n]).eval().to(device)
        for p in t.parameters():
            p.requires_grad_(False)
        out[n] = t
    return out


class TeacherMemo:
    """One frozen teacher's outputs per training step, kept for the next stitch distilled from it: the independent
    recipe trains its stitches one after another on the same batches (data order and augmentation are a function of
    the seed and the epoch only), so a teacher's outputs are the same tensors for each; they are computed once, not
    once per stitch, and are bit for bit those the teacher gives. Kept only while they fit in ``limit_bytes`` (a
    language model's [batch, tokens, vocabulary] logits often do not: then they are recomputed) and while another
    stitch will read them (``release`` when a stitch is done); an input that differs from the one remembered for
    its key is recomputed."""

    def __init__(self, teacher: nn.Module, users: int, limit_bytes: int):
        self.teacher, self.users, self.limit = teacher, users, limit_bytes
        self.store: dict = {}
        self.bytes = 0

    @staticmethod
    def _fingerprint(x: torch.Tensor) -> tuple:
        return tuple(x.shape), x.dtype, float(x.sum()), float(x.abs().sum())

    def __call__(self, x: torch.Tensor, key=None) -> torch.Tensor:
        hit = self.store.get(key) if key is not None else None
        if hit is not None and hit[0] == self._fingerprint(x):
            if self.users <= 1:  # the last reader: free as it goes
                del self.store[key]
                self.bytes -= hit[1].nbytes
            return hit[1]
        out = self.teacher(x)
        if key is not None and self.users > 1 and self.bytes + out.nbytes <= self.limit:
            self.store[key] = (self._fingerprint(x), out)
            self.bytes += out.nbytes
        return out

    def release(self) -> None:
        """One stitch distilled from this teacher is done (trained or found finished)."""
        self.users -= 1
        if self.users <= 0:
            self.store.clear()
            self.bytes = 0


def distill_loss(task, logits: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor | None, *,
                 label_smoothing: float, weight: float, temperature: float) -> torch.Tensor:
    """The training loss of one batch: the task's loss (label-smoothed), or with a teacher
    ``(1 - w) loss + w distillation`` (w = ``weight``; the task's distillation term at ``temperature``)."""
    ce = task.loss(logits, targets, label_smoothing=label_smoothing)
    if teacher_logits is None:
        return ce
    return (1.0 - weight) * ce + weight * task.distillation(logits, teacher_logits, temperature)
