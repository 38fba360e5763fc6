"""Selection (KLAS paper Sec. 4.2, Eq. 3, Alg. 3): which anchor pairs to stitch and which stitch configurations.

1. Anchor pairs: the KL divergence between the anchors' own final softmax distributions (from the scores stage);
   rule "klas" picks the chain of anchor pairs from the cheapest to the largest anchor whose worst (largest) KL is
   smallest (ties: smaller total KL) -- it recovers Ti-B for Swin and Ti-S, S-B for DeiT (paper Tab. 3). "nearest" is
   SN-Net's rule (FLOPs-adjacent anchors), "all" every ordered pair.
2. Candidates: every stitchable (i, j) of a chosen pair with its FLOPs (``klas.families.stitched_flops``). The range
   [FLOPs(source anchor), FLOPs(target anchor)] is cut into ``num_buckets`` equal-width buckets; in each bucket the
   configurations with score <= min + tau * |min| (= (1 + tau) * min for the non-negative scores) are kept.
   Configurations outside the range get no bucket and are never selected.
3. ``num_buckets`` (when not given): the smallest count for which every target block that has an in-range,
   scored candidate has at least one configuration selected; if no count up to ``max_buckets`` reaches that, the
   smallest count reaching the best coverage found (recorded in ``params.coverage``).

Methods are plug-ins (``register_method``), looked up by name; every one writes the same JSON schema. Shipped:
"klas", "min-kl" (lowest D, no buckets, as many configurations as KLAS selects), SN-Net's heuristics
"snnet-paired" / "snnet-unpaired" on the nearest anchors and ESTA's layer-count positions "esta", plus
``TableMethod``: a registered baseline metric table of the scores stage ranked through the same buckets.
``klas.research`` registers the baselines (mse, cka, ce, dm and the fitted tlm, fula; ``klas.research.register_all``).
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

import torch

from klas.contract import Artifact, StageContext, setting
from klas.errors import KlasError
from klas.families import Family, stitchable, stitched_flops
from klas.stages.s1_probes import ProbesArtifact
from klas.stages.s2_scores import SCORES_FILE, ScoresArtifact, anchor_pairs_ordered, stitch_score
from klas_runtime.registry import Registry

ANCHOR_RULES = ("klas", "nearest", "all")
SELECTION_JSON = "selection.json"


# ---------------------------------------------------------------------------------------------- method plug-ins
@dataclass
class Candidates:
    """What a selection method ranks: the run's scores of the chosen anchor pairs (float64), the stage's config and
    context; ``cost`` and ``notes`` collect what the method reports (``params.cost``, extra ``params`` keys)."""

    family: Family
    pairs: list
    d: dict  # (source, target) -> D [dA, dB]
    cap: dict  # target -> Cap [dB]
    klas_score: dict  # (source, target) -> S [dA, dB]
    metric_tensors: dict  # the scores stage's baseline tables, "name/source/target"
    scores_folder: Path
    cfg: Any  # SelectionConfig
    ctx: StageContext
    cost: dict = field(default_factory=dict)
    notes: dict = field(default_factory=dict)

    def tables(self, score_of) -> list[dict]:
        """One ``candidate_table`` per anchor pair, scored by ``score_of(pair)`` (a [dA, dB] tensor, or None)."""
        return [candidate_table(self.family, a, b, self.d[(a, b)], self.cap[b], score_of((a, b)))
                for a, b in self.pairs]

    @cached_property
    def klas_tables(self) -> list[dict]:
        """The candidates scored by the KLAS stitch score (their buckets serve the methods that have none)."""
        return self.tables(lambda p: self.klas_score[p])


class SelectionMethod:
    """A selection method. ``tables(c)`` scores the candidates (one table per anchor pair, ``Candidates.tables``);
    a ``bucketed`` method is then selected by Eq. 3 on its own scores, any other by ``choose(tables, klas_picks, c)``
    -> [(buckets, chosen)] per anchor pair, its bucket ids informational (KLAS's: ``klas_picks``)."""

    name: str = ""
    anchor_rule: str = "klas"  # the anchor rule when the config leaves it to the method
    bucketed: bool = True
    uses_max_pairs: bool = False  # fits a sample of configurations (``max_pairs`` recorded)

    def tables(self, c: Candidates) -> list[dict]:
        raise NotImplementedError

    def choose(self, tables: list[dict], klas_picks: list, c: Candidates) -> list:
        raise NotImplementedError


_METHODS: Registry[SelectionMethod] = Registry("selection method", KlasError,
                                              "klas.research.register_all() adds the baselines")


def register_method(method: SelectionMethod) -> SelectionMethod:
    """Register ``method`` (a ``SelectionMethod`` with a ``name``; a later registration of the same name replaces
    it); returns it."""
    return _METHODS.register(getattr(method, "name", ""), method)


def method_names() -> tuple[str, ...]:
    """Every registered method, in registration order (the shipped ones first)."""
    return _METHODS.names()


def get_method(name: str) -> SelectionMethod:
    """The registered method ``name``; one-line error naming the registered ones."""
    return _METHODS.get(name)


class KlasMethod(SelectionMethod):
    name = "klas"

    def tables(self, c):
        return c.klas_tables


class MinKL(SelectionMethod):
    """The configurations with the lowest raw D, no buckets, as many as KLAS selects."""

    name, bucketed = "min-kl", False

    def tables(self, c):
        return c.tables(lambda p: c.d[p])

    def choose(self, tables, klas_picks, c):
        k_klas = sum(sum(ch) for _, ch in klas_picks)
        c.cost["matched_klas_count"] = k_klas
        return _min_kl(tables, [bk for bk, _ in klas_picks], k_klas)


class SNNet(SelectionMethod):
    """SN-Net's paired / unpaired stitching on the nearest anchors."""

    anchor_rule, bucketed = "nearest", False

    def __init__(self, name: str):
        self.name = name

    def tables(self, c):
        return c.klas_tables

    def choose(self, tables, klas_picks, c):
        rule_used: dict = {}
        picks = [(bk, _snnet_chosen(t, self.name, rule_used)) for t, (bk, _) in zip(tables, klas_picks)]
        if rule_used:
            c.notes["snnet_rule_used"] = rule_used
        return picks


class ESTA(SelectionMethod):
    """Positions by layer count (ESTA's heuristic for language models): the first i + 1 blocks of the source, then
    the target from the same relative depth (``depth_matched``), for every i that leaves the target a block to run;
    no score is read. The finetune stage and ``klas compare`` cut the count to the budget, spread over FLOPs."""

    name, bucketed = "esta", False

    def tables(self, c):
        return c.klas_tables

    def choose(self, tables, klas_picks, c):
        from klas.stages.s2_scores import depth_matched

        picks = []
        for t, (bk, _) in zip(tables, klas_picks):
            ds, dt = t["depth_src"], t["depth_tgt"]
            picks.append((bk, [j == depth_matched(i, ds, dt) and j < dt - 1 for i, j in zip(t["i"], t["j"])]))
        return picks


class TableMethod(SelectionMethod):
    """A baseline metric's table from the scores stage (``s2_scores.register_metric``), through the KLAS buckets."""

    def __init__(self, name: str):
        self.name = name

    def tables(self, c):
        key = f"{self.name}/{{}}/{{}}"
        missing = [p for p in c.pairs if key.format(*p) not in c.metric_tensors]
        if missing:
            raise KlasError(f"{c.scores_folder}: no {self.name!r} table for {missing[0][0]}->{missing[0][1]}; rerun "
                            f"the scores stage with scores.metrics = true")
        return c.tables(lambda p: c.metric_tensors[key.format(*p)].double())


for _m in (KlasMethod(), MinKL(), SNNet("snnet-paired"), SNNet("snnet-unpaired"), ESTA()):
    register_method(_m)


@dataclass(frozen=True)
class SelectionConfig:
    """Which anchor pairs to stitch and which configurations per FLOPs bucket (paper Eq. 3, Alg. 3)."""

    method: str = setting("klas", "selection method: KLAS or a baseline", choices=method_names)
    tau: float = setting(0.05, "keep scores <= (1 + tau) x the bucket minimum", ge=0)
    num_buckets: int | None = setting(None, "FLOPs buckets per anchor pair", ge=1, none="auto")
    max_buckets: int = setting(500, "largest bucket count the automatic search tries", ge=1)
    anchor_rule: str | None = setting(None, "anchor pairs: klas (anchor KL), nearest (SN-Net), all; auto = nearest "
                                      "for the snnet methods, klas otherwise", choices=ANCHOR_RULES, none="auto")
    anchor_pairs: str | None = setting(None, "explicit anchor pairs SRC:TGT[,SRC:TGT...] instead of the rule",
                                       none="rule")
    max_pairs: int = setting(48, "configurations the fitted baselines (tlm, fula) are fitted on", ge=1)
    directions: str = setting("forward", "forward: small -> large stitches only; two-way (SN-Netv2, method klas): "
                              "also large -> small and large -> small -> large paths, scored by the same KL "
                              "(klas.stitch_path; needs scores.reverse = true)", choices=("forward", "two-way"))


@dataclass(frozen=True)
class SelectionArtifact(Artifact):
    """``selection.json``: the chosen anchor pairs, every candidate configuration with its FLOPs, score and bucket,
    and the selected ones (rows: source, i, target, j, flops, D, cap, score, bucket)."""

    KIND: ClassVar[str] = "selection"
    RECORD: ClassVar[str] = SELECTION_JSON
    family: str
    method: str
    params: dict
    anchors: list
    anchor_flops: dict
    anchor_pairs: list
    anchor_selection: dict
    buckets: dict
    candidates: list
    selected: list


# ------------------------------------------------------------------------------------------------ anchor pairs
def nearest_pairs(names: Sequence[str]) -> list[tuple[str, str]]:
    """SN-Net's "nearest stitching": each anchor with the next one in FLOPs order."""
    return [(names[k], names[k + 1]) for k in range(len(names) - 1)]


def klas_anchor_pairs(names: Sequence[str], kl: torch.Tensor) -> list[tuple[str, str]]:
    """The chain names[0] -> ... -> names[-1] (FLOPs order) minimizing (max KL over its pairs, sum of KL)."""
    n = len(names)
    if n > 14:
        raise KlasError(f"anchor rule 'klas': {n} anchors is too many to enumerate chains; pass --anchor-pair")
    best, best_key = None, None
    for mask in range(1 << max(n - 2, 0)):
        chain = [0] + [k + 1 for k in range(n - 2) if mask >> k & 1] + [n - 1]
        edges = [float(kl[a, b]) for a, b in zip(chain, chain[1:])]
        key = (max(edges), sum(edges))
        if best_key is None or key < best_key:
            best, best_key = chain, key
    return [(names[a], names[b]) for a, b in zip(best, best[1:])]


def choose_anchor_pairs(names: Sequence[str], kl: torch.Tensor, rule: str) -> list[tuple[str, str]]:
    if len(names) < 2:
        raise KlasError(f"family has {len(names)} anchor(s): stitching needs at least two")
    if rule == "nearest":
        return nearest_pairs(names)
    if rule == "all":
        return anchor_pairs_ordered(list(names))
    if rule == "klas":
        return klas_anchor_pairs(names, kl)
    raise KlasError(f"--anchor-rule {rule!r}: unknown; expected one of {', '.join(ANCHOR_RULES)}")


def parse_anchor_pairs(pairs: Sequence[str | Sequence[str]], family: Family) -> list[tuple[str, str]]:
    """'SRC:TGT' strings (or pairs) -> validated (source, target) with the source the cheaper anchor."""
    out = []
    for p in pairs:
        parts = p.split(":") if isinstance(p, str) else list(p)
        if len(parts) != 2 or not all(parts):
            raise KlasError(f"--anchor-pair {p!r}: expected SOURCE:TARGET anchor names")
        src, tgt = family[parts[0]], family[parts[1]]
        if src.flops >= tgt.flops:
            raise KlasError(f"--anchor-pair {p!r}: the source must be the cheaper anchor ({src.name} has "
                            f"{src.flops} FLOPs, {tgt.name} {tgt.flops}); stitching runs small -> large")
        out.append((src.name, tgt.name))
    return out


# ------------------------------------------------------------------------------------------- SN-Net heuristics
def snnet_paired(d_src: int, d_tgt: int) -> list[tuple[int, int]]:
    """SN-Net paired stitching as (i, j): source blocks 0..i, target resumes at j + 1 at the same relative depth,
    (j + 1) / d_tgt = (i + 1) / d_src (rounded half up); the target must keep at least one block.

    For equal depths this is SN-Net's sliding window (kernel 2, stride 1) of forward stitches (a -> a + 1), i.e.
    i = j = 0..d-2; for unequal depths it is the same rule at the depth ratio (12 -> 24: j = 2i + 1)."""
    out: list[tuple[int, int]] = []
    for i in range(d_src):
        j = ((i + 1) * 2 * d_tgt + d_src) // (2 * d_src) - 1
        if 0 <= j <= d_tgt - 2 and (i, j) not in out:
            out.append((i, j))
    return out


def snnet_unpaired(d_src: int, d_tgt: int) -> list[tuple[int, int]]:
    """SN-Net unpaired stitching as (i, j): the source's block ids spread evenly over the target's by nearest
    interpolation, target block b <- source block floor(b * d_src / d_tgt); source block a is stitched into every
    target block b mapped to it with b > a (SN-Net's (a, b) = "source 0..a, target from b", so j = b - 1).

    12 -> 24: (0, 0), (1, 1), (1, 2), (2, 3), (2, 4), ..., (11, 21), (11, 22). Equal depths give no configuration
    (SN-Net then uses paired stitching)."""
    out = []
    for a in range(d_src):
        for b in range(1, d_tgt):
            if (b * d_src) // d_tgt == a and a < b:
                out.append((a, b - 1))
    return out


# ---------------------------------------------------------------------------------------------------- buckets
def assign_buckets(flops: Sequence[int], lo: int, hi: int, n: int) -> list[int | None]:
    """Equal-width buckets over [lo, hi] (integer arithmetic: no float edge effects); None outside the range."""
    if n < 1:
        raise KlasError(f"--num-buckets {n}: must be >= 1")
    if hi <= lo:
        raise KlasError(f"FLOPs range [{lo}, {hi}] is empty: the target anchor must cost more than the source")
    return [None if f < lo or f > hi else min((int(f) - lo) * n // (hi - lo), n - 1) for f in flops]


def bucket_edges(lo: int, hi: int, n: int) -> list[float]:
    return [lo + k * (hi - lo) / n for k in range(n + 1)]


def _threshold(m: float, tau: float) -> float:
    # (1 + tau) * min for a non-negative min; min + tau * |min| keeps the rule meaningful for negative scores
    return m + tau * abs(m)


def bucket_select(scores: Sequence[float | None], buckets: Sequence[int | None], tau: float) -> list[bool]:
    """Eq. 3: within each bucket keep every configuration whose score <= (1 + tau) * the bucket's minimum."""
    best: dict[int, float] = {}
    for s, b in zip(scores, buckets):
        if b is not None and s is not None and math.isfinite(s):
            best[b] = min(best.get(b, math.inf), s)
    return [b is not None and s is not None and math.isfinite(s) and s <= _threshold(best[b], tau)
            for s, b in zip(scores, buckets)]


def _pair_selection(table: dict, n: int, tau: float) -> tuple[list[int | None], list[bool]]:
    buckets = assign_buckets(table["flops"], table["lo"], table["hi"], n)
    return buckets, bucket_select(table["score"], buckets, tau)


def coverage(table: dict, buckets: list[int | None], chosen: list[bool]) -> tuple[set[int], set[int]]:
    """(target blocks that can be covered: an in-range scored candidate exists, target blocks covered)."""
    scored = [s is not None and math.isfinite(s) for s in table["score"]]
    can = {j for j, b, ok in zip(table["j"], buckets, scored) if b is not None and ok}
    return can, {j for j, c in zip(table["j"], chosen) if c}


def auto_num_buckets(tables: list[dict], tau: float, max_buckets: int = 500) -> tuple[int, dict]:
    """The smallest bucket count selecting at least one configuration for every coverable target block of every
    anchor pair; else the smallest count with the best coverage found up to ``max_buckets``."""
    best_n, best_cov = 1, -1
    for n in range(1, max_buckets + 1):
        cov = missing = 0
        for t in tables:
            buckets, chosen = _pair_selection(t, n, tau)
            can, got = coverage(t, buckets, chosen)
            cov += len(can & got)
            missing += len(can - got)
        if missing == 0:
            return n, dict(complete=True, searched=n)
        if cov > best_cov:
            best_n, best_cov = n, cov
    return best_n, dict(complete=False, searched=max_buckets)


# ---------------------------------------------------------------------------------------------- candidates
def candidate_table(family: Family, a: str, b: str, d: torch.Tensor, cap: torch.Tensor,
                    score: torch.Tensor | None) -> dict:
    """Every stitchable (i, j) of anchor pair a -> b with FLOPs, D, Cap and the method's score (None: unscored)."""
    src, tgt = family[a], family[b]
    if tuple(d.shape) != (src.depth, tgt.depth):
        raise KlasError(f"scores for {a}->{b} have shape {tuple(d.shape)}, the anchors have {src.depth} and "
                        f"{tgt.depth} blocks; rerun `klas score`")
    cols = {k: [] for k in ("i", "j", "flops", "D", "cap", "score")}
    for i in range(src.depth):
        for j in range(tgt.depth):
            if not stitchable(src, i, tgt, j):
                continue
            s = None if score is None else float(score[i, j])
            cols["i"].append(i)
            cols["j"].append(j)
            cols["flops"].append(stitched_flops(src, i, tgt, j))
            cols["D"].append(float(d[i, j]))
            cols["cap"].append(float(cap[j]))
            cols["score"].append(s if s is not None and math.isfinite(s) else None)
    if not cols["i"]:
        raise KlasError(f"anchor pair {a}->{b}: no stitchable block pairs (block outputs {src.infos[0].shape} .. "
                        f"vs {tgt.infos[0].shape} .. never match in shape)")
    return dict(source=a, target=b, lo=src.flops, hi=tgt.flops, depth_src=src.depth, depth_tgt=tgt.depth, **cols)


def _records(table: dict, buckets: list[int | None]) -> list[dict]:
    return [dict(source=table["source"], target=table["target"], i=i, j=j, flops=f, D=_num(dv), cap=_num(c),
                 score=_num(s), bucket=bk)
            for i, j, f, dv, c, s, bk in zip(table["i"], table["j"], table["flops"], table["D"], table["cap"],
                                              table["score"], buckets)]


def _num(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def sample_configs(tables: list[dict], max_pairs: int | None, seed: int = 0) -> list[tuple[int, int]]:
    """(table index, row) of the in-range configurations to fit. With more than ``max_pairs`` of them: round-robin
    over the (anchor pair, target block) groups, a seeded random source block from each in turn -- deterministic,
    and every target block stays represented as long as the budget allows."""
    groups: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for t, tab in enumerate(tables):
        for r in range(len(tab["i"])):
            if tab["lo"] <= tab["flops"][r] <= tab["hi"]:
                groups.setdefault((t, tab["j"][r]), []).append((t, r))
    pool = [c for key in sorted(groups) for c in groups[key]]
    if max_pairs is None or len(pool) <= max_pairs:
        return pool
    if max_pairs < 1:
        raise KlasError(f"--max-pairs {max_pairs}: must be >= 1")
    g = torch.Generator().manual_seed(seed)
    queues = [[grp[k] for k in torch.randperm(len(grp), generator=g).tolist()] for _, grp in sorted(groups.items())]
    picked: list[tuple[int, int]] = []
    while len(picked) < max_pairs:
        for q in queues:
            if q and len(picked) < max_pairs:
                picked.append(q.pop(0))
    return sorted(picked)


# ------------------------------------------------------------------------------------------------------- select
def run(cfg: SelectionConfig, ctx: StageContext) -> SelectionArtifact:
    """Select stitch configurations with ``cfg.method`` from the run's scores (``ctx.upstream(ScoresArtifact)``);
    writes ``selection.json`` and a candidates plot into the stage's folder (``ctx.hooks["out"]``: another folder,
    e.g. a comparison method's selection beside the run's own)."""
    method = get_method(cfg.method)
    tau, num_buckets, max_buckets, max_pairs = cfg.tau, cfg.num_buckets, cfg.max_buckets, cfg.max_pairs
    anchor_rule = cfg.anchor_rule or method.anchor_rule
    anchor_pairs = [p.split(":") for p in cfg.anchor_pairs.split(",")] if cfg.anchor_pairs else None
    family = ctx.family
    out = Path(ctx.hooks["out"]) if ctx.hooks.get("out") else ctx.folder(NAME)
    out.mkdir(parents=True, exist_ok=True)
    rec_s = ctx.upstream(ScoresArtifact)
    scores_folder = ctx.folder_of(ScoresArtifact)
    tensors, metric_tensors = ScoresArtifact.tensors(scores_folder)
    score_form, lam = rec_s.score_form, rec_s.lam
    names = [v.name for v in family]
    if rec_s.anchor_kl["names"] != names:
        raise KlasError(f"{scores_folder / SCORES_FILE}: scored anchors {rec_s.anchor_kl['names']} differ "
                        f"from the family's {names}; rerun the scores stage")
    kl = tensors["anchor_kl"]
    pairs = parse_anchor_pairs(anchor_pairs, family) if anchor_pairs else choose_anchor_pairs(names, kl, anchor_rule)
    params = dict(tau=tau, num_buckets=num_buckets, score_form=score_form, lam=lam,
                  anchor_rule="explicit" if anchor_pairs else anchor_rule,
                  max_pairs=max_pairs if method.uses_max_pairs else None, max_buckets=max_buckets)
    t0 = time.time()
    d_of = {p: tensors[f"D/{p[0]}/{p[1]}"].double() for p in pairs}
    cap_of = {b: tensors[f"cap/{b}"].double() for _, b in pairs}
    c = Candidates(family=family, pairs=pairs, d=d_of, cap=cap_of,
                   klas_score={p: stitch_score(d_of[p], cap_of[p[1]], score_form, lam) for p in pairs},
                   metric_tensors=metric_tensors, scores_folder=scores_folder, cfg=cfg, ctx=ctx,
                   cost=dict(klas_wall_s=_klas_cost(ctx, rec_s)))
    tables = method.tables(c)
    auto = num_buckets is None
    # a method without buckets of its own: bucket ids are informational, from the KLAS buckets of the same pairs
    ranked = tables if method.bucketed else c.klas_tables
    n, search = auto_num_buckets(ranked, tau, max_buckets) if auto else (num_buckets, None)
    picks = [_pair_selection(t, n, tau) for t in ranked]
    if not method.bucketed:
        picks = method.choose(tables, picks, c)
    cov = {}
    for t, (bk, ch) in zip(tables, picks):
        can, got = coverage(t, bk, ch)
        cov[f"{t['source']}->{t['target']}"] = dict(coverable=len(can), covered=len(can & got),
                                                    missing=sorted(can - got))
    params.update(num_buckets=n, num_buckets_auto=auto, bucket_search=search,
                  coverage=dict(complete=all(not v["missing"] for v in cov.values()), pairs=cov), **c.notes)
    candidates, selected = [], []
    for t, (bk, ch) in zip(tables, picks):
        recs = _records(t, bk)
        candidates += recs
        selected += [r for r, chosen in zip(recs, ch) if chosen]
    if cfg.directions == "two-way":
        from klas.stitch_path import two_way_select

        if cfg.method != "klas":
            raise KlasError(f"selection.directions = two-way: scores reverse paths by the KLAS stitch score; "
                            f"method {cfg.method!r} has none (use method = klas)")
        candidates, selected = two_way_select(c, tensors, candidates, n, tau, score_form, lam)
        params["directions"] = "two-way"
    c.cost["method_wall_s"] = round(time.time() - t0, 2)
    params["cost"] = c.cost
    nearest = nearest_pairs(names)
    klas_pairs = klas_anchor_pairs(names, kl)
    art = SelectionArtifact(**_plain(dict(
        family=family.name, method=cfg.method, params=params, anchors=names,
        anchor_flops={v.name: v.flops for v in family}, anchor_pairs=[list(p) for p in pairs],
        anchor_selection=dict(kl=dict(names=names, matrix=kl.tolist()), rule=params["anchor_rule"],
                              klas_pairs=[list(p) for p in klas_pairs], nearest_pairs=[list(p) for p in nearest],
                              klas_equals_nearest=klas_pairs == nearest),
        buckets={f"{t['source']}->{t['target']}": bucket_edges(t["lo"], t["hi"], n) for t in tables},
        candidates=candidates, selected=selected)))
    plot_candidates(asdict(art), out / f"candidates-{cfg.method}.png")
    art.save(out)
    return art


def _plain(obj):
    """The JSON form (tuples -> lists, copies): what a record compares equal to after a reload."""
    return json.loads(json.dumps(obj))


def _klas_cost(ctx: StageContext, scores: ScoresArtifact) -> dict:
    """Wall time of the KLAS stages this selection rests on (probes + scores), for the cost comparison."""
    try:
        probes = ctx.upstream(ProbesArtifact).wall_s
    except KlasError:  # probes made elsewhere (or removed since): no figure
        probes = None
    return dict(probes=probes, scores=scores.wall_s)


def _min_kl(tables: list[dict], buckets: list[list], k: int) -> list[tuple[list, list[bool]]]:
    """The k in-range configurations with the lowest raw D over all chosen anchor pairs (ties: fewer FLOPs)."""
    pool = [(t["D"][r], t["flops"][r], ti, r) for ti, t in enumerate(tables) for r in range(len(t["i"]))
            if t["lo"] <= t["flops"][r] <= t["hi"] and math.isfinite(t["D"][r])]
    keep = {(ti, r) for _, _, ti, r in sorted(pool)[:k]}
    return [(bk, [(ti, r) in keep for r in range(len(t["i"]))]) for ti, (t, bk) in enumerate(zip(tables, buckets))]


def _snnet_chosen(table: dict, method: str, rule_used: dict) -> list[bool]:
    d_src, d_tgt = table["depth_src"], table["depth_tgt"]
    rule = "paired" if method == "snnet-paired" or d_src == d_tgt else "unpaired"
    rule_used[f"{table['source']}->{table['target']}"] = rule if method == "snnet-paired" or d_src != d_tgt \
        else "paired (equal depths: SN-Net's unpaired rule maps nothing)"
    cfgs = set(snnet_paired(d_src, d_tgt) if rule == "paired" else snnet_unpaired(d_src, d_tgt))
    return [(i, j) in cfgs for i, j in zip(table["i"], table["j"])]


def plot_candidates(rec: dict, path: Path) -> None:
    """FLOPs vs score per anchor pair: all candidates (grey), selected (red), bucket edges (dotted)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = [tuple(p) for p in rec["anchor_pairs"]]
    fig, axes = plt.subplots(1, len(pairs), figsize=(5.2 * len(pairs), 3.8), squeeze=False)
    for ax, (a, b) in zip(axes[0], pairs):
        cand = [c for c in rec["candidates"] if (c["source"], c["target"]) == (a, b) and c["score"] is not None]
        sel = [c for c in rec["selected"] if (c["source"], c["target"]) == (a, b) and c["score"] is not None]
        out = [c for c in cand if c["bucket"] is None]
        cand = [c for c in cand if c["bucket"] is not None]
        ax.scatter([c["flops"] / 1e6 for c in cand], [c["score"] for c in cand], s=9, c="0.55", label="candidates")
        ax.scatter([c["flops"] / 1e6 for c in out], [c["score"] for c in out], s=9, c="0.85", marker="x",
                   label="outside the anchors' FLOPs range")
        ax.scatter([c["flops"] / 1e6 for c in sel], [c["score"] for c in sel], s=22, c="tab:red", label="selected")
        for e in rec["buckets"][f"{a}->{b}"]:
            ax.axvline(e / 1e6, color="0.8", lw=0.6, ls=":")
        ax.set_title(f"{rec['method']}: {a} -> {b} ({len(sel)} selected)", fontsize=9)
        ax.set_xlabel("MFLOPs")
        ax.set_ylabel("score (lower is better)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- the stage contract ---------------------------------------------------------------------------------------------
NAME, CONFIG, ARTIFACT, AFTER = "selection", SelectionConfig, SelectionArtifact, ("scores",)
DESCRIBE = "choose anchor pairs and the stitches per FLOPs bucket"


def summary(art: SelectionArtifact) -> dict:
    return dict(method=art.method, selected=len(art.selected), candidates=len(art.candidates),
                anchor_pairs=art.anchor_pairs)
