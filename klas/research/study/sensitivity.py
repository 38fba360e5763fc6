"""``sensitivity``: selection size, target-block coverage and overlap with the default selection over tau, bucket
count and score form -- the selection stage's rule on the run's scores, nothing finetuned (cheap)."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from tqdm import tqdm

from klas.research.study.common import context, publish, scores, write_fig
from klas.research.study.common import plt as common_plt

TAUS = (0.01, 0.02, 0.03, 0.05, 0.075, 0.1)
BUCKETS = (0, 4, 8, 16, 32)  # 0: the automatic count


def _selection_set(tables: list[dict], tau: float, n: int | None, max_buckets: int = 500) -> tuple[set, dict]:
    from klas.stages.s3_selection import assign_buckets, auto_num_buckets, bucket_select, coverage

    n_used = n or auto_num_buckets(tables, tau, max_buckets)[0]
    chosen, can_all, got_all = set(), 0, 0
    for t in tables:
        bk = assign_buckets(t["flops"], t["lo"], t["hi"], n_used)
        ch = bucket_select(t["score"], bk, tau)
        can, got = coverage(t, bk, ch)
        can_all, got_all = can_all + len(can), got_all + len(can & got)
        chosen |= {(t["source"], i, t["target"], j) for i, j, c in zip(t["i"], t["j"], ch) if c}
    return chosen, dict(num_buckets=n_used, coverage=got_all / can_all if can_all else None)


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def sensitivity(run_dir: Path | str, out_dir: Path | str, taus=TAUS, buckets=BUCKETS, family=None,
                progress: bool = True) -> dict:
    """Selection count, coverage and Jaccard overlap with the default (the stage defaults: tau, automatic buckets,
    score form) over tau x bucket count and over score forms; reads the run's scores, writes nothing into the run."""
    from klas.stages.s2_scores import SCORE_FORMS, ScoresConfig, stitch_score
    from klas.stages.s3_selection import SelectionConfig, candidate_table, choose_anchor_pairs

    ctx = context(run_dir, family, progress=progress)
    fam = ctx.family
    rec_s, tensors, _ = scores(ctx)
    tau0, form0 = SelectionConfig().tau, ScoresConfig().score_form
    names = [v.name for v in fam]
    pairs = choose_anchor_pairs(names, tensors["anchor_kl"], "klas")

    def tables(form: str) -> list[dict]:
        return [candidate_table(fam, a, b, tensors[f"D/{a}/{b}"].double(), tensors[f"cap/{b}"].double(),
                                stitch_score(tensors[f"D/{a}/{b}"].double(), tensors[f"cap/{b}"].double(), form,
                                             rec_s.lam))
                for a, b in pairs]

    t0 = time.time()
    base_tables = tables(form0)
    ref, _ = _selection_set(base_tables, tau0, None)
    grid = []
    for n in tqdm(buckets, desc="[study] sensitivity", disable=not progress, file=sys.stdout):
        for tau in taus:
            s, info = _selection_set(base_tables, tau, n or None)
            grid.append(dict(tau=tau, buckets="auto" if not n else n, num_buckets=info["num_buckets"], count=len(s),
                             coverage=info["coverage"], overlap=jaccard(s, ref)))
    forms = []
    for form in SCORE_FORMS:
        s, info = _selection_set(tables(form), tau0, None)
        forms.append(dict(form=form, count=len(s), coverage=info["coverage"], num_buckets=info["num_buckets"],
                          overlap=jaccard(s, ref)))
    rec = dict(study="sensitivity", family=fam.name, anchor_pairs=[list(p) for p in pairs], default_count=len(ref),
               default_tau=tau0, grid=grid, forms=forms)
    return publish(rec, t0, out_dir, "sensitivity", fam.name, plot_sensitivity)


def plot_sensitivity(rec: dict, path: Path) -> None:
    plt = common_plt()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for bk in dict.fromkeys(g["buckets"] for g in rec["grid"]):
        g = [x for x in rec["grid"] if x["buckets"] == bk]
        for ax, key in zip(axes, ("count", "coverage", "overlap")):
            ax.plot([x["tau"] for x in g], [x[key] for x in g], marker="o", ms=3, label=f"buckets={bk}")
    for ax, key in zip(axes, ("selected configurations", "target-block coverage", "Jaccard vs default")):
        ax.set_xlabel("tau")
        ax.set_title(key, fontsize=9)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{rec['family']}: selection sensitivity (default tau {rec.get('default_tau', 0.05)}, auto buckets: "
                 f"{rec['default_count']} "
                 f"configs); forms: " + ", ".join(f"{f['form']} {f['count']} (J={f['overlap']:.2f})"
                                                  for f in rec["forms"]), fontsize=9)
    write_fig(fig, path, 100)
