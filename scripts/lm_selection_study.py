"""KLAS vs ESTA's layer-count positions vs Min-KL on a language-model family, at equal finetuning cost, over seeds
(the KLAS paper's Sec. 5.5 comparison, on what this machine can run).

    python scripts/lm_selection_study.py                                    # pydoc-llama, seeds 0,1,2
    python scripts/lm_selection_study.py CONFIG.toml --seeds 0,1,2,3 --out runs/lm-study

Per seed: the run's probes and scores (``klas run --until selection`` with that seed), then every method's selection
from the same scores, each cut to the same number of stitches (spread over FLOPs) and finetuned and evaluated with
the config's finetune and evaluation settings (``klas compare``'s machinery: same steps, batch, seed). Per arm:
the AUC of 100/perplexity over normalized FLOPs per token (the zoo staircase), the mean test perplexity and ROUGE-1/2/L
of its stitched models, and how many of them the admission test let into the zoo. Writes ``study.json`` and
``study.md`` (mean +- std over seeds) in ``--out``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import replace
from pathlib import Path

METHODS = ("klas", "esta", "min-kl")


def _mean_sd(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", nargs="?", type=Path, default=Path(__file__).parents[1] / "klas/configs/pydoc-llama.toml")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", type=Path, default=Path("runs/lm-study"))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--summarize", action="store_true",
                    help="only read the seeds' finished comparisons in --out (seeds run as separate processes)")
    a = ap.parse_args()

    from klas.config import load_config
    from klas.io import load_json, save_json
    from klas.pipeline import apply_run_settings, run_pipeline
    from klas.research.compare import Arm, arm_folder, compare, resolve_selection
    from klas.stages.s5_evaluation import EvaluationArtifact, save_text
    from klas_runtime.machine import machine_info

    seeds = [int(s) for s in a.seeds.split(",")]
    methods = a.methods.split(",")
    rows = []
    for seed in seeds:
        cfg = load_config(a.config, [f"run.seed={seed}"])
        apply_run_settings(cfg)
        base = a.out / f"seed{seed}"
        if a.summarize:
            res = load_json(base / "compare" / "compare.json")
            arms = [Arm(r["label"], Path(r["selection"])) for r in res["arms"]]
        else:
            print(f"[study] seed {seed}: probes, scores", flush=True)
            run_pipeline(cfg, base / "run", until="scores")
            arms = [Arm(*resolve_selection(m, base / "run", cfg.run.family)) for m in methods]
            res = compare(base / "compare", arms, cfg.finetune, replace(cfg.evaluation, latency=False), seed=seed,
                          family=cfg.run.family, before=False)
        for arm, r in zip(arms, res["arms"]):
            ev = EvaluationArtifact.load(arm_folder(base / "compare", r["label"]) / "evaluation")
            st = [c for c in ev.configs if not c["anchor"]]
            zoo = {z["key"] for z in ev.zoo}
            row = dict(seed=seed, method=arm.label, n_stitches=len(st), auc=ev.auc,
                       stitches=[c["key"] for c in st], admitted=sum(c["key"] in zoo for c in st))
            for k in ("test_perplexity", "test_rouge1", "test_rouge2", "test_rougeL"):
                row[f"mean_{k}"] = statistics.fmean(c[k] for c in st) if st else None
            rows.append(row)
            print(f"[study] seed {seed} {arm.label}: AUC {row['auc']:.5f}, ppl {row['mean_test_perplexity']:.2f}, "
                  f"R-1 {row['mean_test_rouge1']:.4f}, R-2 {row['mean_test_rouge2']:.4f}", flush=True)
    summary = {}
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        summary[m] = {k: _mean_sd([r[k] for r in mine]) for k in
                      ("auc", "mean_test_perplexity", "mean_test_rouge1", "mean_test_rouge2", "mean_test_rougeL",
                       "admitted")}
    cfg = load_config(a.config)
    out = dict(config=str(a.config), seeds=seeds, methods=methods, rows=rows, summary=summary,
               budget=dict(finetune=load_json(a.out / f"seed{seeds[0]}" / "compare" / "compare.json")["budget"]),
               family=cfg.run.family, command=" ".join(["python", "scripts/lm_selection_study.py"] + sys.argv[1:]),
               machine=machine_info())
    save_json(out, a.out / "study.json")
    lines = [f"{cfg.run.family}: {len(seeds)} seeds ({', '.join(map(str, seeds))}), "
             f"{rows[0]['n_stitches']} stitches per arm, {out['budget']['finetune']['steps']} finetuning steps each "
             f"(batch {out['budget']['finetune']['batch_size']}). Mean +- std over seeds; test split.", "",
             "| method | AUC (100/ppl vs FLOPs/token) | mean stitched test ppl | ROUGE-1 | ROUGE-2 | ROUGE-L | admitted |",
             "|---|---|---|---|---|---|---|"]
    for m in methods:
        s = summary[m]

        def f(k, d=4):
            mu, sd = s[k]
            return "-" if mu is None else f"{mu:.{d}f} +- {sd:.{d}f}"
        lines.append(f"| {m} | {f('auc', 5)} | {f('mean_test_perplexity', 2)} | {f('mean_test_rouge1')} | "
                     f"{f('mean_test_rouge2')} | {f('mean_test_rougeL')} | {f('admitted', 1)} |")
    save_text("\n".join(lines) + "\n", a.out / "study.md")
    print("\n".join(lines))
    print(f"-> {a.out / 'study.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
