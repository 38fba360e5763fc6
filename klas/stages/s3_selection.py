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

Methods (same JSON schema): "klas", the metric baselines of ``klas.research.metrics`` through the same buckets ("mse", "ce",
"cka", "dm", fitted "tlm", "fula"), "min-kl" (lowest D, no buckets, as many configurations as KLAS selects) and
SN-Net's heuristics "snnet-paired" / "snnet-unpaired" on the nearest anchors.
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import ClassVar
from pathlib import Path

import torch

from klas.data import open_split
from klas.errors import KlasError
from klas.families import Family, stitchable, stitched_flops
from klas.io import load_json
from klas.contract import Artifact, StageContext, setting
from klas.rundir import RunDir
from klas.stages.s2_scores import SCORES_FILE, load_scores, stitch_score

# the baseline metrics (research code, klas.research.metrics) ranked through the same buckets as KLAS
FEATURE_METRICS, FITTED_METRICS = ("mse", "ce", "cka", "dm"), ("tlm", "fula")
METHODS = ("klas", "min-kl", "snnet-paired", "snnet-unpaired") + FEATURE_METRICS + FITTED_METRICS
ANCHOR_RULES = ("klas", "nearest", "all")
BUCKETED = ("klas",) + FEATURE_METRICS + FITTED_METRICS
SELECTION_JSON = "selection.json"


@dataclass(frozen=True)
class SelectionConfig:
    """Which anchor pairs to stitch and which configurations per FLOPs bucket (paper Eq. 3, Alg. 3)."""

    method: str = setting("klas", "selection method: KLAS or a baseline", choices=METHODS)
    tau: float = setting(0.05, "keep scores <= (1 + tau) x the bucket minimum", ge=0)
    num_buckets: int | None = setting(None, "FLOPs buckets per anchor pair", ge=1, none="auto")
    max_buckets: int = setting(500, "largest bucket count the automatic search tries", ge=1)
    anchor_rule: str | None = setting(None, "anchor pairs: klas (anchor KL), nearest (SN-Net), all; auto = nearest "
                                      "for the snnet methods, klas otherwise", choices=ANCHOR_RULES, none="auto")
    anchor_pairs: str | None = setting(None, "explicit anchor pairs SRC:TGT[,SRC:TGT...] instead of the rule",
                                       none="rule")
    max_pairs: int = setting(48, "configurations the fitted baselines (tlm, fula) are fitted on", ge=1)


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
        return [(a, b) for k, a in enumerate(names) for b in names[k + 1:]]
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
def select(family: Family, run_dir: Path | str, cfg: SelectionConfig, *, seed: int = 0,
           data_root: Path | str | None = None, out: Path | None = None, fit=None,
           progress: bool = True, data=None) -> SelectionArtifact:
    """Select stitch configurations with ``cfg.method`` from the run's scores; writes ``selection.json`` and a
    candidates plot into ``out`` (default: the run's ``selection/`` folder, the stage's artifact). ``fit``: the
    fitted baselines' budget (default ``klas.research.metrics.REFERENCE_FIT``; smaller in tests)."""
    method, tau, num_buckets, max_buckets, max_pairs = (cfg.method, cfg.tau, cfg.num_buckets, cfg.max_buckets,
                                                        cfg.max_pairs)
    anchor_rule = cfg.anchor_rule or ("nearest" if method.startswith("snnet") else "klas")
    anchor_pairs = [p.split(":") for p in cfg.anchor_pairs.split(",")] if cfg.anchor_pairs else None
    run = RunDir(run_dir, family.name)
    out = Path(out) if out is not None else run.stage("selection")
    out.mkdir(parents=True, exist_ok=True)
    rec_s, tensors, metric_tensors = load_scores(run.path)
    score_form, lam = rec_s.score_form, rec_s.lam
    names = [v.name for v in family]
    if rec_s.anchor_kl["names"] != names:
        raise KlasError(f"{run.path / 'scores' / SCORES_FILE}: scored anchors {rec_s.anchor_kl['names']} differ "
                        f"from the family's {names}; rerun the scores stage")
    kl = tensors["anchor_kl"]
    pairs = parse_anchor_pairs(anchor_pairs, family) if anchor_pairs else choose_anchor_pairs(names, kl, anchor_rule)
    params = dict(tau=tau, num_buckets=num_buckets, score_form=score_form, lam=lam,
                  anchor_rule="explicit" if anchor_pairs else anchor_rule,
                  max_pairs=max_pairs if method in FITTED_METRICS else None, max_buckets=max_buckets)
    t0 = time.time()
    d_of = {p: tensors[f"D/{p[0]}/{p[1]}"].double() for p in pairs}
    cap_of = {b: tensors[f"cap/{b}"].double() for _, b in pairs}
    klas_score = {p: stitch_score(d_of[p], cap_of[p[1]], score_form, lam) for p in pairs}

    def tables_with(score_of) -> list[dict]:
        return [candidate_table(family, a, b, d_of[(a, b)], cap_of[b], score_of((a, b))) for a, b in pairs]

    cost: dict = dict(klas_wall_s=_klas_cost(run))
    rule_used = {}
    if method in ("klas", "min-kl") or method.startswith("snnet"):
        tables = tables_with(lambda p: klas_score[p] if method != "min-kl" else d_of[p])
    elif method in FEATURE_METRICS:
        key = f"{method}/{{}}/{{}}"
        missing = [p for p in pairs if key.format(*p) not in metric_tensors]
        if missing:
            raise KlasError(f"{run.path / 'scores'}: no {method!r} table for {missing[0][0]}->{missing[0][1]}; rerun "
                            f"the scores stage with scores.metrics = true")
        tables = tables_with(lambda p: metric_tensors[key.format(*p)].double())
    else:
        tables = tables_with(lambda p: None)
        t_fit = time.time()
        fitted = _fit_scores(family, tables, method, max_pairs, seed, data_root, fit, progress, data)
        cost.update(fit_wall_s=round(time.time() - t_fit, 2), configs_fitted=fitted,
                    per_config_s=round((time.time() - t_fit) / max(fitted, 1), 3))

    auto = num_buckets is None
    if method in BUCKETED:
        n, search = auto_num_buckets(tables, tau, max_buckets) if auto else (num_buckets, None)
        picks = [_pair_selection(t, n, tau) for t in tables]
    else:
        # min-kl and SN-Net: bucket ids are informational, from the KLAS buckets of the same anchor pairs
        klas_tables = tables if method != "min-kl" else tables_with(lambda p: klas_score[p])
        n, search = auto_num_buckets(klas_tables, tau, max_buckets) if auto else (num_buckets, None)
        picks = [_pair_selection(t, n, tau) for t in klas_tables]
        if method == "min-kl":
            k_klas = sum(sum(ch) for _, ch in picks)
            picks = _min_kl(tables, [bk for bk, _ in picks], k_klas)
            cost["matched_klas_count"] = k_klas
        else:
            picks = [(bk, _snnet_chosen(t, method, rule_used)) for t, (bk, _) in zip(tables, picks)]
    cov = {}
    for t, (bk, ch) in zip(tables, picks):
        can, got = coverage(t, bk, ch)
        cov[f"{t['source']}->{t['target']}"] = dict(coverable=len(can), covered=len(can & got),
                                                    missing=sorted(can - got))
    params.update(num_buckets=n, num_buckets_auto=auto, bucket_search=search,
                  coverage=dict(complete=all(not c["missing"] for c in cov.values()), pairs=cov))
    if rule_used:
        params["snnet_rule_used"] = rule_used
    candidates, selected = [], []
    for t, (bk, ch) in zip(tables, picks):
        recs = _records(t, bk)
        candidates += recs
        selected += [r for r, c in zip(recs, ch) if c]
    cost["method_wall_s"] = round(time.time() - t0, 2)
    params["cost"] = cost
    nearest = nearest_pairs(names)
    klas_pairs = klas_anchor_pairs(names, kl)
    art = SelectionArtifact(**_plain(dict(
        family=family.name, method=method, params=params, anchors=names,
        anchor_flops={v.name: v.flops for v in family}, anchor_pairs=[list(p) for p in pairs],
        anchor_selection=dict(kl=dict(names=names, matrix=kl.tolist()), rule=params["anchor_rule"],
                              klas_pairs=[list(p) for p in klas_pairs], nearest_pairs=[list(p) for p in nearest],
                              klas_equals_nearest=klas_pairs == nearest),
        buckets={f"{t['source']}->{t['target']}": bucket_edges(t["lo"], t["hi"], n) for t in tables},
        candidates=candidates, selected=selected)))
    plot_candidates(asdict(art), out / f"candidates-{method}.png")
    art.save(out)
    return art


def _plain(obj):
    """The JSON form (tuples -> lists, copies): what a record compares equal to after a reload."""
    return json.loads(json.dumps(obj))


def _klas_cost(run: RunDir) -> dict:
    """Wall time of the KLAS stages this selection rests on (probes + scores), for the cost comparison."""
    out = {}
    for stage, name in (("probes", "probes.json"), ("scores", "scores.json")):
        p = run.path / stage / name
        out[stage] = load_json(p).get("wall_s") if p.is_file() else None
    return out


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


def _fit_scores(family: Family, tables: list[dict], method: str, max_pairs: int | None, seed: int,
                data_root, fit, progress: bool, data=None) -> int:
    """Fill the score column of the sampled configurations with the fitted metric (``fit``: default the reference
    budget, ``klas.research.metrics.REFERENCE_FIT``); returns how many were fitted."""
    from klas.research.metrics import REFERENCE_FIT, REFERENCE_VAL_SAMPLES, FittedScorer

    fit = fit or REFERENCE_FIT
    picks = sample_configs(tables, max_pairs, seed)
    train = open_split(family, "train", data, root=data_root).subset(fit.samples)
    val = open_split(family, "val", data, root=data_root).subset(REFERENCE_VAL_SAMPLES)
    used = sorted({tables[t]["source"] for t, _ in picks} | {tables[t]["target"] for t, _ in picks},
                  key=[v.name for v in family].index)
    scorer = FittedScorer([family[a] for a in used], train.normalize(train.images), train.labels,
                          val.normalize(val.images), val.labels, fit)
    try:
        configs = [(tables[t]["source"], tables[t]["i"][r], tables[t]["target"], tables[t]["j"][r]) for t, r in picks]
        values = scorer.score_all(method, configs, progress)
    finally:
        scorer.close()
    for (t, r), v in zip(picks, values):
        tables[t]["score"][r] = v
    return len(picks)


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


def run(cfg: SelectionConfig, ctx: StageContext) -> SelectionArtifact:
    return select(ctx.family, ctx.run_dir.path, cfg, seed=ctx.seed, data_root=ctx.data_root, progress=ctx.progress,
                  data=ctx.data)


def summary(art: SelectionArtifact) -> dict:
    return dict(method=art.method, selected=len(art.selected), candidates=len(art.candidates),
                anchor_pairs=art.anchor_pairs)
