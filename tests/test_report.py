"""``klas report``: a self-contained HTML page from a synthetic run (random values, real PNGs); the parts a run does
not have said so in one plain sentence; the run's dataset and the model card's command; the zoo as shipped in the
accuracy-vs-FLOPs figure; and the CLI path."""
import base64
import re

import pytest
import torch

from klas.cli import main
from klas.errors import KlasError
from klas.io import save_json
from klas.research.report import build_report, plot_zoo, stage_timings, write_report, zoo_points


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
    # parts the synthetic run lacks: one plain sentence each, nothing flagged
    for stage, cmd in (("probes", "klas probe"), ("finetune", "klas finetune"), ("export", "klas export")):
        assert f"The {stage} stage has not run in this run directory (<code>{cmd}</code> runs it)." in text
    assert "No study was asked for" in text and re.findall(r"<p class=.missing.>[^<]*", text) == []
    rows = {r[0]: r for r in stage_timings(run)}
    assert rows["scores"][1] == walls["scores"] and rows["export"][2] == "not run"


def test_report_of_an_empty_run_says_what_is_absent_not_an_error(tmp_path):
    save_json(dict(family="no-such-family"), tmp_path / "run.json")
    text = build_report(tmp_path)
    assert text.count('class="absent"') >= 9 and 'class="missing"' not in text
    assert "The family no-such-family ships no model card" in text
    assert "No method comparison was run in this run directory" in text
    with pytest.raises(KlasError, match="no such run directory"):
        build_report(tmp_path / "nope")


def test_a_part_the_run_names_but_cannot_read_is_flagged(synthetic_run):
    run = synthetic_run[0]
    (run / "scores" / "heatmap_a__b.png").unlink()
    (run / "cmp" / "compare.json").write_text("{not json")
    text = build_report(run)
    assert text.count('class="missing"') == 2
    assert "heatmap_a__b.png: not found although the stage ran" in text and "compare.json: unreadable" in text


def test_report_names_the_runs_dataset_and_the_anchors_command(tmp_path):
    # the pipeline writes dataset None into run.json when [data] leaves it to the family
    save_json(dict(family="fmnist-deit", dataset=None, klas_version="0", created="now"), tmp_path / "run.json")
    text = build_report(tmp_path)
    assert "dataset fashion-mnist," in text and "dataset None" not in text
    assert "<code>klas anchors train fmnist-deit --epochs 20 --seed 0</code>" in text and "klas zoo train" not in text
    save_json(dict(dataset="cifar100", configs=[], zoo=[]), tmp_path / "evaluation" / "evaluation.json")
    assert "dataset cifar100," in build_report(tmp_path)  # what the stages recorded comes first


def _zoo_record():
    """An evaluation record: two untouched anchors, three configurations (one admitted), two cascade candidates (one
    admitted)."""
    cas = [dict(kind="cascade", name=f"a>b@0.{k}", flops=5e6, flops_avg=dict(val=2e6 + k, test=2.5e6 + k * 1e5),
                val_acc=80.0 + k, test_acc=79.0 + k) for k in (1, 2)]
    return dict(
        family="fmnist-deit", n_test=100, n_val=50,
        untouched=[dict(key="a", flops=1e6, test_acc=70.0), dict(key="b", flops=4e6, test_acc=85.0)],
        configs=[dict(key=f"s{k}", anchor=False, flops=(k + 1.5) * 1e6, test_acc=72.0 + k, val_acc=71.0 + k)
                 for k in range(3)],
        cascades=cas,
        zoo=[dict(kind="anchor", key="untouched:a", name="a", flops=1e6, test_acc=70.0),
             dict(kind="anchor", key="untouched:b", name="b", flops=4e6, test_acc=85.0),
             dict(kind="configuration", key="s1", name="s1", flops=2.5e6, test_acc=73.0),
             dict(cas[1], key=cas[1]["name"])])


def test_zoo_figure_shows_the_zoo_as_shipped():
    pts = zoo_points(_zoo_record())
    assert pts["anchors"] == [(1e6, 70.0, "a"), (4e6, 85.0, "b")]
    assert pts["admitted"] == [(2.5e6, 73.0, "s1")]
    assert pts["cascades"] == [(2.7e6, 5e6, 81.0, "a>b@0.2")]  # average (test) and worst-case cost
    assert [r[2] for r in pts["rejected"]] == ["s0", "s2"] and [r[2] for r in pts["rejected_cascades"]] == ["a>b@0.1"]
    fig = plot_zoo(pts)
    ax = fig.axes[0]
    by_label = {c.get_label(): c for c in ax.collections}
    assert {tuple(o) for o in by_label["untouched anchors"].get_offsets()} == {(1.0, 70.0), (4.0, 85.0)}
    assert {tuple(o) for o in by_label["admitted stitched / finetuned"].get_offsets()} == {(2.5, 73.0)}
    grey = by_label["rejected configurations"]
    assert {tuple(o) for o in grey.get_offsets()} == {(1.5, 72.0), (3.5, 74.0)}
    r, g, b, _ = grey.get_facecolor()[0]
    assert r == g == b  # greyed
    (line,) = [ln for ln in ax.lines if ln.get_label().startswith("admitted cascade")]
    assert list(line.get_xdata()) == pytest.approx([2.7, 5.0]) and list(line.get_ydata()) == [81.0, 81.0]
    ends = {tuple(o) for c in ax.collections if c.get_label().startswith("_") for o in c.get_offsets()}
    assert {(2.7, 81.0), (5.0, 81.0)} <= ends  # the two markers the line joins
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_report_embeds_the_zoo_figure(tmp_path):
    save_json(dict(family="fmnist-deit", dataset="fashion-mnist"), tmp_path / "run.json")
    save_json(dict(_zoo_record(), auc=0.5, zoo_auc=0.6, anchors_auc=0.55), tmp_path / "evaluation" / "evaluation.json")
    text = build_report(tmp_path)
    assert '<img alt="the zoo as shipped: test metric vs FLOPs" src="data:image/png;base64,' in text
    assert "admitted cascades at average and worst-case cost" in text and "a&gt;b@0.2" in text


def test_report_cli(synthetic_run, tmp_path, capsys):
    run = synthetic_run[0]
    assert main(["report", str(run)]) == 0
    assert (run / "report.html").is_file() and "report.html" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "absent")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "absent" in err[0]
