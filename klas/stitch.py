"""Stitched networks: source stem + source blocks 0..i -> stitch layer -> target blocks j+1.. + target head.

SKELETON (API final; the supernetwork issue adds least-squares / task-loss / FuLA initialisation).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from klas.families import BlockView, stitchable, stitched_flops


@dataclass(frozen=True)
class StitchConfig:
    """Which stitch: ``source`` anchor blocks 0..i, then ``target`` anchor blocks j+1..end. Anchors have i = j = -1
    and source == target (no stitch layer)."""

    source: str
    i: int
    target: str
    j: int

    @property
    def is_anchor(self) -> bool:
        return self.source == self.target

    @property
    def key(self) -> str:
        return self.source if self.is_anchor else f"{self.source}[:{self.i + 1}]->{self.target}[{self.j + 1}:]"

    @classmethod
    def anchor(cls, name: str) -> "StitchConfig":
        return cls(name, -1, name, -1)


class StitchLayer(nn.Module):
    """Linear map of the source features to the target width: per token (channels-last) or a 1x1 conv (NCHW)."""

    def __init__(self, d_in: int, d_out: int, channels_last: bool = True):
        super().__init__()
        self.channels_last = channels_last
        self.linear = nn.Linear(d_in, d_out)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            return self.linear(h)
        return self.linear(h.movedim(1, -1)).movedim(-1, 1)


class StitchedNet(nn.Module):
    """A standalone stitched network over two block views (or one anchor, when ``layer`` is None and src is tgt)."""

    def __init__(self, src: BlockView, i: int, tgt: BlockView, j: int, layer: StitchLayer | None):
        super().__init__()
        if layer is not None and not stitchable(src, i, tgt, j):
            raise ValueError(f"{src.name} block {i} -> {tgt.name} block {j}: shapes {src.infos[i].shape} and "
                             f"{tgt.infos[j].shape} are not stitchable")
        self.src, self.tgt, self.i, self.j, self.layer = src, tgt, i, j, layer
        self.config = StitchConfig(src.name, i, tgt.name, j) if layer is not None else StitchConfig.anchor(src.name)

    @property
    def flops(self) -> int:
        return self.src.flops if self.layer is None else stitched_flops(self.src, self.i, self.tgt, self.j)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layer is None:
            return self.src(x)
        h = self.src.forward_blocks(self.src.forward_stem(x), 0, self.i + 1)
        h = self.layer(h)
        return self.tgt.forward_head(self.tgt.forward_blocks(h, self.j + 1))
