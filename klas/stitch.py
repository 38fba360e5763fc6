"""Stitched networks: source stem + source blocks 0..i -> stitch layer -> target blocks j+1.. + target head.

The stitch layer is one linear map per token (a 1x1 convolution on NCHW maps). As in SN-Net (Pan et al., CVPR 2023)
it starts from the least-squares solution that maps the source's block-i features onto the target's block-j
features on real training images; two gradient objectives are offered on top of it for comparison:

* ``task`` -- task loss matching (Balogh & Jelasity, AAAI 2025): cross-entropy of the stitched network on labels.
* ``fula`` -- functional latent alignment (Athanasiadis et al. 2025, arXiv:2505.20142): the stitched network's
  latents at the stitch point *and at every downstream target block* are pulled onto the target's own latents for
  the same image (a weighted, normalized squared error over depths: ``fula_loss``), a distillation-like objective
  that needs no labels. The ``fula`` selection metric (``klas.research.metrics``) fits the same objective.

Anchors stay frozen while a layer is fitted; only finetuning (``klas.stages.s4_finetune``) moves them.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice

import torch
import torch.nn as nn
import torch.nn.functional as F

from klas.contract import setting
from klas.errors import KlasError
from klas.families import BlockView, stitchable, stitched_flops
from klas.families.blockview import resample_method, same_layout

INIT_METHODS = ("ls", "task", "fula", "random")


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

    def to_dict(self) -> dict:
        return dict(source=self.source, i=self.i, target=self.target, j=self.j)

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> "StitchConfig":
        """Parse ``{source, i, target, j}`` (extra keys ignored); a malformed entry is a one-line KlasError."""
        try:
            cfg = cls(str(d["source"]), int(d["i"]), str(d["target"]), int(d["j"]))
        except (KeyError, TypeError, ValueError):
            raise KlasError(f"{where}: expected {{source, i, target, j}} with integer i, j; got {d!r}") from None
        if cfg.is_anchor and (cfg.i, cfg.j) != (-1, -1):
            raise KlasError(f"{where}: source == target ({cfg.source}) is an anchor and needs i = j = -1")
        return cfg


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

    @torch.no_grad()
    def set_affine(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        """Load ``y = x @ weight + bias`` (weight [d_in, d_out], the regression convention)."""
        self.linear.weight.copy_(weight.T.to(self.linear.weight.dtype))
        self.linear.bias.copy_(bias.to(self.linear.bias.dtype))


    # --- the least-squares interface (one affine map here; ``MixedStitchLayer`` has two) ---
    def ls_rows(self, h: torch.Tensor) -> list[torch.Tensor]:
        """Regression inputs per affine map: every token / position of the source block output is one row."""
        return [feature_rows(h, self.channels_last)]

    def ls_targets(self, h: torch.Tensor) -> list[torch.Tensor]:
        return [feature_rows(h, self.channels_last)]

    def set_affines(self, solutions: list) -> None:
        self.set_affine(*solutions[0])

    def describe(self) -> dict:
        return dict(kind="linear")


class MixedStitchLayer(nn.Module):
    """A stitch between block outputs of different layouts (``klas.families.blockview.Layout``: a CNN's NCHW map,
    a Swin NHWC map, ViT / LeViT tokens): the source as a grid [B, C, H, W] (its prefix tokens dropped), resampled to
    the target's grid (``resample_method``: parameter-free, so least squares stays exact), a 1x1 linear map of the
    channels at every position, laid out in the target's token order; the target's prefix tokens (class /
    distillation) from the pooled resampled grid by a second linear map. Both maps are fitted by least squares."""

    def __init__(self, src, tgt):
        super().__init__()
        self.src_layout, self.tgt_layout = src, tgt
        self.resample = resample_method(src.grid, tgt.grid)
        self.linear = nn.Linear(src.channels, tgt.channels)
        self.prefix = nn.Linear(src.channels, tgt.prefix * tgt.channels) if tgt.prefix else None
        if self.resample == "adaptive-avgpool":
            # NOTE: adaptive pooling between sizes that do not divide has no ONNX form: the same averages as one
            # fixed matrix [Ht*Wt, Hs*Ws] (adaptive_avg_pool2d of the identity basis), which exports everywhere
            n = src.grid[0] * src.grid[1]
            basis = torch.eye(n, dtype=torch.float64).view(n, 1, *src.grid)
            pool = F.adaptive_avg_pool2d(basis, tuple(tgt.grid)).reshape(n, -1).T.contiguous()
            self.register_buffer("pool", pool, persistent=False)

    def _grid(self, h: torch.Tensor) -> torch.Tensor:
        g = self.src_layout.to_grid(h)[1]
        size = tuple(self.tgt_layout.grid)
        if self.resample == "avgpool":
            k = (g.shape[2] // size[0], g.shape[3] // size[1])
            return F.avg_pool2d(g, k, k)
        if self.resample == "adaptive-avgpool":
            return (g.flatten(2) @ self.pool.to(g.dtype).T).view(*g.shape[:2], *size)
        if self.resample == "bilinear":
            return F.interpolate(g, size=size, mode="bilinear", align_corners=False)
        return g

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        g = self._grid(h)
        y = self.linear(g.movedim(1, -1)).movedim(-1, 1)
        pre = None
        if self.prefix is not None:
            pre = self.prefix(g.mean(dim=(2, 3))).view(g.shape[0], self.tgt_layout.prefix, self.tgt_layout.channels)
        return self.tgt_layout.from_grid(pre, y)

    def ls_rows(self, h: torch.Tensor) -> list[torch.Tensor]:
        g = self._grid(h)
        rows = [g.movedim(1, -1).reshape(-1, g.shape[1])]
        return rows + [g.mean(dim=(2, 3))] if self.prefix is not None else rows

    def ls_targets(self, h: torch.Tensor) -> list[torch.Tensor]:
        pre, g = self.tgt_layout.to_grid(h)
        rows = [g.movedim(1, -1).reshape(-1, g.shape[1])]
        return rows + [pre.reshape(pre.shape[0], -1)] if self.prefix is not None else rows

    @torch.no_grad()
    def set_affines(self, solutions: list) -> None:
        for lin, (w, b) in zip([self.linear] + ([self.prefix] if self.prefix is not None else []), solutions):
            lin.weight.copy_(w.T.to(lin.weight.dtype))
            lin.bias.copy_(b.to(lin.bias.dtype))

    def describe(self) -> dict:
        """What the manifest and records say of this stitch: layouts, grids, resampling, prefix tokens."""
        a, b = self.src_layout, self.tgt_layout
        return dict(kind="mixed", source=f"{a.kind} {a.grid[0]}x{a.grid[1]}", target=f"{b.kind} {b.grid[0]}x"
                    f"{b.grid[1]}", resample=self.resample, prefix_tokens=b.prefix)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.describe().items())


def make_stitch_layer(src: BlockView, i: int, tgt: BlockView, j: int) -> nn.Module:
    """The stitch layer of (src, i, tgt, j): a per-token / 1x1 ``StitchLayer`` between outputs of the same layout,
    a ``MixedStitchLayer`` across layouts; a one-line KlasError when the pair cannot be stitched."""
    if same_layout(src, i, tgt, j):
        return StitchLayer(src.feature_dim(i), tgt.feature_dim(j), src.channels_last)
    if stitchable(src, i, tgt, j):
        return MixedStitchLayer(src.layout(i), tgt.layout(j))
    raise KlasError(f"{src.name} block {i} -> {tgt.name} block {j}: output shapes {src.infos[i].shape} and "
                    f"{tgt.infos[j].shape} are not stitchable (same tokens / spatial size, or grids of different "
                    f"layouts within a factor 4, needed)")


class StitchedNet(nn.Module):
    """A standalone stitched network over two block views (or one anchor, when ``layer`` is None and src is tgt)."""

    def __init__(self, src: BlockView, i: int, tgt: BlockView, j: int, layer: StitchLayer | None):
        super().__init__()
        if layer is not None and not stitchable(src, i, tgt, j):
            raise ValueError(f"{src.name} block {i} -> {tgt.name} block {j}: shapes {src.infos[i].shape} and "
                             f"{tgt.infos[j].shape} are not stitchable")
        self.src, self.tgt, self.i, self.j, self.layer = src, tgt, i, j, layer
        self.config = StitchConfig(src.name, i, tgt.name, j) if layer is not None else StitchConfig.anchor(src.name)
        self._num_params: int | None = None

    @property
    def flops(self) -> int:
        return self.src.flops if self.layer is None else stitched_flops(self.src, self.i, self.tgt, self.j)

    @property
    def num_params(self) -> int:
        """Parameters this network actually uses (the anchors' unused blocks are registered but not counted)."""
        if self._num_params is None:
            self._num_params = used_parameters(self, self.src.example_input(2))
        return self._num_params

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layer is None:
            return self.src(x)
        h = self.src.forward_blocks(self.src.forward_stem(x), 0, self.i + 1)
        h = self.layer(h)
        return self.tgt.forward_head(self.tgt.forward_blocks(h, self.j + 1))


def used_parameters(model: nn.Module, input_shape: tuple[int, ...] | torch.Tensor) -> int:
    """Number of parameter elements that receive a gradient from one forward pass: the modules a network really runs,
    whatever else it holds. Architecture-agnostic, so it needs no per-family list of stem/head modules."""
    params = [p for p in model.parameters()]
    saved = [(p.grad, p.requires_grad) for p in params]
    was_training = model.training
    try:
        model.eval()
        for p in params:
            p.grad = None
            p.requires_grad_(True)
        x = input_shape if isinstance(input_shape, torch.Tensor) else \
            torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0))  # or an input batch (token ids)
        model(x).float().square().sum().backward()
        return sum(p.numel() for p in params if p.grad is not None)
    finally:
        for p, (g, rg) in zip(params, saved):
            p.grad = g
            p.requires_grad_(rg)
        model.train(was_training)


# --- least squares ---------------------------------------------------------------------------------------------

class Moments:
    """Streaming means and centred cross-products of (x, y) rows in float64, merged batch by batch with Chan et al.'s
    pairwise update: no catastrophic cancellation when features carry a large offset, memory O(d^2) whatever N is."""

    def __init__(self, d_in: int, d_out: int):
        self.n = 0
        self.mx = torch.zeros(d_in, dtype=torch.float64)
        self.my = torch.zeros(d_out, dtype=torch.float64)
        self.cxx = torch.zeros(d_in, d_in, dtype=torch.float64)
        self.cxy = torch.zeros(d_in, d_out, dtype=torch.float64)

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.detach().double(), y.detach().double()
        nb = x.shape[0]
        if nb == 0:
            return
        bx, by = x.mean(0), y.mean(0)
        xc, yc = x - bx, y - by
        n = self.n + nb
        dx, dy = bx - self.mx, by - self.my
        self.cxx += xc.T @ xc + torch.outer(dx, dx) * (self.n * nb / n)
        self.cxy += xc.T @ yc + torch.outer(dx, dy) * (self.n * nb / n)
        self.mx += dx * (nb / n)
        self.my += dy * (nb / n)
        self.n = n

    def solve(self, ridge: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight [d_in, d_out], bias [d_out]) minimising sum ||x W + b - y||^2 (+ ridge * mean eig * ||W||^2).

        Rank-deficient systems (fewer rows than features, collinear channels) get the minimum-norm W, through a
        symmetric pseudo-inverse, so the fitted map is still the least-squares projection."""
        if self.n == 0:
            raise KlasError("least-squares stitch fit: no feature rows collected (empty fitting data)")
        cxx = self.cxx
        if ridge > 0:
            cxx = cxx + torch.eye(cxx.shape[0], dtype=cxx.dtype) * (ridge * cxx.diagonal().mean().clamp_min(1e-300))
        w = torch.linalg.pinv(cxx, hermitian=True) @ self.cxy
        return w, self.my - self.mx @ w


def feature_rows(h: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """Block output -> [N * positions, C] rows, one per token / pixel."""
    if not channels_last:
        h = h.movedim(1, -1)
    return h.reshape(-1, h.shape[-1])


def lstsq_layer(src_feats: torch.Tensor, tgt_feats: torch.Tensor, channels_last: bool = True,
                ridge: float = 0.0) -> StitchLayer:
    """A stitch layer fitted by least squares on already computed source/target block outputs (every token or
    position is one row), with the same float64 solver as ``fit_stitch``."""
    x, y = feature_rows(src_feats, channels_last), feature_rows(tgt_feats, channels_last)
    mom = Moments(x.shape[1], y.shape[1])
    mom.update(x, y)
    layer = StitchLayer(x.shape[1], y.shape[1], channels_last)
    layer.set_affine(*mom.solve(ridge))
    return layer


@torch.no_grad()
def stitch_moments(src: BlockView, i: int, tgt: BlockView, j: int, images: Iterable[torch.Tensor],
                   layer: nn.Module | None = None) -> list[Moments]:
    """Source block-i and target block-j features of the same images, accumulated for a least-squares fit: one
    ``Moments`` per affine map of ``layer`` (its ``ls_rows`` / ``ls_targets``; default: the pair's layer)."""
    layer = layer if layer is not None else make_stitch_layer(src, i, tgt, j)
    moms = None
    for x in images:
        hs = src.forward_blocks(src.forward_stem(x), 0, i + 1)
        ht = tgt.forward_blocks(tgt.forward_stem(x), 0, j + 1)
        xs, ys = layer.ls_rows(hs), layer.ls_targets(ht)
        moms = moms or [Moments(a.shape[1], b.shape[1]) for a, b in zip(xs, ys)]
        for m, a, b in zip(moms, xs, ys):
            m.update(a, b)
    if moms is None:
        raise KlasError(f"{src.name} block {i} -> {tgt.name} block {j}: no images to fit the stitch layer on")
    return moms


# --- gradient objectives ------------------------------------------------------------------------------------------

def fula_weights(n: int) -> torch.Tensor:
    """FuLA's depth weights over the stitch point and the n-1 later target blocks: ``w_k = (k+1) / sum(k+1)``, linear in
    depth (later hints count more, as they are closer to the function), summing to 1."""
    w = torch.arange(1, n + 1, dtype=torch.float32)
    return w / w.sum()


def stitched_latents(tgt: BlockView, h: torch.Tensor, j: int) -> list[torch.Tensor]:
    """``[h, block_{j+1}(h), block_{j+2}(block_{j+1}(h)), ...]``: the latents at target depths j..end of a network whose
    block-j output is ``h`` (a stitch layer's output, or the target's own block-j output)."""
    outs = [h]
    for blk in tgt.blocks[j + 1:]:
        h = blk(h)
        outs.append(h)
    return outs


@torch.no_grad()
def target_latents(tgt: BlockView, x: torch.Tensor, j: int) -> list[torch.Tensor]:
    """The target's own latents at depths j..end for the images ``x`` (FuLA's targets)."""
    return stitched_latents(tgt, tgt.forward_blocks(tgt.forward_stem(x), 0, j + 1), j)


def fula_scales(latents: Iterable[list[torch.Tensor]]) -> torch.Tensor:
    """FuLA's per-depth normalisers: the mean square of every target latent over a fitting sample, given as batches
    of ``target_latents`` lists (float64 sums, floored at 1e-12)."""
    sq = count = None
    for lat in latents:
        s = torch.stack([t.detach().double().square().sum() for t in lat])
        n = torch.tensor([float(t.numel()) for t in lat], dtype=torch.float64)
        sq, count = (s, n) if sq is None else (sq + s, count + n)
    if sq is None:
        raise KlasError("FuLA: no target latents to normalise by (empty fitting data)")
    return (sq / count).clamp_min(1e-12).float()


def fula_loss(h: torch.Tensor, tgt: BlockView, j: int, targets: list[torch.Tensor],
              scales: torch.Tensor) -> torch.Tensor:
    """Functional latent alignment (FuLA, Athanasiadis et al. 2025), the one definition behind both
    ``--init fula`` and the ``fula`` selection metric (``klas.research.metrics``):

        sum_k w_k * mean((h_k - t_k)^2) / s_k,   k = 0 .. depth-1-j,

    over the stitch point (k = 0, target block j) and every later target block: ``h_k`` the stitched latents (``h``,
    the stitch layer's output, then target blocks j+1..j+k), ``t_k`` the target's own latents on the same images
    (``targets``, from ``target_latents``), ``s_k`` their mean square over the fitting sample (``fula_scales``) and
    ``w_k`` the depth weights of ``fula_weights``."""
    preds = stitched_latents(tgt, h, j)
    if len(preds) != len(targets) or len(scales) != len(targets):
        raise ValueError(f"FuLA at target block {j}: {len(preds)} stitched latents, {len(targets)} targets, "
                         f"{len(scales)} scales")
    w = fula_weights(len(preds))
    return sum(w[k] * F.mse_loss(p, t) / scales[k] for k, (p, t) in enumerate(zip(preds, targets)))


def task_loss(net: StitchedNet, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Task loss matching: cross-entropy of the stitched network's logits on the labels."""
    return F.cross_entropy(net(x), y)


def stitch_objective(net: StitchedNet, method: str, scales: torch.Tensor | None = None
                     ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The gradient objective ``loss(x, y)`` of a stitch-layer initialisation: ``task`` (``task_loss``) or ``fula``
    (``fula_loss`` with the normalisers ``scales``; labels unused)."""
    if method == "task":
        return lambda x, y: task_loss(net, x, y)
    if method != "fula":
        raise KlasError(f"stitch objective {method!r}: expected task or fula")
    if scales is None:
        raise ValueError("the fula objective needs its normalisers (fula_scales)")
    src = net.src

    def fula(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            h_src = src.forward_blocks(src.forward_stem(x), 0, net.i + 1)
        return fula_loss(net.layer(h_src), net.tgt, net.j, target_latents(net.tgt, x, net.j), scales)

    return fula


def adam_fit(module: nn.Module, loss_fn: Callable, batches: Iterable, lr: float) -> list[float]:
    """One Adam step on ``module``'s parameters per batch of ``batches``, minimising ``loss_fn(batch)``; returns the
    losses. The one optimisation loop of the stitch-layer initialisations and of the fitted selection metrics."""
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    losses = []
    for batch in batches:
        loss = loss_fn(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def fit_gradient(net: StitchedNet, objective: str, data: Iterator[tuple[torch.Tensor, torch.Tensor]], steps: int,
                 lr: float = 1e-3, scales: torch.Tensor | None = None) -> list[float]:
    """Adam on the stitch layer only (anchors frozen and in eval mode) for ``steps`` batches of ``objective``
    (``stitch_objective``; ``scales``: FuLA's normalisers); returns the losses."""
    loss_fn = stitch_objective(net, objective, scales)
    anchors = [p for m in {id(net.src): net.src, id(net.tgt): net.tgt}.values() for p in m.parameters()]
    flags = [p.requires_grad for p in anchors]
    modes = (net.src.training, net.tgt.training)
    try:
        for p in anchors:
            p.requires_grad_(False)
        net.src.eval()
        net.tgt.eval()
        net.layer.train()
        return adam_fit(net.layer, lambda b: loss_fn(*b), islice(data, steps), lr)
    finally:
        for p, f in zip(anchors, flags):
            p.requires_grad_(f)
        net.src.train(modes[0])
        net.tgt.train(modes[1])


@dataclass(frozen=True)
class FitCfg:
    """How a stitch layer is fitted -- the one fit configuration of the stitch-layer initialisation (``fit_stitch``,
    ``--init``) and of the fitted selection metrics (``klas.research.metrics.FittedScorer``, TLM / FuLA; their budget
    is ``klas.research.metrics.REFERENCE_FIT``).

    ``method`` in ls | task | fula | random (the initialisation; a fitted metric names its own objective and ignores
    it); ``samples`` training images for the least-squares statistics (and FuLA's normalisers); ``steps`` x
    ``batch_size`` images (and ``lr``) for the gradient objectives, which start from the least-squares solution so
    that differences measure the objective, not the starting point; ``ridge``: see ``Moments.solve``."""

    method: str = setting("ls", "stitch-layer initialisation", choices=INIT_METHODS)
    samples: int = setting(1024, "training images for the least-squares statistics", ge=1)
    batch_size: int = setting(128, "images per step of the gradient objectives", ge=1)
    ridge: float = setting(0.0, "ridge of the least-squares solve", ge=0)
    steps: int = setting(100, "Adam steps of the gradient objectives (task, fula)", ge=0)
    lr: float = setting(1e-3, "Adam learning rate of the gradient objectives", gt=0)
    # NOTE: not a setting: derived per stitch from the run's seed by whoever fits (klas.stages.s4_finetune)
    seed: int = field(default=0, metadata=dict(internal=True))


def fit_stitch(src: BlockView, i: int, tgt: BlockView, j: int, train, cfg: FitCfg = FitCfg()
               ) -> tuple[StitchLayer, dict]:
    """Build and initialise the stitch layer of (src, i, tgt, j) on the ``train`` ImageSet.

    Returns the layer and its fit statistics: ``stitch_mse`` (mean squared error against the target's block-j
    features on the fitting images) and, for the gradient objectives, the first and last loss."""
    from klas.data import batches

    if cfg.method not in INIT_METHODS:
        raise KlasError(f"stitch init {cfg.method!r}: expected one of {', '.join(INIT_METHODS)}")
    g = torch.Generator().manual_seed(cfg.seed)
    layer = _new_layer(src, i, tgt, j, g)
    fit_set = train.subset(cfg.samples)
    stats: dict = dict(method=cfg.method, layer=layer.describe())  # the layer kind; across layouts: resampling
    if cfg.method != "random":
        moms = stitch_moments(src, i, tgt, j, (x for x, _ in batches(fit_set, cfg.batch_size)), layer)
        layer.set_affines([m.solve(cfg.ridge) for m in moms])
    if cfg.method in ("task", "fula"):
        net = StitchedNet(src, i, tgt, j, layer)
        scales = None
        if cfg.method == "fula":
            scales = fula_scales(target_latents(tgt, x, j) for x, _ in batches(fit_set, cfg.batch_size))
        losses = fit_gradient(net, cfg.method, _forever(train, cfg.batch_size, g), cfg.steps, cfg.lr, scales)
        stats.update(loss_first=losses[0] if losses else None, loss_last=losses[-1] if losses else None)
    stats["stitch_mse"] = stitch_mse(src, i, tgt, j, layer, (x for x, _ in batches(fit_set, cfg.batch_size)))
    return layer, stats


def _new_layer(src: BlockView, i: int, tgt: BlockView, j: int, gen: torch.Generator) -> StitchLayer:
    """A stitch layer with nn.Linear's default (Kaiming-uniform) initialisation drawn from ``gen``."""
    layer = make_stitch_layer(src, i, tgt, j)
    bound = 1.0 / src.feature_dim(i) ** 0.5
    with torch.no_grad():
        # NOTE: Kaiming-uniform with a=sqrt(5), as nn.Linear, but from an explicit generator for reproducibility.
        for lin in (m for m in layer.modules() if isinstance(m, nn.Linear)):
            lin.weight.uniform_(-bound, bound, generator=gen)
            lin.bias.uniform_(-bound, bound, generator=gen)
    return layer


def _forever(data, batch_size: int, gen: torch.Generator):
    from klas.data import batches

    while True:
        yield from batches(data, batch_size, shuffle=True, gen=gen, drop_last=len(data) >= batch_size)


@torch.no_grad()
def stitch_mse(src: BlockView, i: int, tgt: BlockView, j: int, layer: StitchLayer,
               images: Iterable[torch.Tensor]) -> float:
    """Mean squared error between the stitch layer's output and the target's own block-j features."""
    total, count = 0.0, 0
    for x in images:
        hs = layer(src.forward_blocks(src.forward_stem(x), 0, i + 1))
        ht = tgt.forward_blocks(tgt.forward_stem(x), 0, j + 1)
        total += (hs.double() - ht.double()).square().sum().item()
        count += ht.numel()
    return total / max(count, 1)


# --- low-rank adapters (the ``frozen`` finetuning recipe) ----------------------------------------------------------

LORA_TARGETS = ("qkv", "proj", "fc1", "fc2")  # the Linear layers of a timm ViT / Swin block (attention and MLP)


class LoRALinear(nn.Linear):
    """``nn.Linear`` plus a low-rank update (LoRA, Hu et al. 2021): ``y = x W^T + b + (alpha / r) x A^T B^T``, with
    ``A`` [r, in] drawn like a Linear's weight and ``B`` [out, r] zero, so a fresh adapter leaves the function
    unchanged. It *is* the wrapped Linear (the same ``weight`` and ``bias`` Parameter objects, the same state-dict
    keys) with two more parameters, ``lora_A`` and ``lora_B``; ``merged()`` folds them into a plain ``nn.Linear``.
    Plain matmuls: it traces to ONNX as it is."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator | None = None):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.rank, self.alpha = int(rank), float(alpha)
        self.scaling = self.alpha / self.rank
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(self.rank, self.in_features, device=dev, dtype=dt))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, self.rank, device=dev, dtype=dt))
        bound = 1.0 / self.in_features ** 0.5  # nn.Linear's Kaiming-uniform (a = sqrt(5)), from an explicit generator
        with torch.no_grad():
            self.lora_A.uniform_(-bound, bound, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` computing the same map: ``W + (alpha / r) B A`` (the merge is computed in float64)."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        delta = (self.lora_B.double() @ self.lora_A.double()) * self.scaling
        out.weight.copy_((self.weight.double() + delta).to(self.weight.dtype))
        if self.bias is not None:
            out.bias.copy_(self.bias)
        out.train(self.training)
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha:g}"


def add_lora(view: BlockView, start: int, rank: int, alpha: float, generator: torch.Generator | None = None,
             targets: tuple[str, ...] | None = None) -> list[str]:
    """Replace, in blocks ``start..`` of ``view`` (in place), every ``nn.Linear`` whose attribute name is in
    ``targets`` (default: the view's ``lora_targets``, else timm's ``LORA_TARGETS``) by a ``LoRALinear`` around it;
    returns the replaced modules' names (relative to ``view.model``), in order. Blocks without such layers (ResNet's
    convolutions) get none: an empty list."""
    targets = targets or getattr(view, "lora_targets", LORA_TARGETS)  # a decoder's q/k/v/o/gate/up/down projections
    names = {id(m): n for n, m in view.model.named_modules()}
    done = []
    for blk in view.blocks[start:]:
        for name, mod in list(blk.named_modules()):
            leaf = name.rpartition(".")[2]
            if leaf in targets and type(mod) is nn.Linear:
                parent = blk.get_submodule(name.rpartition(".")[0]) if "." in name else blk
                full = names.get(id(mod), name)
                setattr(parent, leaf, LoRALinear(mod, rank, alpha, generator))
                done.append(full)
    return done


def merge_lora(module: nn.Module) -> int:
    """Fold every ``LoRALinear`` inside ``module`` into a plain ``nn.Linear`` (in place); returns how many."""
    n = 0
    for name, mod in list(module.named_modules()):
        if isinstance(mod, LoRALinear):
            parent_name, _, leaf = name.rpartition(".")
            setattr(module.get_submodule(parent_name) if parent_name else module, leaf, mod.merged())
            n += 1
    return n
