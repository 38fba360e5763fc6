"""Batches from an in-memory ImageSet or a streamed split: shuffled with an explicit generator, optional shard for distributed runs.

Augmentation runs on whole uint8 batches (random translation by padding + crop, horizontal flip) because
per-sample Python transforms dominate the step time of these small models on a CPU.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from klas.data.datasets import ImageSet


def augment(images_u8: torch.Tensor, gen: torch.Generator, pad: int = 2, flip: bool = True) -> torch.Tensor:
    """Random shift by up to ``pad`` pixels and random horizontal flip, per image, on a uint8 batch."""
    n, _, h, w = images_u8.shape
    padded = F.pad(images_u8, (pad, pad, pad, pad))
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    rows = (dy.view(n, 1) + torch.arange(h).view(1, h))  # [n, h]
    cols = (dx.view(n, 1) + torch.arange(w).view(1, w))  # [n, w]
    out = padded[torch.arange(n).view(n, 1, 1), :, rows.view(n, h, 1), cols.view(n, 1, w)]  # [n, h, w, C]
    out = out.permute(0, 3, 1, 2)
    if flip:
        mask = torch.rand(n, generator=gen) < 0.5
        out = torch.where(mask.view(n, 1, 1, 1), out.flip(-1), out)
    return out.contiguous()


def batches(data, batch_size: int, shuffle: bool = False, gen: torch.Generator | None = None,
            train_augment: bool = False, drop_last: bool = False, rank: int = 0, world_size: int = 1
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield normalized float batches ``(x, y)`` of an in-memory ``ImageSet`` or a streamed ``StreamSet``
    (``klas.data.open_split``): the same index order, sharding and augmentation for both, so both give the same
    batches; a StreamSet's uint8 images are read by its DataLoader workers.

    With ``world_size > 1`` each rank takes an interleaved shard of the (shuffled) global batch order, so that the
    union of the ranks' batches is the single-process global batch.
    """
    starts, plan = batch_plan(len(data), batch_size, shuffle, gen, drop_last, rank, world_size)
    timm_aug = train_augment and getattr(data, "train_mode", "light") == "timm"
    if isinstance(data, ImageSet):
        images = (data.images[idx] for idx in plan)
    else:
        seeds = torch.randint(0, 2 ** 31 - 1, (len(plan),), generator=gen).tolist() if timm_aug else None
        images = data.stream(plan, seeds)
    for start, idx, x in zip(starts, plan, images):
        if train_augment and getattr(data, "train_mode", "light") == "light":  # TokenSet: "none"
            x = augment(x, gen if gen is not None else torch.Generator().manual_seed(start))
        yield data.normalize(x), data.labels[idx]


def batch_plan(n: int, batch_size: int, shuffle: bool = False, gen: torch.Generator | None = None,
               drop_last: bool = False, rank: int = 0, world_size: int = 1) -> tuple[range, list[torch.Tensor]]:
    """(start of every global batch, this rank's sample indices of every batch): the one batch order ``batches``
    walks, for readers of precomputed per-sample data (the probes' feature cache). Draws one ``randperm`` from
    ``gen`` when shuffling, nothing else."""
    order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
    stop = (n // batch_size) * batch_size if drop_last else n
    starts = range(0, stop, batch_size)
    return starts, [order[s:s + batch_size][rank::world_size] if world_size > 1 else order[s:s + batch_size]
                    for s in starts]


def num_batches(data: ImageSet, batch_size: int, drop_last: bool = False) -> int:
    return len(data) // batch_size if drop_last else -(-len(data) // batch_size)
