"""Which lens should the language-model probes be? Training cost of each kind, and how well its stitch score ranks
the stitched models' quality after finetuning.

    python scripts/lm_lens_study.py --finetuned runs/lm-study/seed0       # after scripts/lm_selection_study.py
    python scripts/lm_lens_study.py CONFIG.toml --finetuned DIR --lenses tuned,logit --out runs/lm-lens

Per lens kind (``[probes] lens``: tuned, lowrank, logit): the probes and scores stages of the config (seed 0) in
their own run folder, the probes' wall time and final val 100/perplexity per anchor. Then every stitched model
finetuned under ``--finetuned`` (the evaluation records below it: each finetuned stitch with its test perplexity,
from the same recipe and budget) is looked up in each lens's stitch-score table S (low = promising), and the rank
correlation (Spearman) between S and the test perplexity is reported: +1 means the score orders the finetuned
models exactly as their quality does. Writes ``lenses.json`` and ``lenses.md`` in ``--out``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", nargs="?", type=Path, default=Path(__file__).parents[1] / "klas/configs/pydoc-llama.toml")
    ap.add_argument("--finetuned", type=Path, required=True, help="a folder holding evaluation/evaluation.json files")
    ap.add_argument("--lenses", default="tuned,lowrank,logit")
    ap.add_argument("--out", type=Path, default=Path("runs/lm-lens"))
    a = ap.parse_args()

    from scipy.stats import spearmanr

    from klas.config import load_config
    from klas.io import load_json, save_json
    from klas.pipeline import apply_run_settings, run_pipeline
    from klas.stages.s1_probes import ProbesArtifact
    from klas.stages.s2_scores import ScoresArtifact
    from klas.stages.s5_evaluation import save_text
    from klas_runtime.machine import machine_info

    runs = {}
    for lens in a.lenses.split(","):
        cfg = load_config(a.config, [f"probes.lens={lens}", "run.seed=0"])
        apply_run_settings(cfg)
        runs[lens] = a.out / lens
        print(f"[lenses] {lens}: probes, scores", flush=True)
        run_pipeline(cfg, runs[lens], until="scores")
    ft = {}
    for f in sorted(a.finetuned.rglob("evaluation/evaluation.json")):
        for r in load_json(f)["configs"]:
            if not r["anchor"]:
                ft.setdefault(r["key"], []).append((r["config"], r["test_perplexity"]))
    if len(ft) < 3:
        raise SystemExit(f"{a.finetuned}: {len(ft)} finetuned stitched models found; need >= 3")
    models = {k: (v[0][0], sum(p for _, p in v) / len(v)) for k, v in ft.items()}  # mean over repeats of a stitch
    rows = []
    for lens, run in runs.items():
        pr = ProbesArtifact.load(run / "probes")
        s, _ = ScoresArtifact.tensors(run / "scores")
        scores, ppl = [], []
        for key, (c, p) in models.items():
            t = s.get(f"S/{c['source']}/{c['target']}")
            if t is None:
                continue
            scores.append(float(t[c["i"], c["j"]]))
            ppl.append(p)
        rho = spearmanr(scores, ppl).statistic if len(scores) >= 3 else None
        rows.append(dict(lens=lens, probe_wall_s=pr.wall_s, probe_val_score={k: sum(v) / len(v) for k, v in pr.final_val_acc.items()},
                         head_val_score=pr.head_val_acc, n_models=len(scores), spearman_score_vs_test_ppl=rho))
        print(f"[lenses] {lens}: probes {pr.wall_s:.0f}s, Spearman {rho}", flush=True)
    save_json(dict(config=str(a.config), finetuned=str(a.finetuned), models={k: v[1] for k, v in models.items()},
                   rows=rows, command=" ".join(["python", "scripts/lm_lens_study.py"] + sys.argv[1:]),
                   machine=machine_info()), a.out / "lenses.json")
    lines = ["| lens | probe training (s) | mean lens val 100/ppl per anchor (over its layers) | Spearman(S, test ppl) over "
             f"{rows[0]['n_models']} finetuned stitches |", "|---|---|---|---|"]
    for r in rows:
        sc = ", ".join(f"{k}: {v:.3f}" for k, v in r["probe_val_score"].items())
        rho = "-" if r["spearman_score_vs_test_ppl"] is None else f"{r['spearman_score_vs_test_ppl']:+.3f}"
        lines.append(f"| {r['lens']} | {r['probe_wall_s']:.0f} | {sc} | {rho} |")
    save_text("\n".join(lines) + "\n", a.out / "lenses.md")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
