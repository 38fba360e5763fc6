"""KLAS scores (paper Sec. 4.1-4.2, Eq. 1-2, Alg. 2), computed in ONE streaming pass over the validation split.

For anchors A (smaller, source) and B (larger, target) and probe distributions p_X,k(x) = softmax(probe_k(pool(h_k))):

- cross-anchor distance   D[A,i -> B,j] = mean_x KL(p_A,i(x) || p_B,j(x))                      (source || target)
- intra-anchor capacity   Cap[B,j]      = mean_x KL(p_B,j(x) || p_B,j+1(x)),  p_B,depth := the anchor's own head
- stitch score            S[i,j]        = form(D[i,j], Cap[B,j])   (default "ratio": D / Cap; see SCORE_FORMS)
- anchor divergence       K[A,B]        = mean_x KL(p_A(x) || p_B(x)) between the anchors' own final softmax

Each batch's probe logits go straight into ``klas.ops.PairwiseKL`` accumulators (float64 sums); no logits of the
split are kept. Pairs that cannot be stitched (``klas.families.stitchable``) get NaN in D and S. docs/method.md gives
the reasons for each definition.

Baseline metrics are plug-ins (``register_metric``): each registered metric streams the same batches into its own
accumulator and gives one table per anchor pair, so that the comparison selection methods cost no second read of
the data. The stage ships none; ``klas.research`` registers mse, cka, ce and dm (``klas.research.register_all``).

Under torchrun each rank streams its shard of every validation batch into its own accumulators; the additive state
(float64 sums and counts, ``reduce()``) is summed over ranks, which equals the single-process pass up to float64
summation order. Only rank 0 writes.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from tqdm import tqdm

from klas import distributed as kd
from klas.contract import Artifact, StageContext, setting
from klas.data import batches, num_batches
from klas.errors import KlasError
from klas.families import Family, stitchable
from klas.io import load_tensors, save_tensors
from klas.ops import PairwiseKL
from klas.ops.dispatch import IMPLS
from klas.stages.s1_probes import ProbesArtifact, load_probes

SCORES_FILE, METRICS_FILE, SCORES_JSON = "scores.safetensors", "metrics.safetensors", "scores.json"
CAP_EPS = 1e-6  # keeps "ratio" finite when a block barely changes the probe distribution


def _ratio(d: torch.Tensor, cap: torch.Tensor, lam: float) -> torch.Tensor:
    return d / (cap + CAP_EPS)


def _difference(d: torch.Tensor, cap: torch.Tensor, lam: float) -> torch.Tensor:
    return d - lam * cap


def _kl(d: torch.Tensor, cap: torch.Tensor, lam: float) -> torch.Tensor:
    return d.clone()


# score forms: low = promising (small cross-anchor distance, large capacity of the block receiving the stitch)
SCORE_FORMS = {"ratio": _ratio, "difference": _difference, "kl": _kl}


def stitch_score(d: torch.Tensor, cap: torch.Tensor, form: str, lam: float) -> torch.Tensor:
    """S[i, j] from D [dA, dB] and the target's capacity [dB] (broadcast over source blocks)."""
    if form not in SCORE_FORMS:
        raise KlasError(f"score form {form!r}: unknown; expected one of {', '.join(SCORE_FORMS)}")
    return SCORE_FORMS[form](d, cap[None, :], lam)


# ----------------------------------------------------------------------------------------- baseline metric plug-ins
@dataclass(frozen=True)
class ScorePass:
    """What a baseline metric's accumulator is made from: the family, its anchors (FLOPs order) and the ordered
    anchor pairs, the stage's config, the val split's size and the distributed state."""

    family: Family
    names: list
    pairs: list
    cfg: Any  # ScoresConfig
    n_val: int
    dist: Any  # klas.distributed.DistInfo


@dataclass(frozen=True)
class ScoreBatch:
    """One streamed batch as every accumulator sees it (this rank's shard): per anchor the probes' and the head's
    logits [depth + 1, B, C] and the probe features (one [B, C_k] per block), and the samples' positions in the
    split."""

    logits: dict
    features: dict
    positions: torch.Tensor


@dataclass(frozen=True)
class BaselineMetric:
    """A registered metric: ``make(ScorePass)`` returns an accumulator with ``update(ScoreBatch)``, ``reduce()``
    (sum the ranks' state; called under torchrun only, after the pass) and ``tables(a, b, res) -> {name: [dA, dB]}``
    (lower = more promising; ``res``: the KLAS results, D, cap, entropy, ...). ``tables``: the names it writes."""

    name: str
    tables: tuple
    make: Callable[[ScorePass], Any]


_METRICS: dict[str, BaselineMetric] = {}


def register_metric(name: str, make: Callable[[ScorePass], Any], *, tables: tuple[str, ...] | None = None) -> None:
    """Register a baseline metric computed in the scores pass (a later registration of ``name`` replaces it)."""
    _METRICS[name] = BaselineMetric(name, tuple(tables or (name,)), make)


def metric_names() -> tuple[str, ...]:
    """The tables of every registered metric, in registration order (``metrics.safetensors`` keys ``name/A/B``)."""
    return tuple(t for m in _METRICS.values() for t in m.tables)


# ---------------------------------------------------------------------------------------------------- the stage
@dataclass(frozen=True)
class ScoresConfig:
    """The streaming all-pairs KL pass over the val split (paper Eq. 1-2) and the score form of Eq. 3."""

    batch_size: int = setting(500, "val images per streamed batch", ge=1)
    temperature: float = setting(1.0, "softmax temperature of the probe distributions", gt=0)
    impl: str = setting("auto", "klas.ops implementation of the pairwise KL (auto: triton/cuda on a GPU, cpp or "
                        "reference on the CPU)", choices=("auto",) + IMPLS)
    val_subset: int | None = setting(None, "score on the first N val images", ge=1, none="all")
    score_form: str = setting("ratio", "stitch score from D and the target's capacity",
                              choices=tuple(SCORE_FORMS))
    lam: float = setting(1.0, "weight of the capacity in the difference form", ge=0)
    metrics: bool = setting(True, "also compute the tables of every registered baseline metric (klas.research: mse, "
                            "cka, ce, dm) that the comparison selection methods read")
    memory_mb: int = setting(1024, "bound on the probe logits held at once: a batch is scored in chunks of samples "
                             "(language models: token rows) whose logits fit it", ge=1, key=False)
    dm_samples: int = setting(1000, "val images kept for the MMD baseline", ge=1)
    dm_sigma: float = setting(0.5, "RBF bandwidth of the MMD baseline", gt=0)
    reverse: bool = setting(False, "also D for every large -> small pair (D/large/small), which two-way selection "
                            "(selection.directions = two-way) scores its reverse transitions by")


@dataclass(frozen=True)
class ScoresArtifact(Artifact):
    """``scores.safetensors`` (D, cap, S, mask per anchor pair, anchor KL, entropies), ``metrics.safetensors`` (the
    baseline tables, possibly empty) and this record."""

    KIND: ClassVar[str] = "scores"
    RECORD: ClassVar[str] = SCORES_JSON
    FILES: ClassVar[tuple[str, ...]] = (SCORES_FILE, METRICS_FILE)
    family: str
    anchors: list
    n_val: int
    score_form: str
    lam: float
    temperature: float
    anchor_kl: dict
    cap: dict
    pairs: list
    metrics: list
    wall_s: float
    world_size: int

    @staticmethod
    def tensors(folder: Path | str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(score tensors, baseline metric tables) of the artifact in ``folder``."""
        return load_tensors(Path(folder) / SCORES_FILE), load_tensors(Path(folder) / METRICS_FILE)


def anchor_pairs_ordered(names: list[str]) -> list[tuple[str, str]]:
    """Every (source, target) with the source cheaper (earlier in FLOPs order): the stitching direction is fixed."""
    return [(a, b) for k, a in enumerate(names) for b in names[k + 1:]]


def entropy_sum(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Sum over samples of the softmax entropy, float64 [n_probes], from logits [n_probes, N, C]: each sample's
    entropy in float32 (like the KL kernels), summed over samples in float64 -- a float64 log-softmax over a
    language model's [layers, tokens, V] costs 5x the KL tables themselves."""
    out = torch.empty(logits.shape[0], dtype=torch.float64)
    for k in range(logits.shape[0]):  # one probe at a time: the temporaries are [N, C], not [n_probes, N, C]
        lp = torch.log_softmax(logits[k].float() / temperature, dim=-1)
        out[k] = -(lp.exp() * lp).sum(dim=-1).double().sum()
    return out


class ScoreAccumulator:
    """Streaming D, Cap, anchor KL and probe entropies from per-batch logits.

    ``update(logits)``: for every anchor (FLOPs order) a tensor [depth + 1, B, C] -- its probes' logits, then its own
    head's logits as the last row. Nothing is retained but float64 sums.
    """

    def __init__(self, names: list[str], depths: list[int], temperature: float = 1.0, impl: str | None = None,
                 reverse: bool = False):
        self.names, self.depths, self.temperature = list(names), list(depths), temperature
        self.pairs = anchor_pairs_ordered(self.names)
        dep = dict(zip(names, depths))
        # reverse: also KL(p_large,i || p_small,j), the same accumulator with the arguments swapped (two-way stitching)
        crossed = self.pairs + ([(b, a) for a, b in self.pairs] if reverse else [])
        self.cross = {p: PairwiseKL(dep[p[0]], dep[p[1]], temperature, impl) for p in crossed}
        self.within = {a: PairwiseKL(d + 1, None, temperature, impl) for a, d in zip(names, depths)}
        self.anchors = PairwiseKL(len(names), None, temperature, impl)
        self.entropy = {a: torch.zeros(d + 1, dtype=torch.float64) for a, d in zip(names, depths)}
        self.count = 0

    def update(self, logits: dict[str, torch.Tensor]) -> None:
        for a, b in self.cross:
            self.cross[(a, b)].update(logits[a][:-1], logits[b][:-1])
        for a in self.names:
            self.within[a].update(logits[a])
            self.entropy[a] += entropy_sum(logits[a], self.temperature)
        self.anchors.update(torch.stack([logits[a][-1] for a in self.names]))
        self.count += next(iter(logits.values())).shape[1]

    def reduce(self) -> None:
        """Sum the state of every rank's shard into every rank (no-op in one process): KL tables, entropies, count."""
        if not kd.info().distributed:
            return
        accs = [*self.cross.values(), *self.within.values(), self.anchors]
        kd.all_reduce_pairwise_kl(accs, "KL score accumulators")
        count = torch.tensor([float(self.count)], dtype=torch.float64)
        kd.all_reduce_([*self.entropy.values(), count], "score entropies")
        self.count = int(count)

    @staticmethod
    def _mean(acc: PairwiseKL) -> torch.Tensor:
        return acc.sum / acc.count  # float64, unlike compute()

    def results(self) -> dict:
        if self.count == 0:
            raise KlasError("scores: the validation split is empty")
        within = {a: self._mean(m) for a, m in self.within.items()}
        return dict(
            D={p: self._mean(m) for p, m in self.cross.items()},
            cap={a: torch.diagonal(w, offset=1).clone() for a, w in within.items()},  # KL(p_j || p_j+1), j < depth
            anchor_kl=self._mean(self.anchors),
            entropy={a: e / self.count for a, e in self.entropy.items()},
            count=self.count)


def stitchable_mask(family: Family, a: str, b: str) -> torch.Tensor:
    src, tgt = family[a], family[b]
    return torch.tensor([[stitchable(src, i, tgt, j) for j in range(tgt.depth)] for i in range(src.depth)])


def depth_matched(i: int, d_src: int, d_tgt: int) -> int:
    """The target block at the same relative depth as source block i: (j + 1) / d_tgt = (i + 1) / d_src, rounded."""
    return max(0, min(d_tgt - 1, ((i + 1) * d_tgt * 2 + d_src) // (2 * d_src) - 1))


def diagonal_summary(d: torch.Tensor) -> dict:
    """Does KL sit low near the depth-matched diagonal? Row-wise argmin (best target block per source block) and
    column-wise argmin against the diagonal, and where the diagonal entry ranks in its row (0 = lowest, 1 = highest;
    0.5 for no relation)."""
    d_src, d_tgt = d.shape
    full = torch.nan_to_num(d, nan=math.inf)
    rows = [i for i in range(d_src) if torch.isfinite(full[i]).any()]
    amin = [int(full[i].argmin()) for i in rows]
    diag = [depth_matched(i, d_src, d_tgt) for i in rows]
    off = [abs(a - m) for a, m in zip(amin, diag)]
    ranks = [float((full[i] < full[i, m]).sum()) / max(d_tgt - 1, 1) for i, m in zip(rows, diag)]
    cols = [j for j in range(d_tgt) if torch.isfinite(full[:, j]).any()]
    on = torch.tensor([float(d[i, m]) for i, m in zip(rows, diag)])
    return dict(argmin_target_per_source=amin, depth_matched_target=diag,
                argmin_source_per_target=[int(full[:, j].argmin()) for j in cols],
                mean_abs_offset=round(sum(off) / max(len(off), 1), 3),
                frac_within_1=round(sum(o <= 1 for o in off) / max(len(off), 1), 3),
                mean_row_rank_of_diagonal=round(sum(ranks) / max(len(ranks), 1), 3),
                mean_D_diagonal=float(on.mean()) if len(on) else None, mean_D_all=float(torch.nanmean(d)))


def plot_heatmap(d: torch.Tensor, s: torch.Tensor, a: str, b: str, form: str, path: Path) -> None:
    """D (left) and the stitch score (right), rows = source blocks, columns = target blocks; the depth-matched
    diagonal is drawn in white."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d_src, d_tgt = d.shape
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4))
    diag = [depth_matched(i, d_src, d_tgt) for i in range(d_src)]
    for ax, t, title in ((axes[0], d, "D = KL(p_src,i || p_tgt,j)"), (axes[1], s, f"stitch score ({form})")):
        im = ax.imshow(t.float().numpy(), cmap="viridis_r", aspect="auto", interpolation="nearest")
        ax.plot(diag, range(d_src), color="w", lw=1, ls="--")
        ax.set_xlabel(f"target block j ({b})")
        ax.set_ylabel(f"source block i ({a})")
        ax.set_title(title, fontsize=10)
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _stream(ctx: StageContext, cfg: ScoresConfig, nets: dict, val, acc: ScoreAccumulator, plugins: list) -> None:
    """The one pass over ``val``: every batch's probe and head logits into ``acc``, the batch into every plug-in."""
    di, family, task = ctx.dist, ctx.family, ctx.task
    bs = cfg.batch_size
    bar = tqdm(batches(val, bs, rank=di.rank, world_size=di.world), total=num_batches(val, bs), desc="scores (val)",
               leave=False, mininterval=2, file=sys.stdout, disable=not ctx.progress or not di.is_main)
    with torch.no_grad():
        for b, (x, _) in enumerate(bar):
            # the task cuts the batch into chunks of samples that fit cfg.memory_mb (one chunk for classifiers)
            for logits, feats in task.score_chunks(family, nets, x, cfg.memory_mb):
                acc.update(logits)
                if plugins:
                    # this rank's samples of batch b, by their positions in the split (the ranks interleave)
                    pos = torch.arange(b * bs, min((b + 1) * bs, len(val)))[di.rank::di.world]
                    batch = ScoreBatch(logits=logits, features=feats, positions=pos)
                    for p in plugins:
                        p.update(batch)
    acc.reduce()
    if di.distributed:
        for p in plugins:
            p.reduce()


def run(cfg: ScoresConfig, ctx: StageContext) -> ScoresArtifact:
    """D, Cap, S for every ordered anchor pair, the anchors' KL matrix and the registered baseline metric tables, on
    the run's ``val`` split.

    Writes ``scores/scores.safetensors`` (D, cap, S, mask, anchor_kl, entropy), ``scores/metrics.safetensors``
    (the baseline tables; empty without ``cfg.metrics`` or a registered metric), ``scores/scores.json`` and one
    heatmap PNG per anchor pair.
    """
    family, di = ctx.family, ctx.dist
    ctx.upstream(ProbesArtifact)  # one line naming the probes stage when it has not run
    out = ctx.folder(NAME)
    nets = load_probes(ctx.run_dir.path, family)
    val = ctx.split("val").subset(cfg.val_subset)
    names = [v.name for v in family]
    acc = ScoreAccumulator(names, [v.depth for v in family], cfg.temperature, None if cfg.impl == "auto" else cfg.impl,
                           reverse=cfg.reverse)
    pairs = acc.pairs
    sp = ScorePass(family=family, names=names, pairs=pairs, cfg=cfg, n_val=len(val), dist=di)
    plugins = [m.make(sp) for m in _METRICS.values()] if cfg.metrics and ctx.task.score_plugins else []
    t0 = time.time()
    _stream(ctx, cfg, nets, val, acc, plugins)
    wall = time.time() - t0
    res = acc.results()
    tensors: dict[str, torch.Tensor] = {"anchor_kl": res["anchor_kl"]}
    for a in names:
        tensors[f"cap/{a}"] = res["cap"][a]
        tensors[f"entropy/{a}"] = res["entropy"][a]
    summary_pairs, metric_tensors = [], {}
    for a, b in pairs:
        mask = stitchable_mask(family, a, b)
        d = res["D"][(a, b)].masked_fill(~mask, math.nan)
        s = stitch_score(d, res["cap"][b], cfg.score_form, cfg.lam)
        tensors.update({f"D/{a}/{b}": d, f"S/{a}/{b}": s, f"mask/{a}/{b}": mask})
        if (b, a) in res["D"]:
            tensors[f"D/{b}/{a}"] = res["D"][(b, a)].masked_fill(~stitchable_mask(family, b, a), math.nan)
        for p in plugins:
            for m, t in p.tables(a, b, res).items():
                metric_tensors[f"{m}/{a}/{b}"] = t.masked_fill(~mask, math.nan)
        flat = torch.nan_to_num(s, nan=math.inf)
        k = int(flat.argmin())
        summary_pairs.append(dict(source=a, target=b, stitchable=int(mask.sum()),
                                  D_min=float(d[mask].min()) if mask.any() else None,
                                  D_max=float(d[mask].max()) if mask.any() else None,
                                  best_score=dict(i=k // s.shape[1], j=k % s.shape[1], score=float(flat.flatten()[k])),
                                  diagonal=diagonal_summary(d)))
    meta = {"family": family.name, "format": "klas-scores-v1"}
    if di.is_main:
        save_tensors(tensors, out / SCORES_FILE, metadata=meta)
        # NOTE: always written (empty without cfg.metrics): the artifact's file list is fixed
        save_tensors(metric_tensors, out / METRICS_FILE, metadata=meta)
        for a, b in pairs:
            plot_heatmap(tensors[f"D/{a}/{b}"], tensors[f"S/{a}/{b}"], a, b, cfg.score_form,
                         out / f"heatmap_{a}__{b}.png")
    art = ScoresArtifact(family=family.name, anchors=[dict(name=v.name, depth=v.depth, flops=v.flops) for v in family],
                         n_val=res["count"], score_form=cfg.score_form, lam=cfg.lam, temperature=cfg.temperature,
                         anchor_kl=dict(names=names, matrix=res["anchor_kl"].tolist()),
                         cap={a: res["cap"][a].tolist() for a in names}, pairs=summary_pairs,
                         metrics=sorted({k.split("/")[0] for k in metric_tensors}), wall_s=round(wall, 2),
                         world_size=di.world)
    if di.is_main:
        art.save(out)
    kd.barrier("scores record")
    return art


# --- the stage contract ---------------------------------------------------------------------------------------------
NAME, CONFIG, ARTIFACT, AFTER = "scores", ScoresConfig, ScoresArtifact, ("probes",)
DESCRIBE = "stream all-pairs KL (D, Cap, S) over the val split"


def summary(art: ScoresArtifact) -> dict:
    return dict(n_val=art.n_val, anchor_pairs=len(art.pairs), wall_s=art.wall_s)
