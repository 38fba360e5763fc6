"""Stitch paths: a network as a sequence of anchor segments joined by stitch layers (SN-Netv2's two-way stitching).

A segment ``(anchor, start, end)`` runs blocks ``start..end-1`` of one anchor; the first segment starts at block 0
(with the anchor's stem), the last runs to the anchor's last block (``end`` None) and its head. Between two
segments sits one stitch layer (``klas.stitch.make_stitch_layer``) from the earlier segment's last block output to
the later segment's input (= the output of its anchor's block ``start - 1``). One-way stitching
(``StitchConfig``: source blocks 0..i, target from j+1) is the 2-segment path; SN-Netv2 (He et al., "Stitched
ViTs are Flexible Vision Backbones", ECCV 2024) adds

* large -> small ("reverse"): ``L[:i+1] -> S[j+1:]``, one transition, scored like a forward stitch by the KL of
  block i of L against block j of S (``D[L, i -> S, j]``) and S's capacity at j;
* large -> small -> large ("round-trip"): ``L[:i+1] -> S[j+1:k+1] -> L[m+1:]``, two transitions, scored by the
  SUM of its two transitions' stitch scores (``S_rev[i, j] + S_fwd[k, m]``): each transition is judged by the same
  KL machinery as a one-way stitch, and a path is no better than the sum of the mismatches it crosses.

Least squares fits every transition independently on the anchors' own features (as a one-way stitch is fitted).
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn as nn

from klas.errors import KlasError
from klas.families import stitchable
from klas.families.blockview import stitch_layer_flops
from klas.stitch import FitCfg, StitchConfig, make_stitch_layer, stitch_moments

DIRECTIONS = ("forward", "two-way")  # the selection option: one-way only, or with reverse and round-trip paths


@dataclass(frozen=True)
class StitchPath:
    """Segments ``((anchor, start, end), ...)``; ``end`` None = to the anchor's last block (and its head)."""

    segments: tuple

    def __post_init__(self):
        segs = tuple((str(a), int(s), None if e is None else int(e)) for a, s, e in self.segments)
        if not segs or segs[0][1] != 0 or segs[-1][2] is not None or any(e is None for _, _, e in segs[:-1]):
            raise KlasError(f"stitch path {self.segments!r}: expected segments (anchor, start, end) starting at "
                            f"block 0 and ending with end None (to the last block)")
        if any(e <= s for _, s, e in segs[:-1]) or any(a == b for (a, *_), (b, *_) in zip(segs, segs[1:])):
            raise KlasError(f"stitch path {self.segments!r}: every inner segment needs a block, neighbours differ")
        object.__setattr__(self, "segments", segs)

    @classmethod
    def from_config(cls, c: StitchConfig) -> "StitchPath":
        return cls(((c.source, 0, None),) if c.is_anchor else ((c.source, 0, c.i + 1), (c.target, c.j + 1, None)))

    @classmethod
    def round_trip(cls, large: str, i: int, small: str, j: int, k: int, m: int) -> "StitchPath":
        """``large[:i+1] -> small[j+1:k+1] -> large[m+1:]``."""
        return cls(((large, 0, i + 1), (small, j + 1, k + 1), (large, m + 1, None)))

    @property
    def key(self) -> str:
        """``a[:4]->b[6:]`` for a one-way stitch (= ``StitchConfig.key``), ``b[:5]->a[3:8]->b[7:]`` for a round trip."""
        if len(self.segments) == 1:
            return self.segments[0][0]
        out = []
        for n, (a, s, e) in enumerate(self.segments):
            out.append(f"{a}[:{e}]" if n == 0 else f"{a}[{s}:]" if e is None else f"{a}[{s}:{e}]")
        return "->".join(out)

    def transitions(self) -> list[tuple[str, int, str, int]]:
        """(source, i, target, j) of every stitch layer: source block i's output -> target from block j + 1."""
        return [(a, e - 1, b, s - 1) for (a, _, e), (b, s, _) in zip(self.segments, self.segments[1:])]

    def to_list(self) -> list:
        return [list(seg) for seg in self.segments]


def path_flops(family, path: StitchPath) -> int:
    """FLOPs per image: first anchor's stem, every segment's blocks, every stitch layer, last anchor's head."""
    segs = path.segments
    total = family[segs[0][0]].stem_flops + family[segs[-1][0]].head_flops
    for a, s, e in segs:
        v = family[a]
        total += sum(b.flops for b in v.infos[s:v.depth if e is None else e])
    total += sum(stitch_layer_flops(family[a], i, family[b], j) for a, i, b, j in path.transitions())
    return int(total)


class PathNet(nn.Module):
    """The network of a ``StitchPath`` over block views (``views``: anchor name -> view) and its stitch layers."""

    def __init__(self, views: dict, path: StitchPath, layers: list[nn.Module] | None = None):
        super().__init__()
        for a, i, b, j in path.transitions():
            if not stitchable(views[a], i, views[b], j):
                raise KlasError(f"{path.key}: {a} block {i} -> {b} block {j} is not stitchable")
        self.path = path
        self.views = nn.ModuleDict({a: views[a] for a in dict.fromkeys(s[0] for s in path.segments)})
        if layers is None:
            layers = [make_stitch_layer(views[a], i, views[b], j) for a, i, b, j in path.transitions()]
        if len(layers) != len(path.segments) - 1:
            raise ValueError(f"{path.key}: {len(path.segments) - 1} stitch layers needed, got {len(layers)}")
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        segs = self.path.segments
        h = self.views[segs[0][0]].forward_stem(x)
        for n, (a, s, e) in enumerate(segs):
            if n:
                h = self.layers[n - 1](h)
            h = self.views[a].forward_blocks(h, s, e)
        return self.views[segs[-1][0]].forward_head(h)

    def flops_of(self, family) -> int:
        return path_flops(family, self.path)


def fit_path(views: dict, path: StitchPath, images: Iterable[torch.Tensor] | None, cfg: FitCfg = FitCfg()
             ) -> PathNet:
    """A ``PathNet`` whose every stitch layer is the least-squares map of its transition (source block i features
    -> target block j features of the same images; ``images`` is re-iterated once per transition); None: the
    layers keep nn.Linear's default initialisation."""
    net = PathNet(views, path)
    if images is None:
        return net
    images = list(images)
    for layer, (a, i, b, j) in zip(net.layers, path.transitions()):
        moms = stitch_moments(views[a], i, views[b], j, images, layer)
        layer.set_affines([m.solve(cfg.ridge) for m in moms])
    return net


# --- selection candidates ---------------------------------------------------------------------------------------

def two_way_candidates(family, small: str, large: str, s_fwd: torch.Tensor, s_rev: torch.Tensor,
                       d_fwd: torch.Tensor, d_rev: torch.Tensor) -> list[dict]:
    """Every stitchable reverse (``large[:i+1] -> small[j+1:]``) and round-trip path (``large[:i+1] ->
    small[j+1:k+1] -> large[m+1:]``, small keeps >= 1 block, large repeats none: m >= i) of one anchor pair, with
    FLOPs and the stitch score (reverse: ``s_rev[i, j]``; round trip: ``s_rev[i, j] + s_fwd[k, m]``); ``s_fwd``
    [dS, dL] and ``s_rev`` [dL, dS] are the KLAS stitch scores of the two directions, ``d_*`` their raw D (NaN:
    not stitchable). Rows in the selection's schema plus ``direction`` and ``path``."""
    sv, lv = family[small], family[large]
    ds, dl = sv.depth, lv.depth
    fin = lambda t, a, b: t is not None and math.isfinite(float(t[a, b]))  # noqa: E731
    rows = []

    def add(path: StitchPath, direction: str, score: float, d: float, i: int, j: int):
        rows.append(dict(source=large, i=i, target=small, j=j, flops=path_flops(family, path), D=d, cap=None,
                         score=score, direction=direction, path=path.to_list(), key=path.key))

    for i in range(dl):
        for j in range(ds):
            if not (fin(s_rev, i, j) and stitchable(lv, i, sv, j)):
                continue
            sr, dr = float(s_rev[i, j]), float(d_rev[i, j])
            add(StitchPath(((large, 0, i + 1), (small, j + 1, None))), "reverse", sr, dr, i, j)
            for k in range(j + 1, ds):
                for m in range(i, dl):
                    if fin(s_fwd, k, m) and stitchable(sv, k, lv, m):
                        add(StitchPath.round_trip(large, i, small, j, k, m), "round-trip",
                            sr + float(s_fwd[k, m]), dr + float(d_fwd[k, m]), i, j)
    return rows



def two_way_select(c, tensors: dict, candidates: list[dict], n: int, tau: float, score_form: str, lam: float
                   ) -> tuple[list[dict], list[dict]]:
    """``selection.directions = two-way``: add every reverse and round-trip path of each chosen anchor pair (scored
    by the KLAS stitch score in ``score_form``) to the forward ``candidates`` (``c``:
    ``klas.stages.s3_selection.Candidates``) and re-select with Eq. 3 over all directions together, in the same
    ``n`` equal-width buckets over [FLOPs(small), FLOPs(large)] per pair. ``tensors``: the scores stage's, with
    ``D/large/small`` (``scores.reverse = true``). Returns (candidates, selected)."""
    from klas.stages.s2_scores import stitch_score
    from klas.stages.s3_selection import assign_buckets, bucket_select

    out_cand, out_sel = [], []
    for a, b in c.pairs:
        key = f"D/{b}/{a}"
        if key not in tensors:
            raise KlasError(f"{c.scores_folder}: no {key} table: two-way selection needs the large -> small KL; "
                            f"rerun the scores stage with scores.reverse = true")
        d_rev = tensors[key].double()
        s_rev = stitch_score(d_rev, tensors[f"cap/{a}"].double(), score_form, lam)
        rows = [dict(r, direction="forward") for r in candidates if (r["source"], r["target"]) == (a, b)]
        rows += two_way_candidates(c.family, a, b, c.klas_score[(a, b)], s_rev, c.d[(a, b)], d_rev)
        buckets = assign_buckets([r["flops"] for r in rows], c.family[a].flops, c.family[b].flops, n)
        for r, bk in zip(rows, buckets):
            r["bucket"] = bk
        keep = bucket_select([r["score"] for r in rows], buckets, tau)
        out_cand += rows
        out_sel += [r for r, k in zip(rows, keep) if k]
    return out_cand, out_sel
