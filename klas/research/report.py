"""``klas report RUN_DIR``: one self-contained ``report.html`` of a run that a person can open anywhere.

Every picture is embedded (base64 PNG), so the file can be mailed or attached to an issue without its run directory.
The report reads whatever the run has -- anchors, KL heatmaps, selection, finetuning, evaluation and the zoo as
shipped, method comparisons, the zoo manifest, stage timings, study results. A part the run does not have (a stage
not run yet, no comparison, no study asked for) is said so in one plain sentence; only a part the run names but
cannot be read is flagged: a partial run (say, probes and scores only) still gets a report, never an error.
"""
from __future__ import annotations

import base64
import html
import io
import json
import time
from functools import lru_cache
from pathlib import Path

from klas.errors import KlasError
from klas.io import atomic_path

CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222;line-height:1.4}
table{border-collapse:collapse;margin:.6em 0;font-size:13px}
td,th{border:1px solid #ccc;padding:2px 7px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%;border:1px solid #eee}
.missing{color:#a33;font-style:italic}.absent{color:#555}h2{border-bottom:2px solid #ddd;margin-top:1.6em}
code{background:#f5f5f5}"""


def _load(path: Path) -> dict | None:
    """JSON of an artifact, or None when absent or unreadable."""
    try:
        rec = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return rec if isinstance(rec, dict) else None


@lru_cache(maxsize=None)
def _record_paths() -> dict[str, Path]:
    """Each stage's artifact record, relative to the run directory (``<folder>/<record>``)."""
    from klas.stages import stage_modules

    return {m.NAME: Path(m.ARTIFACT.FOLDER or m.ARTIFACT.KIND) / m.ARTIFACT.RECORD for m in stage_modules()}


def _record(run: Path, stage: str) -> dict | None:
    return _load(run / _record_paths()[stage])


def _png(data: bytes, alt: str, caption: str) -> str:
    b64 = base64.b64encode(data).decode("ascii")
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">' \
           f"<figcaption>{caption}</figcaption></figure>"


def _img(path: Path, alt: str = "") -> str:
    if not path.is_file():
        return _missing(f"{path.name}: not found although the stage ran")
    return _png(path.read_bytes(), alt or path.name, f"<code>{html.escape(path.name)}</code>")


def _missing(what: str) -> str:
    """Something the run names but that cannot be read: flagged."""
    return f'<p class="missing">{html.escape(what)}</p>'


def _absent(sentence: str) -> str:
    """A part the run does not have (not run, not asked for): one plain sentence."""
    return f'<p class="absent">{sentence}</p>'


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.4e}"
    return html.escape(str(v))


def _table(head: list[str], rows: list[list]) -> str:
    h = "".join(f"<th>{html.escape(c)}</th>" for c in head)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{h}</tr>{body}</table>"


def _mflops(f) -> float | None:
    return None if f is None else f / 1e6


def _not_run(stage: str, command: str) -> str:
    return _absent(f"The {stage} stage has not run in this run directory (<code>{html.escape(command)}</code> runs "
                   f"it).")


# ------------------------------------------------------------------------------------------------------ sections
def run_dataset(run: Path, meta: dict | None) -> str | None:
    """The dataset the run used: as its stages recorded it (resolved), else ``run.json``'s, else the family's own
    (``run.json`` holds None when ``[data] dataset`` was left to the family)."""
    for stage in ("evaluation", "finetune", "probes"):
        rec = _record(run, stage)
        if rec and rec.get("dataset"):
            return rec["dataset"]
    if meta and meta.get("dataset"):
        return meta["dataset"]
    try:
        from klas.families import get_family_cfg

        return get_family_cfg(meta.get("family")).dataset if meta and meta.get("family") else None
    except KlasError:
        return None


def card_command(card: dict) -> str | None:
    """The command that trains the card's anchors again (``klas anchors train``), from the card's recipe."""
    r = card.get("recipe") or {}
    if card.get("family") and "epochs" in r and "seed" in r:
        return f"klas anchors train {card['family']} --epochs {r['epochs']} --seed {r['seed']}"
    cmd = card.get("command")
    return cmd.replace("klas zoo train", "klas anchors train") if isinstance(cmd, str) else None


def _anchors(run: Path, family: str | None) -> str:
    out = []
    card = None
    if family:
        try:
            from klas.families.trainer import load_card

            card = load_card(family)
        except KlasError:
            card = None
    if card:
        out.append(f"<p>Model card of <b>{html.escape(card.get('family', ''))}</b> on "
                   f"{html.escape(str(card.get('dataset')))}"
                   f"; trained with <code>{html.escape(str(card_command(card)))}</code>.</p>")
        out.append(_table(["anchor", "arch", "params", "MFLOPs", "test acc %", "val acc %"],
                          [[a["name"], a.get("arch"), a.get("params"), _mflops(a.get("flops")), a.get("test_acc"),
                            a.get("val_acc")] for a in card.get("anchors", [])]))
    else:
        out.append(_absent(f"The family {html.escape(str(family))} ships no model card (only embedded families do)."))
    scores = _record(run, "scores")
    if scores and scores.get("anchor_kl"):
        kl = scores["anchor_kl"]
        out.append("<p>KL divergence between the anchors' own softmax outputs (row || column), validation split:</p>")
        out.append(_table([""] + kl["names"], [[n] + row for n, row in zip(kl["names"], kl["matrix"])]))
    return "".join(out)


def _probes(run: Path) -> str:
    rec = _record(run, "probes")
    if rec is None:
        return _not_run("probes", "klas probe")
    acc = rec.get("final_val_acc", {})
    rows = [[a, len(v) if isinstance(v, list) else None, max(v) if isinstance(v, list) and v else v,
             (rec.get("head_val_acc") or {}).get(a)] for a, v in acc.items()]
    return (f"<p>{rec.get('n_train')} train / {rec.get('n_val')} val images, {_fmt(rec.get('wall_s'))} s.</p>"
            + _table(["anchor", "probes", "best probe val acc", "head val acc"], rows)
            + _img(run / "probes" / "probe_accuracy.png"))


def _heatmaps(run: Path) -> str:
    rec = _record(run, "scores")
    if rec is None:
        return _not_run("scores", "klas score")
    rows = [[f"{p['source']} -> {p['target']}", p.get("stitchable"), p.get("D_min"), p.get("D_max"),
             f"({p['best_score']['i']}, {p['best_score']['j']})" if p.get("best_score") else None,
             (p.get("diagonal") or {}).get("frac_within_1")] for p in rec.get("pairs", [])]
    head = (f"<p>Score form <code>{html.escape(str(rec.get('score_form')))}</code>, {rec.get('n_val')} validation "
            f"images, {_fmt(rec.get('wall_s'))} s; baseline metric tables: "
            f"{html.escape(', '.join(rec.get('metrics') or []) or 'none')}.</p>")
    tab = _table(["anchor pair", "stitchable", "D min", "D max", "best (i, j)", "argmin within 1 of diagonal"], rows)
    maps = [run / "scores" / f"heatmap_{p['source']}__{p['target']}.png" for p in rec.get("pairs", [])]
    return head + tab + "".join(_img(p) for p in maps)


def _selection(run: Path) -> str:
    rec = _record(run, "selection")
    if rec is None:
        return _not_run("selection", "klas select")
    p = rec.get("params", {})
    sel = sorted(rec.get("selected", []), key=lambda e: e.get("flops") or 0)
    rows = [[f"{e['source']} -> {e['target']}", e["i"], e["j"], _mflops(e.get("flops")), e.get("D"), e.get("score"),
             e.get("bucket")] for e in sel]
    others = sorted(q.name for q in (run / "selection" / "methods").glob("*") if q.is_dir())
    return (f"<p>Method <b>{html.escape(str(rec.get('method')))}</b>, tau {_fmt(p.get('tau'))}, "
            f"{_fmt(p.get('num_buckets'))} buckets, anchor pairs {html.escape(str(rec.get('anchor_pairs')))}: "
            f"{len(sel)} of {len(rec.get('candidates', []))} candidates selected. Other selections in the run: "
            f"{html.escape(', '.join(others) or 'none')}.</p>"
            + _table(["anchor pair", "i", "j", "MFLOPs", "D", "score", "bucket"], rows)
            + _img(run / "selection" / f"candidates-{rec.get('method')}.png"))


def _finetune(run: Path) -> str:
    rec = _record(run, "finetune")
    if rec is None:
        return _not_run("finetune", "klas finetune")
    keys = ("recipe", "steps", "steps_per_epoch", "images_seen", "wall_s")
    rows = [[k, rec.get(k)] for k in keys if k in rec]
    return _table(["field", "value"], rows) + _img(run / "finetune" / "training.png")


# --------------------------------------------------------------------------------------------- the zoo as shipped
def zoo_points(ev: dict) -> dict:
    """The zoo as shipped, from an evaluation record: the untouched anchors, the admitted configurations, the
    admitted cascades at their average and worst-case cost, and the candidates left out (configurations and cascades
    not in the zoo) -- (FLOPs, test metric, name) each; cascades (average FLOPs, worst FLOPs, metric, name)."""
    zoo = ev.get("zoo") or []
    keys = {z["key"] for z in zoo}
    return dict(
        anchors=[(u["flops"], u["test_acc"], u["key"]) for u in ev.get("untouched") or []],
        admitted=[(z["flops"], z["test_acc"], z["name"]) for z in zoo if z["kind"] == "configuration"],
        cascades=[(z["flops_avg"]["test"], z["flops"], z["test_acc"], z["name"]) for z in zoo
                  if z["kind"] == "cascade"],
        rejected=[(r["flops"], r["test_acc"], r["key"]) for r in ev.get("configs") or [] if r["key"] not in keys],
        rejected_cascades=[(c["flops_avg"]["test"], c["test_acc"], c["name"]) for c in ev.get("cascades") or []
                           if c["name"] not in keys])


def plot_zoo(pts: dict, title: str = "", metric: str = "accuracy"):
    """Test metric vs MFLOPs of the zoo as shipped (``zoo_points``): untouched anchors (stars, with their staircase),
    admitted models, each admitted cascade as two markers joined by a line (filled: average cost, hollow: worst case,
    both models run), the rejected candidates in grey. Returns the matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    m = 1e6
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    if pts["rejected_cascades"]:
        ax.scatter([f / m for f, _, _ in pts["rejected_cascades"]], [a for _, a, _ in pts["rejected_cascades"]], s=5,
                   color="0.85", label="rejected cascades (average cost)", zorder=1)
    if pts["rejected"]:
        ax.scatter([f / m for f, _, _ in pts["rejected"]], [a for _, a, _ in pts["rejected"]], s=16, color="0.65",
                   label="rejected configurations", zorder=2)
    an = sorted(pts["anchors"])
    if an:
        xs, best = [f / m for f, _, _ in an], []
        for _, a, _ in an:
            best.append(max(best[-1], a) if best else a)
        ax.step(xs + [xs[-1] * 1.15], best + [best[-1]], where="post", color="k", lw=1, ls="--",
                label="untouched anchors' staircase", zorder=3)
        ax.scatter(xs, [a for _, a, _ in an], marker="*", s=140, color="k", label="untouched anchors", zorder=5)
    if pts["admitted"]:
        ax.scatter([f / m for f, _, _ in pts["admitted"]], [a for _, a, _ in pts["admitted"]], s=40, color="tab:blue",
                   label="admitted stitched / finetuned", zorder=5)
    for k, (avg, worst, acc, _) in enumerate(pts["cascades"]):
        lab = {} if k else dict(label="admitted cascade: average cost (filled) to worst case (hollow)")
        ax.plot([avg / m, worst / m], [acc, acc], color="tab:red", lw=1.2, zorder=4, **lab)
        ax.scatter([avg / m], [acc], s=40, color="tab:red", zorder=6)
        ax.scatter([worst / m], [acc], s=40, facecolors="white", edgecolors="tab:red", zorder=6)
    ax.set_xscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel("MFLOPs per sample (cascades: average over the test split, and worst case)")
    ax.set_ylabel(f"test {metric} (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def _metric(family: str | None) -> str:
    """The name of the family's task metric (``klas.tasks``), for axis labels."""
    try:
        from klas.families import get_family_cfg
        from klas.tasks import task_of

        return task_of(get_family_cfg(family)).metric
    except KlasError:
        return "accuracy"


def _zoo_figure(ev: dict, run: Path) -> str:
    import matplotlib.pyplot as plt

    fig = plot_zoo(zoo_points(ev), f"{ev.get('family')}: the zoo as shipped (test {ev.get('n_test')}, decided on "
                   f"val {ev.get('n_val')})", metric=_metric(ev.get("family")))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return _png(buf.getvalue(), "the zoo as shipped: test metric vs FLOPs",
                f"The zoo as shipped (<code>klas report {html.escape(str(run))}</code>, from "
                f"<code>evaluation/evaluation.json</code>): untouched anchors, admitted models, admitted cascades at "
                f"average and worst-case cost; rejected candidates in grey.")


def _evaluation(run: Path) -> str:
    rec = _record(run, "evaluation")
    if rec is None:
        return _not_run("evaluation", "klas evaluate")
    rows = sorted(rec.get("configs", []), key=lambda r: r["flops"])
    in_zoo = {z["key"] for z in rec.get("zoo") or []}
    tab = _table(["configuration", "MFLOPs", "params", "val acc %", "test acc %", "latency ms", "Pareto", "in zoo"],
                 [[r["key"], _mflops(r["flops"]), r.get("params"), r.get("val_acc"), r["test_acc"],
                   r.get("latency_ms"), "yes" if r.get("pareto") else "", "yes" if r["key"] in in_zoo else ""]
                  for r in rows])
    zoo = sorted(rec.get("zoo") or [], key=lambda z: z["flops_avg"]["test"] if z["kind"] == "cascade" else z["flops"])
    zoo_tab = _table(["zoo member", "kind", "MFLOPs (worst)", "MFLOPs (average, test)", "val acc %", "test acc %"],
                     [[z["name"], z["kind"], _mflops(z["flops"]),
                       _mflops(z["flops_avg"]["test"]) if z["kind"] == "cascade" else None, z.get("val_acc"),
                       z.get("test_acc")] for z in zoo])
    head = (f"<p>{len(rows)} configurations on {rec.get('n_test')} test images; AUC {_fmt(rec.get('auc'))}, "
            f"{rec.get('n_pareto', sum(1 for r in rows if r.get('pareto')))} on the Pareto front. Zoo: "
            f"{len(zoo)} members, AUC {_fmt(rec.get('zoo_auc'))} (cascades at average cost) against the untouched "
            f"anchors' {_fmt(rec.get('anchors_auc'))}.</p>")
    return head + (_zoo_figure(rec, run) if zoo or rows else "") + zoo_tab + tab


def find_compares(run: Path, limit: int = 12) -> list[Path]:
    """compare.json files of method comparisons made inside the run (``klas compare --out RUN/...``, the study)."""
    found = sorted(run.glob("**/compare.json"))
    return found[:limit]


def _compare(run: Path) -> str:
    found = find_compares(run)
    if not found:
        return _absent("No method comparison was run in this run directory (<code>klas compare --out "
                       "RUN_DIR/...</code> or <code>klas study auc</code> makes one).")
    parts = []
    for path in found:
        rec = _load(path)
        if rec is None or "arms" not in rec:
            parts.append(_missing(f"{path}: unreadable"))
            continue
        b = rec.get("budget", {})
        parts.append(f"<h3>{html.escape(str(path.parent.relative_to(run)))}</h3><p>{b.get('steps')} steps (batch "
                     f"{b.get('batch_size')}) per arm, {rec.get('n_stitches')} stitches each.</p>")
        parts.append(_table(["arm", "method", "init", "AUC", "Pareto pts", "mean stitched acc", "best stitched acc"],
                            [[a["label"], a.get("method"), a.get("init"), a.get("auc"), a.get("n_pareto"),
                              a.get("mean_stitched_acc"), a.get("best_stitched_acc")] for a in rec["arms"]]))
        parts.append(_img(path.parent / "compare.png", "Pareto curves of every method"))
    return "".join(parts)


def _manifest(run: Path) -> str:
    rec = _record(run, "export")
    if rec is None:
        return _not_run("export", "klas export")
    rows = []
    for m in rec.get("models", []):
        lat = (m.get("latency") or [{}])[0]
        par = m.get("parity") or {}
        rows.append([m["name"], m.get("file"), m.get("params"), _mflops(m.get("flops")), m.get("test_acc"),
                     lat.get("p50_ms"), par.get("top1_agreement"), (m.get("sha256") or "")[:12]])
    return (f"<p>{len(rows)} ONNX models, schema {html.escape(str(rec.get('schema')))} "
            f"v{html.escape(str(rec.get('schema_version')))}, made {html.escape(str(rec.get('created')))}.</p>"
            + _table(["model", "file", "params", "MFLOPs", "test acc %", "p50 ms (b1)", "ORT top-1 agreement",
                      "sha256"], rows))


def stage_timings(run: Path) -> list[list]:
    """[stage, wall s, source, finished] per stage: ``stage.json`` (written by ``klas run``) where present, else the
    wall time the stage's own record holds, else "not run"."""
    rows = []
    for st, rel in _record_paths().items():
        rec = _load(run / st / "stage.json")
        if rec is not None:
            rows.append([st, rec.get("wall_s"), "stage.json", rec.get("finished")])
            continue
        own = _load(run / rel)
        if own is not None and isinstance(own.get("wall_s"), (int, float)):
            rows.append([st, own["wall_s"], f"{rel} (compute only)", None])
        else:
            rows.append([st, None, "not run" if own is None else f"{rel} (no wall time)", None])
    return rows


def _timings(run: Path) -> str:
    rows = stage_timings(run)
    total = sum(r[1] for r in rows if isinstance(r[1], (int, float)))
    return (_table(["stage", "wall s", "source", "finished"], rows)
            + f"<p>Total of the recorded stages: {total:.1f} s.</p>")


def _study(results: Path | None, family: str | None) -> str:
    if results is None:
        return _absent("No study was asked for (<code>klas report RUN_DIR --results DIR</code> includes the "
                       "<code>study_*.json</code> of DIR).")
    found = sorted(results.glob(f"study_*_{family}.json" if family else "study_*.json"))
    if not found:
        return _absent(f"No study results for this family in {html.escape(str(results))} (<code>klas study</code> "
                       f"makes them).")
    parts = []
    for path in found:
        rec = _load(path) or {}
        parts.append(f"<h3>{html.escape(path.stem)}</h3>")
        if rec.get("study") == "metric-outcome":
            parts.append(_table(["metric", "Pearson", "Spearman", "partial Spearman | FLOPs", "bucket Spearman"],
                                [[m, s["pearson"], s["spearman"], s["partial_spearman"], s["bucket_spearman"]]
                                 for m, s in rec.get("stats", {}).items()]))
        elif rec.get("study") == "auc":
            parts.append(_table(["method", "AUC mean", "std", "min", "max"],
                                [[m, s["mean"], s["std"], s["min"], s["max"]] for m, s in rec["summary"].items()]))
        parts.append(_img(path.with_suffix(".png")))
    return "".join(parts)


def build_report(run_dir: Path | str, extra: Path | str | None = None) -> str:
    """The HTML text of the report of ``run_dir`` (see the module docstring)."""
    run = Path(run_dir)
    if not run.is_dir():
        raise KlasError(f"{run}: no such run directory")
    meta = _load(run / "run.json")
    family = meta.get("family") if meta else None
    sections = [("Anchors", _anchors(run, family)), ("Probes", _probes(run)), ("KL heatmaps", _heatmaps(run)),
                ("Selected stitches", _selection(run)), ("Finetuning", _finetune(run)),
                ("Evaluation: the zoo, accuracy vs FLOPs", _evaluation(run)), ("Methods compared", _compare(run)),
                ("Zoo manifest", _manifest(run)), ("Stage timings", _timings(run)),
                ("Study", _study(Path(extra) if extra else None, family))]
    head = (f"<h1>klas report: {html.escape(str(family or 'unknown family'))}</h1><p>Run <code>{html.escape(str(run))}"
            f"</code>" + (f", dataset {html.escape(str(run_dataset(run, meta)))}, created "
                          f"{html.escape(str(meta.get('created')))}, klas {html.escape(str(meta.get('klas_version')))}"
                          if meta else " (no run.json)") + f"; report made {time.strftime('%Y-%m-%d %H:%M:%S')}.</p>")
    toc = "<ul>" + "".join(f'<li><a href="#s{k}">{html.escape(t)}</a></li>'
                           for k, (t, _) in enumerate(sections)) + "</ul>"
    body = "".join(f'<h2 id="s{k}">{html.escape(t)}</h2>{s}' for k, (t, s) in enumerate(sections))
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>klas report {html.escape(str(family))}</title>"
            f"<style>{CSS}</style></head><body>{head}{toc}{body}</body></html>\n")


def write_report(run_dir: Path | str, out: Path | str | None = None, extra: Path | str | None = None) -> Path:
    """Write ``report.html`` (default ``RUN_DIR/report.html``) atomically; returns its path."""
    path = Path(out) if out is not None else Path(run_dir) / "report.html"
    text = build_report(run_dir, extra)
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path
