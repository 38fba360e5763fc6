"""Alternative block-similarity metrics, the baselines KLAS is compared with (KLAS paper, Sec. 5.1, App. D).

Every metric gives a table [source blocks, target blocks] where LOWER means "more promising stitch", so they plug
into the same bucketed selection as the KLAS stitch score:

- ``mse``: fraction of the target's pooled-feature variance left unexplained by the least-squares affine map from the
  source's pooled features (1 - R^2). Streaming: only first and second moments are accumulated.
- ``cka``: 1 - linear CKA (Kornblith et al. 2019) between pooled features, from the same moments.
- ``ce``: cross-entropy H(p_A,i, p_B,j) = -E_x sum_c p_A,i log p_B,j = D[i, j] + H(p_A,i).
- ``dm``: squared Maximum Mean Discrepancy (biased V-statistic, Gaussian kernel on the probability simplex) between
  the sets of probe distributions {p_A,i(x)} and {p_B,j(x)} of a validation subsample -- a distribution-matching
  distance that, unlike KL, ignores which sample produced which distribution.
- ``tlm`` (task-loss matching) and ``fula`` (functional latent alignment, Athanasiadis et al. 2025: the objective of
  ``klas.stitch.fula_loss``, shared with ``--init fula``) *fit* a stitch layer per configuration, with a
  ``klas.stitch.FitCfg`` budget (``REFERENCE_FIT``); they are costly references, run on a sample of configurations
  (``FittedScorer`` below).

Importing this module registers them: the streaming tables (mse, cka, ce, dm) as metrics of the scores stage
(``klas.stages.s2_scores.register_metric``) and every table plus the fitted ones as selection methods
(``klas.stages.s3_selection.register_method``). The stages never import this module; ``klas.research.register_all``
does, before a run.
"""
from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from klas import distributed as kd
from klas.families import BlockView
from klas.stages import s2_scores as s2
from klas.stages import s3_selection as s3
from klas.stitch import FitCfg, StitchLayer, adam_fit, fula_loss, fula_scales, lstsq_layer

FITTED_METRICS = ("tlm", "fula")


# --------------------------------------------------------------------------------------------- streaming moments
class FeatureMoments:
    """Streaming float64 sums of pooled block features: per-block sums and Gram matrices of every anchor, and the
    cross Gram of every (source, target) anchor pair -- enough for least-squares residuals and linear CKA of all
    block pairs without keeping any feature of the split."""

    def __init__(self, widths: dict[str, list[int]], pairs: list[tuple[str, str]]):
        self.widths, self.pairs, self.n = widths, list(pairs), 0
        self.sums = {a: torch.zeros(sum(w), dtype=torch.float64) for a, w in widths.items()}
        self.grams = {a: [torch.zeros(c, c, dtype=torch.float64) for c in w] for a, w in widths.items()}
        self.cross = {p: torch.zeros(sum(widths[p[0]]), sum(widths[p[1]]), dtype=torch.float64) for p in self.pairs}

    def update(self, feats: dict[str, list[torch.Tensor]]) -> None:
        flat = {a: torch.cat([f.double() for f in fs], dim=1) for a, fs in feats.items()}
        for a, fs in feats.items():
            self.sums[a] += flat[a].sum(0)
            for k, f in enumerate(fs):
                f = f.double()
                self.grams[a][k] += f.T @ f
        for a, b in self.pairs:
            self.cross[(a, b)] += flat[a].T @ flat[b]
        self.n += next(iter(flat.values())).shape[0]

    def _blocks(self, a: str) -> list[slice]:
        out, s = [], 0
        for c in self.widths[a]:
            out.append(slice(s, s + c))
            s += c
        return out

    def _centered(self, a: str, b: str):
        """Centered covariances (unnormalized): per-block C_aa, C_bb and the full cross C_ab."""
        n = self.n
        sa, sb = self.sums[a], self.sums[b]
        caa = [g - torch.outer(sa[s], sa[s]) / n for g, s in zip(self.grams[a], self._blocks(a))]
        cbb = [g - torch.outer(sb[s], sb[s]) / n for g, s in zip(self.grams[b], self._blocks(b))]
        cab = self.cross[(a, b)] - torch.outer(sa, sb) / n
        return caa, cbb, cab

    def lstsq_residual(self, a: str, b: str) -> torch.Tensor:
        """[dA, dB]: unexplained variance fraction of target block j by an affine map of source block i."""
        caa, cbb, cab = self._centered(a, b)
        sl_a, sl_b = self._blocks(a), self._blocks(b)
        total = torch.stack([torch.trace(c) for c in cbb])  # [dB]
        out = torch.empty(len(caa), len(cbb), dtype=torch.float64)
        for i, (c, si) in enumerate(zip(caa, sl_a)):
            cxy = cab[si]  # [c_i, sum c_B]
            m = torch.linalg.pinv(c, hermitian=True) @ cxy
            expl = (cxy * m).sum(0)  # per target channel
            for j, sj in enumerate(sl_b):
                out[i, j] = 1.0 - expl[sj].sum() / total[j].clamp_min(1e-300)
        return out.clamp(0.0, 1.0)

    def linear_cka(self, a: str, b: str) -> torch.Tensor:
        """[dA, dB]: linear CKA = ||C_ab||_F^2 / (||C_aa||_F ||C_bb||_F)."""
        caa, cbb, cab = self._centered(a, b)
        na = torch.stack([torch.linalg.matrix_norm(c) for c in caa])
        nb = torch.stack([torch.linalg.matrix_norm(c) for c in cbb])
        out = torch.empty(len(caa), len(cbb), dtype=torch.float64)
        for i, si in enumerate(self._blocks(a)):
            for j, sj in enumerate(self._blocks(b)):
                out[i, j] = (cab[si, sj] ** 2).sum()
        return out / (na[:, None] * nb[None, :]).clamp_min(1e-300)


def cross_entropy_table(kl: torch.Tensor, entropy_src: torch.Tensor) -> torch.Tensor:
    """H(p_A,i, p_B,j) = KL(p_A,i || p_B,j) + H(p_A,i), from the KL table and the source probes' mean entropy."""
    return kl + entropy_src[:, None]


def mmd2_table(p: torch.Tensor, q: torch.Tensor, sigma: float = 0.5) -> torch.Tensor:
    """Biased squared MMD, Gaussian kernel exp(-|x-y|^2 / (2 sigma^2)), between every p[i] [n, C] and q[j] [m, C]."""
    p, q = p.double(), q.double()

    def kmean(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # x [n, C], y [k, m, C] -> [k]
        d2 = torch.cdist(x[None].expand(y.shape[0], -1, -1), y).pow(2)
        return torch.exp(-d2 / (2 * sigma ** 2)).mean(dim=(1, 2))

    kpp = torch.stack([kmean(x, x[None])[0] for x in p])
    kqq = torch.stack([kmean(y, y[None])[0] for y in q])
    kpq = torch.stack([kmean(x, q) for x in p])  # [dA, dB]
    return (kpp[:, None] + kqq[None, :] - 2 * kpq).clamp_min(0.0)


# --------------------------------------------------------------------------------------------- fitted references
REFERENCE_FIT = FitCfg(samples=256, batch_size=32, steps=20)
"""Budget of the fitted references: a least-squares start on ``samples`` training images, then ``steps`` Adam steps
(batch ``batch_size``, ``lr``) on the stitch layer only."""
REFERENCE_VAL_SAMPLES = 512
"""Validation images a fitted reference is scored on."""


def fitted_scorer(views: list[BlockView], train, val, fit: FitCfg) -> "FittedScorer":
    """A ``FittedScorer`` on the first ``fit.samples`` images of ``train`` and ``REFERENCE_VAL_SAMPLES`` of ``val``
    (in-memory splits)."""
    tr, va = train.subset(fit.samples), val.subset(REFERENCE_VAL_SAMPLES)
    return FittedScorer(views, tr.normalize(tr.images), tr.labels, va.normalize(va.images), va.labels, fit)


class FittedScorer:
    """Holds block outputs of a small train and val subsample for every anchor, then fits one configuration at a time
    with ``cfg`` (a ``klas.stitch.FitCfg``; its ``method`` is ignored: the metric names the objective).

    The anchors are frozen for the scorer's lifetime (``requires_grad`` restored by ``close``)."""

    def __init__(self, views: list[BlockView], x_train, y_train, x_val, y_val, cfg: FitCfg = REFERENCE_FIT):
        self.cfg, self.views = cfg, {v.name: v for v in views}
        self._grad_state = {n: [p.requires_grad for p in v.parameters()] for n, v in self.views.items()}
        for v in views:
            v.eval().requires_grad_(False)
        with torch.no_grad():
            self.train = {v.name: v.forward_all(x_train)[0] for v in views}
            self.val = {v.name: v.forward_all(x_val)[0] for v in views}
        self.y_train, self.y_val = y_train, y_val

    def close(self) -> None:
        for n, v in self.views.items():
            for p, rg in zip(v.parameters(), self._grad_state[n]):
                p.requires_grad_(rg)

    def _steps(self, n: int):
        g = torch.Generator().manual_seed(self.cfg.seed)
        for _ in range(self.cfg.steps):
            yield torch.randint(0, n, (min(self.cfg.batch_size, n),), generator=g)

    def _fit(self, src: str, i: int, tgt: str, j: int, loss_fn) -> StitchLayer:
        """The stitch layer (src, i) -> (tgt, j): least squares on the cached training features, then ``cfg.steps``
        Adam steps of ``loss_fn(stitch output, sample indices)`` on random training batches."""
        xs = self.train[src][i]
        layer = lstsq_layer(xs, self.train[tgt][j], self.views[src].channels_last, self.cfg.ridge)
        adam_fit(layer, lambda idx: loss_fn(layer(xs[idx]), idx), self._steps(xs.shape[0]), self.cfg.lr)
        return layer

    def tlm(self, src: str, i: int, tgt: str, j: int) -> float:
        """Task-loss matching: train the stitch layer on the task loss; score = validation cross-entropy."""
        t = self.views[tgt]

        def logits(h: torch.Tensor) -> torch.Tensor:
            return t.forward_head(t.forward_blocks(h, j + 1))

        layer = self._fit(src, i, tgt, j, lambda h, idx: F.cross_entropy(logits(h), self.y_train[idx]))
        with torch.no_grad():
            return float(F.cross_entropy(logits(layer(self.val[src][i])), self.y_val))

    def fula(self, src: str, i: int, tgt: str, j: int) -> float:
        """Functional latent alignment (``klas.stitch.fula_loss``, the objective of ``--init fula``): fit the stitch
        so the stitched latents match the target's at the stitch point and at every later block, normalised by the
        training latents' mean squares; score = the alignment loss on the validation images."""
        t = self.views[tgt]
        tr_t, va_t = self.train[tgt][j:], self.val[tgt][j:]
        scales = fula_scales([tr_t])
        layer = self._fit(src, i, tgt, j, lambda h, idx: fula_loss(h, t, j, [z[idx] for z in tr_t], scales))
        with torch.no_grad():
            return float(fula_loss(layer(self.val[src][i]), t, j, va_t, scales))

    def score_all(self, metric: str, configs: list[tuple[str, int, str, int]], progress: bool = True) -> list[float]:
        fn = {"tlm": self.tlm, "fula": self.fula}[metric]
        return [fn(*c) for c in tqdm(configs, desc=f"fitting {metric}", leave=False, mininterval=2, file=sys.stdout,
                                     disable=not progress)]


# ------------------------------------------------------------------------------------------------------ plug-ins
class _Moments:
    """mse and cka of the scores pass: the ``FeatureMoments`` of every anchor's probe features."""

    def __init__(self, sp: s2.ScorePass):
        self.m = FeatureMoments({v.name: v.widths for v in sp.family}, sp.pairs)

    def update(self, batch: s2.ScoreBatch) -> None:
        self.m.update(batch.features)

    def reduce(self) -> None:
        m = self.m
        kd.all_reduce_([*m.sums.values(), *(g for gs in m.grams.values() for g in gs), *m.cross.values()],
                       "feature moments")
        m.n = kd.all_reduce_int(m.n, "feature moments")

    def tables(self, a: str, b: str, res: dict) -> dict:
        return dict(mse=self.m.lstsq_residual(a, b), cka=1.0 - self.m.linear_cka(a, b))


class _CrossEntropy:
    """ce, from the pass's KL table and the source probes' mean entropy: nothing to stream."""

    def __init__(self, sp: s2.ScorePass):
        pass

    def update(self, batch: s2.ScoreBatch) -> None:
        pass

    def reduce(self) -> None:
        pass

    def tables(self, a: str, b: str, res: dict) -> dict:
        return dict(ce=cross_entropy_table(res["D"][(a, b)], res["entropy"][a][:-1]))


class _MMD:
    """dm: a fixed subsample of probe distributions -- the first ``dm_samples`` images of the split, whichever rank
    holds them -- then the MMD between every pair of blocks."""

    def __init__(self, sp: s2.ScorePass):
        self.names, self.cfg = sp.names, sp.cfg
        self.keep: dict[str, list[torch.Tensor]] = {a: [] for a in sp.names}
        self.kept = 0

    def update(self, batch: s2.ScoreBatch) -> None:
        take = int((batch.positions < self.cfg.dm_samples).sum())
        if take > 0:
            for a in self.names:
                self.keep[a].append(torch.softmax(batch.logits[a][:-1, :take].double() / self.cfg.temperature, dim=-1))
            self.kept += take

    def reduce(self) -> None:
        # MMD is a mean over sample pairs: the order in which the ranks' subsamples are joined does not matter
        names = self.names
        parts = kd.gather_objects({a: torch.cat(t, 1) if t else None for a, t in self.keep.items()}, "MMD subsample")
        self.keep = {a: [p[a] for p in parts if p[a] is not None] for a in names}
        self.kept = sum(p[names[0]].shape[1] for p in parts if p[names[0]] is not None)

    def tables(self, a: str, b: str, res: dict) -> dict:
        if not self.kept:
            return {}
        return dict(dm=mmd2_table(torch.cat(self.keep[a], 1), torch.cat(self.keep[b], 1), self.cfg.dm_sigma))


class FittedMethod(s3.SelectionMethod):
    """A fitted reference (tlm, fula) as a selection method: fits the stitch layer of a sample of ``max_pairs``
    configurations (``s3_selection.sample_configs``) with the ``REFERENCE_FIT`` budget (``ctx.hooks["fit"]``: another
    ``FitCfg``, e.g. a smaller one in tests), the others stay unscored; then the KLAS buckets."""

    uses_max_pairs = True

    def __init__(self, name: str):
        self.name = name

    def tables(self, c: s3.Candidates) -> list[dict]:
        tables = c.tables(lambda p: None)
        t_fit = time.time()
        fitted = self._fit(c, tables)
        c.cost.update(fit_wall_s=round(time.time() - t_fit, 2), configs_fitted=fitted,
                      per_config_s=round((time.time() - t_fit) / max(fitted, 1), 3))
        return tables

    def _fit(self, c: s3.Candidates, tables: list[dict]) -> int:
        """Fill the score column of the sampled configurations; returns how many were fitted."""
        family, ctx = c.family, c.ctx
        fit = ctx.hooks.get("fit") or REFERENCE_FIT
        picks = s3.sample_configs(tables, c.cfg.max_pairs, ctx.seed)
        used = sorted({tables[t]["source"] for t, _ in picks} | {tables[t]["target"] for t, _ in picks},
                      key=[v.name for v in family].index)
        scorer = fitted_scorer([family[a] for a in used], ctx.split("train"), ctx.split("val"), fit)
        try:
            configs = [(tables[t]["source"], tables[t]["i"][r], tables[t]["target"], tables[t]["j"][r])
                       for t, r in picks]
            values = scorer.score_all(self.name, configs, ctx.progress)
        finally:
            scorer.close()
        for (t, r), v in zip(picks, values):
            tables[t]["score"][r] = v
        return len(picks)


# the scores pass's plug-ins: (name, accumulator, the tables it writes), in the order it writes them
STREAMED = (("moments", _Moments, ("mse", "cka")), ("ce", _CrossEntropy, ("ce",)), ("dm", _MMD, ("dm",)))
FEATURE_METRICS = tuple(t for _, _, tables in STREAMED for t in tables)  # mse, cka, ce, dm


_REGISTERED = []


def register() -> None:
    """Register the baselines with the scores and selection stages, once per process (later calls do nothing, so a
    registry a caller has narrowed since -- a test's -- stays as it is)."""
    if _REGISTERED:
        return
    _REGISTERED.append(True)
    for name, make, tables in STREAMED:
        s2.register_metric(name, make, tables=tables)
    for name in FEATURE_METRICS:
        s3.register_method(s3.TableMethod(name))
    for name in FITTED_METRICS:
        s3.register_method(FittedMethod(name))


register()
