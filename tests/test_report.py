"""``klas report``: a self-contained HTML page from a synthetic run (random values, real PNGs), with missing parts
shown as missing, and the CLI path."""
import base64
import re

import pytest
import torch

from klas.cli import main
from klas.errors import KlasError
from klas.io import save_json
from klas.research.report import build_report, stage_timings, write_report


def _png(path, seed):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1, 1))
    ax.imshow(torch.rand(3, 3, generator=torch.Generator().manual_seed(seed)).numpy())
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path.read_bytes()


@pytest.fixture
def synthetic_run(tmp_path):
    g = torch.Generator()
    g.seed()
    r = lambda: round(float(torch.rand((), generator=g)) * 100, 3)  # noqa: E731
    run = tmp_path / "run"
    save_json(dict(family="fmnist-deit", dataset="fashion-mnist", klas_version="0.1.0", created="now"),
              run / "run.json")
    walls = {st: r() for st in ("probes", "scores", "selection", "evaluation")}
    for st, w in walls.items():
        save_json(dict(stage=st, wall_s=w, finished="t"), run / st / "stage.json")
    kl = [[0.0, r()], [r(), 0.0]]
    save_json(dict(score_form="ratio", n_val=77, wall_s=walls["scores"], anchor_kl=dict(names=["a", "b"], matrix=kl),
                   pairs=[dict(source="a", target="b", stitchable=9, D_min=r(), D_max=r(),
                               best_score=dict(i=1, j=2), diagonal=dict(frac_within_1=0.5))]),
              run / "scores" / "scores.json")
    pngs = {"heat": _png(run / "scores" / "heatmap_a__b.png", 1),
            "cand": _png(run / "selection" / "candidates-klas.png", 2), "cmp": _png(run / "cmp" / "compare.png", 3)}
    sel = [dict(source="a", target="b", i=k, j=k + 1, flops=(k + 1) * 1e6, D=r(), score=r(), bucket=k)
           for k in range(3)]
    save_json(dict(method="klas", params=dict(tau=0.05, num_buckets=3), anchor_pairs=[["a", "b"]], selected=sel,
                   candidates=sel * 2), run / "selection" / "selection.json")
    evals = [dict(key=f"cfg{k}", anchor=k == 0, flops=k * 1e6 + 1, params=k, test_acc=r(), pareto=k % 2 == 0)
             for k in range(4)]
    save_json(dict(configs=evals, n_test=123, auc=0.777), run / "evaluation" / "evaluation.json")
    arms = [dict(label=m, method=m, init="ls", auc=r(), n_pareto=3, mean_stitched_acc=r(), best_stitched_acc=r())
            for m in ("klas", "min-kl")]
    save_json(dict(budget=dict(steps=55, batch_size=8), n_stitches=4, arms=arms), run / "cmp" / "compare.json")
    return run, walls, kl, sel, evals, arms, pngs


def test_report_shows_every_part_and_embeds_images(synthetic_run, tmp_path):
    run, walls, kl, sel, evals, arms, pngs = synthetic_run
    out = write_report(run, tmp_path / "r.html")
    text = out.read_text()
    assert "<img" in text and not re.search(r'src="(?!data:image/png;base64,)', text)  # self-contained
    embedded = [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([^"]+)"', text)]
    for b in pngs.values():
        assert b in embedded
    for v in list(walls.values()) + [kl[0][1], kl[1][0]] + [e["D"] for e in sel] + [a["auc"] for a in arms]:
        assert f"{v:.4g}" in text
    for e in evals:
        assert e["key"] in text
    assert "55 steps" in text and "min-kl" in text
    # parts the synthetic run lacks are shown as missing
    for part in ("probes: missing", "finetune: missing", "zoo manifest: missing"):
        assert part in text
    rows = {r[0]: r for r in stage_timings(run)}
    assert rows["scores"][1] == walls["scores"] and rows["export"][2] == "missing"


def test_report_of_an_empty_run_is_all_missing_not_an_error(tmp_path):
    save_json(dict(family="no-such-family"), tmp_path / "run.json")
    text = build_report(tmp_path)
    assert text.count('class="missing"') >= 8
    with pytest.raises(KlasError, match="no such run directory"):
        build_report(tmp_path / "nope")


def test_report_cli(synthetic_run, tmp_path, capsys):
    run = synthetic_run[0]
    assert main(["report", str(run)]) == 0
    assert (run / "report.html").is_file() and "report.html" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "absent")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "absent" in err[0]
