"""A uniform *block view* over timm classifiers: stem -> blocks[0..n) -> head.

Stitching needs to run "the first i blocks of one model" and "blocks j.. plus head of another". timm exposes
per-stage features (``forward_intermediates``) but not per-block execution for hierarchical models, so each
architecture gets a small adapter that names its stem, its ordered blocks (with their stage) and its head.
Swin's patch merging and ResNet's strided first block belong to the first block of their stage: a stitch is only
legal between blocks whose outputs have the same shape (same stage), and that is what ``BlockInfo.shape`` records.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode


@dataclass(frozen=True)
class BlockInfo:
    """One block: its module path, stage, per-sample output shape and FLOPs per image (2 x MACs)."""

    index: int
    name: str
    stage: int
    shape: tuple[int, ...]
    flops: int


def count_flops(fn, *args) -> int:
    """FLOPs of one call, counted by ``torch.utils.flop_counter`` (matmul/conv/attention; 2 FLOPs per MAC)."""
    with FlopCounterMode(display=False) as counter:
        fn(*args)
    return int(counter.get_total_flops())


class BlockView(nn.Module):
    """Wraps a timm model; subclasses say where its stem, blocks and head are.

    ``channels_last``: block outputs are [B, ..., C] (ViT tokens, Swin NHWC) rather than NCHW (ResNet).
    """

    channels_last = True

    def __init__(self, model: nn.Module, name: str, input_shape: tuple[int, int, int]):
        super().__init__()
        self.model = model
        self.training = model.training  # mirror the wrapped model: a view must not switch it to train mode
        self.name = name
        self.input_shape = tuple(input_shape)
        # NOTE: a plain list, not a ModuleList: the modules are registered once, under self.model, so state_dict
        # keys stay those of the timm model and its checkpoints load unchanged.
        self.blocks: list[nn.Module] = self._block_modules()
        self.block_names, self.block_stages = self._block_meta()
        self.infos: list[BlockInfo] = []
        self.stem_flops = self.head_flops = 0
        self._measure()

    # --- architecture-specific hooks ---
    def _block_modules(self) -> list[nn.Module]:
        raise NotImplementedError

    def _block_meta(self) -> tuple[list[str], list[int]]:
        raise NotImplementedError

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_head(self, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def pool(self, h: torch.Tensor) -> torch.Tensor:
        """Block output -> [B, C] features for a linear probe."""
        raise NotImplementedError

    # --- shared ---
    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def widths(self) -> list[int]:
        return [self.feature_dim(i) for i in range(self.depth)]

    def feature_dim(self, index: int) -> int:
        raise NotImplementedError

    def spatial(self, index: int) -> tuple[int, ...]:
        """Per-sample shape of block ``index``'s output without its channel axis (tokens or H, W)."""
        shape = self.infos[index].shape
        return shape[:-1] if self.channels_last else shape[1:]

    def tokens(self, index: int) -> int:
        """Number of positions a per-token stitch layer is applied at after block ``index``."""
        n = 1
        for s in self.spatial(index):
            n *= s
        return n

    @property
    def flops(self) -> int:
        return self.stem_flops + sum(b.flops for b in self.infos) + self.head_flops

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def forward_blocks(self, h: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Run blocks ``start .. end-1`` (Python slice semantics)."""
        for blk in self.blocks[start:end]:
            h = blk(h)
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_blocks(self.forward_stem(x)))

    def forward_all(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """One pass returning every block's output and the logits (what ProbeNet needs)."""
        h = self.forward_stem(x)
        outs = []
        for blk in self.blocks:
            h = blk(h)
            outs.append(h)
        return outs, self.forward_head(h)

    @torch.no_grad()
    def _measure(self) -> None:
        was_training = self.training
        self.eval()
        x = torch.randn(1, *self.input_shape)
        self.stem_flops = count_flops(self.forward_stem, x)
        h = self.forward_stem(x)
        infos = []
        for i, blk in enumerate(self.blocks):
            f = count_flops(blk, h)
            h = blk(h)
            infos.append(BlockInfo(i, self.block_names[i], self.block_stages[i], tuple(h.shape[1:]), f))
        self.head_flops = count_flops(self.forward_head, h)
        self.infos = infos
        self.train(was_training)


class ViTView(BlockView):
    """timm VisionTransformer / DeiT: one stage, tokens [B, T, D] after every block."""

    def _block_modules(self):
        return list(self.model.blocks)

    def _block_meta(self):
        n = len(self.model.blocks)
        return [f"blocks.{i}" for i in range(n)], [0] * n

    def forward_stem(self, x):
        m = self.model
        return m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))

    def forward_head(self, h):
        return self.model.forward_head(self.model.norm(h))

    def pool(self, h):
        return h.mean(dim=1)  # NOTE: mean over all tokens (class token included) -- one rule for every block

    def feature_dim(self, index):
        return self.infos[index].shape[-1]


class SwinView(BlockView):
    """timm SwinTransformer: stages of NHWC maps; a stage's patch merging runs inside its first block."""

    def _block_modules(self):
        mods = []
        for stage in self.model.layers:
            for k, blk in enumerate(stage.blocks):
                mods.append(nn.Sequential(stage.downsample, blk) if k == 0 else blk)
        return mods

    def _block_meta(self):
        names, stages = [], []
        for s, stage in enumerate(self.model.layers):
            for k in range(len(stage.blocks)):
                names.append(f"layers.{s}.blocks.{k}")
                stages.append(s)
        return names, stages

    def forward_stem(self, x):
        return self.model.patch_embed(x)

    def forward_head(self, h):
        return self.model.forward_head(self.model.norm(h))

    def pool(self, h):
        return h.mean(dim=(1, 2))

    def feature_dim(self, index):
        return self.infos[index].shape[-1]


class ResNetView(BlockView):
    """timm ResNet: stages layer1..layer4 of residual blocks on NCHW maps."""

    _STAGES = ("layer1", "layer2", "layer3", "layer4")

    def _block_modules(self):
        return [blk for st in self._STAGES for blk in getattr(self.model, st)]

    def _block_meta(self):
        names, stages = [], []
        for s, st in enumerate(self._STAGES):
            for k in range(len(getattr(self.model, st))):
                names.append(f"{st}.{k}")
                stages.append(s)
        return names, stages

    def forward_stem(self, x):
        m = self.model
        return m.maxpool(m.act1(m.bn1(m.conv1(x))))

    def forward_head(self, h):
        return self.model.forward_head(h)

    def pool(self, h):
        return h.mean(dim=(2, 3))

    def feature_dim(self, index):
        return self.infos[index].shape[0]

    channels_last = False


def stitchable(src: BlockView, i: int, tgt: BlockView, j: int) -> bool:
    """A stitch after source block i into target block j+1 is legal when both outputs have the same spatial/token
    shape (same stage for Swin/ResNet; every pair for a one-stage ViT family of equal token count)."""
    return src.spatial(i) == tgt.spatial(j) and src.channels_last == tgt.channels_last


def stitch_layer_flops(src: BlockView, i: int, tgt: BlockView, j: int) -> int:
    """FLOPs of a linear (per-token / 1x1 conv) stitch layer: 2 x tokens x C_src x C_tgt (bias not counted, as
    torch.utils.flop_counter does not count it either)."""
    return 2 * src.tokens(i) * src.feature_dim(i) * tgt.feature_dim(j)


def stitched_flops(src: BlockView, i: int, tgt: BlockView, j: int) -> int:
    """FLOPs per image of: source stem + source blocks 0..i + stitch layer + target blocks j+1.. + target head."""
    return (src.stem_flops + sum(b.flops for b in src.infos[:i + 1]) + stitch_layer_flops(src, i, tgt, j)
            + sum(b.flops for b in tgt.infos[j + 1:]) + tgt.head_flops)


def block_view(model: nn.Module, name: str, input_shape: tuple[int, int, int]) -> BlockView:
    """Pick the adapter for a timm model by its class."""
    from timm.models.resnet import ResNet
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.vision_transformer import VisionTransformer

    for cls, view in ((VisionTransformer, ViTView), (SwinTransformer, SwinView), (ResNet, ResNetView)):
        if isinstance(model, cls):
            return view(model, name, input_shape)
    from klas.errors import KlasError
    raise KlasError(f"model {name!r} ({type(model).__name__}): no block view; supported: VisionTransformer/DeiT, "
                    f"SwinTransformer, ResNet")
