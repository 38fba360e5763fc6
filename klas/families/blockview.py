"""A uniform *block view* over timm classifiers: stem -> blocks[0..n) -> head.

Stitching needs to run "the first i blocks of one model" and "blocks j.. plus head of another". timm exposes
per-stage features (``forward_intermediates``, ``feature_info``) but not per-block execution for hierarchical models,
so each architecture gets a small adapter that names its stem, its ordered blocks (with their stage) and its head,
walking only timm's public module attributes (``blocks``, ``stages``, ``layers``, the ``feature_info`` module names)
and calling timm's own ``forward_head``.

Adapters are chosen from a registry (``register_view``) by the most specific registered class along the model's MRO,
so timm subclasses (``LevitDistilled``, ``VisionTransformerDistilled``) and user subclasses inherit their base's view.

Split granularity (every split point must be a tensor the next part accepts unchanged):

* ViT/DeiT: the transformer blocks; tokens [T, D] after each.
* Swin, ConvNeXt: the blocks of each stage; a stage's downsampling (patch merging; ConvNeXt's norm + strided conv,
  which has no residual of its own) runs inside the stage's first block, so every block output is a residual stream.
* ResNet, RegNet: the residual blocks of each stage (the strided first block of a stage downsamples).
* EfficientNet / MobileNetV2 / MobileNetV3 (and timm's other ``EfficientNet``/``MobileNetV3`` builds): the individual
  inverted-residual blocks, flattened across stages. Per-stage splits would leave only 6-7 points with large cost
  jumps; per-block splits give 10-20 points whose outputs are residual streams, and consecutive stages often share a
  resolution (EfficientNet-B0's 80- and 112-channel stages at stride 16, its 192- and 320-channel ones at 32), so
  stitches may cross stage boundaries.
* LeViT: the attention blocks of each stage, and each between-stage ``LevitDownsample`` (subsampling attention plus
  a residual MLP: a block in its own right) as a block of the stage it opens. Tokens [N, C] (``levit_*``) or NCHW maps
  (``levit_conv_*``), as the timm build has it.

A stitch is legal between two block outputs of the same layout and spatial/token shape (``stitchable``); the
channel count may differ (the stitch layer maps it). Input size: a view is measured at one ``input_shape``; CNNs run
at any size, while ViT/Swin/LeViT are built for one (timm's ``img_size``) and a mismatch is a one-line KlasError.
"""
from __future__ import annotations

from collections.abc import Callable
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


@dataclass(frozen=True)
class Layout:
    """What a block output is, for stitching across layouts: ``kind`` "nchw" (CNN maps [B, C, H, W]), "nhwc" (Swin
    maps [B, H, W, C]) or "tokens" ([B, prefix + H*W, C], row-major, ViT/DeiT/LeViT); ``grid`` (H, W); ``prefix``
    the class / distillation tokens before the grid tokens. ``to_grid`` / ``from_grid`` convert to and from the
    canonical (prefix [B, P, C] or None, grid [B, C, H, W])."""

    kind: str
    channels: int
    grid: tuple[int, int]
    prefix: int = 0

    def to_grid(self, h: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        if self.kind == "nchw":
            return None, h
        if self.kind == "nhwc":
            return None, h.permute(0, 3, 1, 2)
        pre = h[:, :self.prefix] if self.prefix else None
        grid = h[:, self.prefix:].transpose(1, 2).reshape(h.shape[0], h.shape[-1], *self.grid)
        return pre, grid

    def from_grid(self, prefix: torch.Tensor | None, grid: torch.Tensor) -> torch.Tensor:
        if self.kind == "nchw":
            return grid
        if self.kind == "nhwc":
            return grid.permute(0, 2, 3, 1)
        tokens = grid.flatten(2).transpose(1, 2)
        return torch.cat([prefix, tokens], dim=1) if self.prefix else tokens


def count_flops(fn, *args) -> int:
    """FLOPs of one call, counted by ``torch.utils.flop_counter`` (matmul/conv/attention; 2 FLOPs per MAC)."""
    with FlopCounterMode(display=False) as counter:
        fn(*args)
    return int(counter.get_total_flops())


def _shape_str(shape) -> str:
    return "x".join(str(int(s)) for s in shape)


class BlockView(nn.Module):
    """Wraps a timm model; subclasses say where its stem, blocks and head are.

    Subclasses implement ``_blocks`` (ordered ``(name, stage, module)`` triples; a module may be an ``nn.Sequential``
    of several timm modules, e.g. a downsample and the stage's first block), ``forward_stem`` and ``forward_head``.
    ``channels_last``: block outputs are [B, ..., C] (ViT/LeViT tokens, Swin NHWC) rather than NCHW (CNNs).
    """

    channels_last = True

    def __init__(self, model: nn.Module, name: str, input_shape: tuple[int, int, int]):
        super().__init__()
        self.model = model
        self.training = model.training  # mirror the wrapped model: a view must not switch it to train mode
        self.name = name
        self.input_shape = tuple(int(s) for s in input_shape)
        # NOTE: a plain list, not a ModuleList: the modules are registered once, under self.model, so state_dict
        # keys stay those of the timm model and its checkpoints load unchanged.
        parts = self._blocks()
        self.blocks: list[nn.Module] = [m for _, _, m in parts]
        self.block_names = [n for n, _, _ in parts]
        self.block_stages = [s for _, s, _ in parts]
        self.infos: list[BlockInfo] = []
        self.stem_flops = self.head_flops = 0
        self._measure()

    # --- architecture-specific hooks ---
    def _blocks(self) -> list[tuple[str, int, nn.Module]]:
        raise NotImplementedError

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_head(self, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def pool(self, h: torch.Tensor) -> torch.Tensor:
        """Block output -> [B, C] features for a linear probe: the mean over all positions (tokens or pixels)."""
        if self.channels_last:
            return h.mean(dim=tuple(range(1, h.dim() - 1)))
        return h.mean(dim=tuple(range(2, h.dim())))

    # --- shared ---
    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def widths(self) -> list[int]:
        return [self.feature_dim(i) for i in range(self.depth)]

    def feature_dim(self, index: int) -> int:
        shape = self.infos[index].shape
        return shape[-1] if self.channels_last else shape[0]

    def spatial(self, index: int) -> tuple[int, ...]:
        """Per-sample shape of block ``index``'s output without its channel axis (tokens or H, W)."""
        shape = self.infos[index].shape
        return shape[:-1] if self.channels_last else shape[1:]

    def layout(self, index: int) -> Layout | None:
        """Block ``index``'s output as a ``Layout`` (None: not a 2-D grid, so no stitch across layouts): NCHW and
        NHWC maps here; token views say their grid and prefix."""
        shape = self.infos[index].shape
        if not self.channels_last and len(shape) == 3:
            return Layout("nchw", int(shape[0]), (int(shape[1]), int(shape[2])))
        if self.channels_last and len(shape) == 3:
            return Layout("nhwc", int(shape[2]), (int(shape[0]), int(shape[1])))
        return None

    def tokens(self, index: int) -> int:
        """Number of positions a per-token stitch layer is applied at after block ``index``."""
        n = 1
        for s in self.spatial(index):
            n *= s
        return n

    @property
    def native_input_shape(self) -> tuple[int, ...] | None:
        """(C, H, W) the architecture's pretrained weights were made for (timm's pretrained cfg), if it says."""
        cfg = getattr(self.model, "pretrained_cfg", None) or {}
        size = cfg.get("input_size")
        return tuple(int(s) for s in size) if size else None

    @property
    def flops(self) -> int:
        return self.stem_flops + sum(b.flops for b in self.infos) + self.head_flops

    @property
    def original(self) -> nn.Module:
        """The untouched wrapped model as a module input -> logits (timm classifiers return logits)."""
        return self.model

    def example_input(self, batch: int, seed: int = 0) -> torch.Tensor:
        """A seeded random input batch [batch, *input_shape] (views over other inputs, e.g. token ids, override)."""
        return torch.randn(batch, *self.input_shape, generator=torch.Generator().manual_seed(seed))

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
        try:
            p = next(self.model.parameters(), None)
            x = torch.randn(1, *self.input_shape, dtype=p.dtype if p is not None else None,
                            device=p.device if p is not None else None)
            try:
                self.stem_flops = count_flops(self.forward_stem, x)
                h = self.forward_stem(x)
                infos = []
                for i, blk in enumerate(self.blocks):
                    f = count_flops(blk, h)
                    h = blk(h)
                    infos.append(BlockInfo(i, self.block_names[i], self.block_stages[i], tuple(h.shape[1:]), f))
                self.head_flops = count_flops(self.forward_head, h)
            except (RuntimeError, AssertionError, ValueError) as e:
                try:  # the timm model itself cannot take this input (fixed img_size)? else a view bug: re-raise
                    self.model(x)
                except (RuntimeError, AssertionError, ValueError):
                    pass
                else:
                    raise
                from klas.errors import KlasError
                msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                raise KlasError(f"model {self.name!r} ({type(self.model).__name__}) cannot run at input "
                                f"{_shape_str(self.input_shape)} ({msg}); build it for that size (timm's img_size) "
                                f"or give the family a matching input_shape") from None
            self.infos = infos
        finally:
            self.train(was_training)


# --- transformers -------------------------------------------------------------------------------------------------

class ViTView(BlockView):
    """timm VisionTransformer / DeiT: one stage, tokens [B, T, D] after every block."""

    def _blocks(self):
        return [(f"blocks.{i}", 0, blk) for i, blk in enumerate(self.model.blocks)]

    def forward_stem(self, x):
        m = self.model
        return m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))

    def forward_head(self, h):
        return self.model.forward_head(self.model.norm(h))

    def pool(self, h):
        return h.mean(dim=1)  # NOTE: mean over all tokens (class token included) -- one rule for every block

    def layout(self, index):
        prefix = int(getattr(self.model, "num_prefix_tokens", 1))
        grid = tuple(int(g) for g in self.model.patch_embed.grid_size)
        n, c = self.infos[index].shape
        return Layout("tokens", int(c), grid, prefix) if n == prefix + grid[0] * grid[1] else None


def _downsampled_stages(stages, attr: str) -> list:
    """(name, stage, module) per block of stages that each open with a downsample: the first block of a stage
    carries the stage's downsample, so every block's output is the stage's resolution (Swin, ConvNeXt)."""
    out = []
    for s, stage in enumerate(stages):
        for k, blk in enumerate(stage.blocks):
            out.append((f"{attr}.{s}.blocks.{k}", s, nn.Sequential(stage.downsample, blk) if k == 0 else blk))
    return out


class _StagedView:
    """Mixin of the views whose blocks are the blocks of the model's stages, each stage's downsample inside its first
    block, with a stem module and a module before timm's ``forward_head``; the class names the three attributes."""

    STAGES = STEM = PRE_HEAD = ""

    def _blocks(self):
        return _downsampled_stages(getattr(self.model, self.STAGES), self.STAGES)

    def forward_stem(self, x):
        return getattr(self.model, self.STEM)(x)

    def forward_head(self, h):
        return self.model.forward_head(getattr(self.model, self.PRE_HEAD)(h))


class SwinView(_StagedView, BlockView):
    """timm SwinTransformer: stages of NHWC maps; a stage's patch merging runs inside its first block."""

    STAGES, STEM, PRE_HEAD = "layers", "patch_embed", "norm"


class LevitView(BlockView):
    """timm Levit / LevitDistilled: a conv stem (stride 16 or 8), then stages of attention blocks on tokens [N, C]
    (``use_conv``: NCHW maps); each later stage opens with a ``LevitDownsample`` (subsampling attention + residual
    MLP), which is a block of its own here. The head is timm's: mean over positions, and for the distilled model the
    average of the two classifiers (eval / non-distilled training)."""

    @property
    def channels_last(self) -> bool:
        return not self.model.use_conv

    def _blocks(self):
        out = []
        for s, stage in enumerate(self.model.stages):
            if not isinstance(stage.downsample, nn.Identity):
                out.append((f"stages.{s}.downsample", s, stage.downsample))
            out.extend((f"stages.{s}.blocks.{k}", s, blk) for k, blk in enumerate(stage.blocks))
        return out

    def forward_stem(self, x):
        x = self.model.stem(x)
        return x if self.model.use_conv else x.flatten(2).transpose(1, 2)

    def forward_head(self, h):
        return self.model.forward_head(h)

    def layout(self, index):
        if self.model.use_conv:
            return super().layout(index)
        n, c = self.infos[index].shape
        side = int(round(n ** 0.5))
        return Layout("tokens", int(c), (side, side)) if side * side == n else None


# --- CNNs (NCHW) --------------------------------------------------------------------------------------------------

class _NCHWView(BlockView):
    channels_last = False


class ResNetView(_NCHWView):
    """timm ResNet: stages layer1..layer4 of residual blocks on NCHW maps."""

    _STAGES = ("layer1", "layer2", "layer3", "layer4")

    def _blocks(self):
        return [(f"{st}.{k}", s, blk) for s, st in enumerate(self._STAGES)
                for k, blk in enumerate(getattr(self.model, st))]

    def forward_stem(self, x):
        m = self.model
        return m.maxpool(m.act1(m.bn1(m.conv1(x))))

    def forward_head(self, h):
        return self.model.forward_head(h)


class EfficientNetView(_NCHWView):
    """timm EfficientNet (EfficientNet B0-B8/V2/Lite, MobileNetV2, MnasNet, MixNet, FBNet, TinyNet): stem conv + BN,
    then every block of every stage (``model.blocks[s][k]``), flattened; head = conv_head + bn2 + timm's
    ``forward_head`` (global pool, classifier)."""

    def _blocks(self):
        return [(f"blocks.{s}.{k}", s, blk) for s, stage in enumerate(self.model.blocks) for k, blk in enumerate(stage)]

    def forward_stem(self, x):
        return self.model.bn1(self.model.conv_stem(x))

    def forward_head(self, h):
        m = self.model
        return m.forward_head(m.bn2(m.conv_head(h)))


class MobileNetV3View(EfficientNetView):
    """timm MobileNetV3 (also MobileNetV4, LCNet, FBNetV3, HardCoRe-NAS): like EfficientNet, but its 'efficient head'
    pools *before* conv_head, so the whole head is timm's ``forward_head`` (pool, conv_head, norm/act, classifier)."""

    def forward_head(self, h):
        return self.model.forward_head(h)


class ConvNeXtView(_StagedView, _NCHWView):
    """timm ConvNeXt: stem (patchify), then the blocks of each stage; a stage's downsample (norm + strided conv,
    Identity for the first stage) runs inside its first block. Head = ``norm_pre`` + timm's ``forward_head``."""

    STAGES, STEM, PRE_HEAD = "stages", "stem", "norm_pre"


class RegNetView(_NCHWView):
    """timm RegNet X/Y/V: stem, then the residual blocks of each stage (the stages named by ``feature_info``:
    ``s1``..``s4``); head = ``final_conv`` (Identity or conv/act) + timm's ``forward_head``."""

    def _blocks(self):
        stages = [f["module"] for f in self.model.feature_info if f["module"] != "stem"]
        return [(f"{st}.{k}", s, blk) for s, st in enumerate(stages)
                for k, blk in self.model.get_submodule(st).named_children()]

    def forward_stem(self, x):
        return self.model.stem(x)

    def forward_head(self, h):
        return self.model.forward_head(self.model.final_conv(h))


# --- the registry -------------------------------------------------------------------------------------------------

_VIEWS: dict[type, type[BlockView]] = {}
_PREDICATES: list[tuple[Callable[[nn.Module], bool], type[BlockView], str]] = []
_BUILTINS_DONE = False


def register_view(model: type | Callable[[nn.Module], bool], view: type[BlockView], label: str | None = None) -> None:
    """Register ``view`` (a ``BlockView`` subclass) for a model class (it and its subclasses, unless a subclass has
    its own entry: the most specific class along the MRO wins) or for a predicate ``model -> bool`` (consulted, newest
    first, when no class matches; ``label`` names it in error messages). Re-registering a class replaces its view."""
    if not (isinstance(view, type) and issubclass(view, BlockView)):
        raise TypeError(f"register_view: {view!r} is not a BlockView subclass")
    if isinstance(model, type):
        _VIEWS[model] = view
    elif callable(model):
        _PREDICATES.append((model, view, label or getattr(model, "__name__", repr(model))))
    else:
        raise TypeError(f"register_view: expected a model class or a predicate, got {model!r}")


def _register_builtins() -> None:
    """The timm architectures klas knows (timm is imported on first use, not at ``import klas``)."""
    global _BUILTINS_DONE
    if _BUILTINS_DONE:
        return
    _BUILTINS_DONE = True
    from timm.models.convnext import ConvNeXt
    from timm.models.efficientnet import EfficientNet
    from timm.models.levit import Levit
    from timm.models.mobilenetv3 import MobileNetV3
    from timm.models.regnet import RegNet
    from timm.models.resnet import ResNet
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.vision_transformer import VisionTransformer

    builtins = ((VisionTransformer, ViTView), (SwinTransformer, SwinView), (ResNet, ResNetView),
                (EfficientNet, EfficientNetView), (MobileNetV3, MobileNetV3View), (ConvNeXt, ConvNeXtView),
                (RegNet, RegNetView), (Levit, LevitView))
    for cls, view in builtins:
        _VIEWS.setdefault(cls, view)  # a user's earlier registration for the same class wins


def supported_views() -> list[str]:
    """Names of the model classes (and labelled predicates) that have a block view."""
    _register_builtins()
    return [c.__name__ for c in _VIEWS] + [label for _, _, label in _PREDICATES]


def view_class(model: nn.Module) -> type[BlockView] | None:
    """The registered view for ``model``: the most specific registered class along its MRO, else the newest matching
    predicate, else None."""
    _register_builtins()
    for cls in type(model).__mro__:
        if cls in _VIEWS:
            return _VIEWS[cls]
    for pred, view, _ in reversed(_PREDICATES):
        if pred(model):
            return view
    return None


def block_view(model: nn.Module, name: str, input_shape: tuple[int, int, int]) -> BlockView:
    """Wrap a timm model in the block view registered for its class (``register_view``), measured at
    ``input_shape`` (C, H, W)."""
    view = view_class(model)
    if view is None:
        from klas.errors import KlasError
        raise KlasError(f"model {name!r} ({type(model).__name__}): no block view for this architecture; supported: "
                        f"{', '.join(supported_views())} (and their subclasses; add one with register_view)")
    return view(model, name, input_shape)


def input_note(views: list[BlockView]) -> str:
    """One line saying the input size the anchors run at, and each anchor's native size where it differs (e.g.
    EfficientNet B0/B1/B2, made for 224/240/260, all run at the family's one size so their maps line up)."""
    shapes = {v.input_shape for v in views}
    if len(shapes) != 1:
        listed = ", ".join(f"{v.name} {_shape_str(v.input_shape)}" for v in views)
        return f"anchors run at different input sizes ({listed}): stitching needs one size"
    shape = shapes.pop()
    other = [f"{v.name} {_shape_str(v.native_input_shape)}" for v in views
             if v.native_input_shape is not None and v.native_input_shape != shape]
    return f"input {_shape_str(shape)} for every anchor" + (f" (native: {', '.join(other)})" if other else "")


# --- stitching arithmetic -----------------------------------------------------------------------------------------

MAX_RESAMPLE = 4  # a cross-layout stitch resamples the source grid by at most this factor per axis


RESAMPLE = ("identity", "avgpool", "adaptive-avgpool", "bilinear")


def resample_method(src: tuple[int, int], tgt: tuple[int, int]) -> str:
    """How a cross-layout stitch makes the source grid the target's: unchanged; average pooling by an integer
    factor (the sizes divide); adaptive average pooling (smaller, not dividing: one fixed averaging matrix, whose
    matmul the flop counter counts); bilinear interpolation (a larger target)."""
    if tuple(src) == tuple(tgt):
        return "identity"
    if all(s >= t for s, t in zip(src, tgt)):
        return "avgpool" if all(s % t == 0 for s, t in zip(src, tgt)) else "adaptive-avgpool"
    return "bilinear"


def same_layout(src: BlockView, i: int, tgt: BlockView, j: int) -> bool:
    """Both outputs have the same layout and spatial/token shape: a per-token / 1x1 linear map stitches them."""
    return src.spatial(i) == tgt.spatial(j) and src.channels_last == tgt.channels_last


def cross_layout(src: BlockView, i: int, tgt: BlockView, j: int) -> bool:
    """The outputs are grids of different layout kinds (a CNN's NCHW map and a transformer's tokens or NHWC map):
    a ``klas.stitch.MixedStitchLayer`` stitches them, resampling the grid by at most ``MAX_RESAMPLE`` per axis."""
    a, b = src.layout(i), tgt.layout(j)
    if a is None or b is None or a.kind == b.kind:
        return False
    return all(1 / MAX_RESAMPLE <= s / t <= MAX_RESAMPLE for s, t in zip(a.grid, b.grid))


def stitchable(src: BlockView, i: int, tgt: BlockView, j: int) -> bool:
    """A stitch after source block i into target block j+1 is legal when both outputs have the same layout and
    spatial/token shape (same resolution for hierarchical models; every pair for a one-stage ViT family of equal
    token count; channel counts may differ), or when they are grids of different layout kinds (``cross_layout``:
    CNN <-> transformer)."""
    return same_layout(src, i, tgt, j) or cross_layout(src, i, tgt, j)


def stitch_layer_flops(src: BlockView, i: int, tgt: BlockView, j: int) -> int:
    """FLOPs of a linear (per-token / 1x1 conv) stitch layer: 2 x tokens x C_src x C_tgt (bias not counted, as
    torch.utils.flop_counter does not count it either). Across layouts: the 1x1 map at the target's grid plus the
    prefix tokens' map from the pooled grid (resampling and pooling are not counted, as the counter does not)."""
    if same_layout(src, i, tgt, j):
        return 2 * src.tokens(i) * src.feature_dim(i) * tgt.feature_dim(j)
    a, b = src.layout(i), tgt.layout(j)
    hw_a, hw_b = a.grid[0] * a.grid[1], b.grid[0] * b.grid[1]
    pool = 2 * a.channels * hw_a * hw_b if resample_method(a.grid, b.grid) == "adaptive-avgpool" else 0
    return pool + 2 * hw_b * a.channels * b.channels + 2 * a.channels * b.prefix * b.channels


def prefix_flops(view: BlockView, i: int) -> int:
    """FLOPs per image of ``view``'s stem + blocks 0..i (what a stitch at block i runs of its source)."""
    return int(view.stem_flops + sum(b.flops for b in view.infos[:i + 1]))


def stitched_flops(src: BlockView, i: int, tgt: BlockView, j: int) -> int:
    """FLOPs per image of: source stem + source blocks 0..i + stitch layer + target blocks j+1.. + target head."""
    return (prefix_flops(src, i) + stitch_layer_flops(src, i, tgt, j)
            + sum(b.flops for b in tgt.infos[j + 1:]) + tgt.head_flops)
