"""``klas report RUN_DIR``: one self-contained ``report.html`` of a run that a person can open anywhere.

Every picture is embedded (base64 PNG), so the file can be mailed or attached to an issue without its run directory.
The report reads whatever the run has -- anchors, KL heatmaps, selection, supernet, evaluation, method comparisons,
the zoo manifest, stage timings, study results -- and shows each missing part as *missing*: a partial run (say,
probes and scores only) still gets a report, never an error.
"""
from __future__ import annotations

import base64
import html
import json
import time
from pathlib import Path

from klas.errors import KlasError
from klas.io import atomic_path

from klas.stages import STAGES as STAGE_ORDER
CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222;line-height:1.4}
table{border-collapse:collapse;margin:.6em 0;font-size:13px}
td,th{border:1px solid #ccc;padding:2px 7px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%;border:1px solid #eee}
.missing{color:#a33;font-style:italic}h2{border-bottom:2px solid #ddd;margin-top:1.6em}code{background:#f5f5f5}"""


def _load(path: Path) -> dict | None:
    """JSON of an artifact, or None when absent or unreadable (the report shows it as missing)."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _img(path: Path, alt: str = "") -> str:
    if not path.is_file():
        return _missing(f"{path.name} (missing)")
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<figure><img alt="{html.escape(alt or path.name)}" src="data:image/png;base64,{data}">' \
           f"<figcaption><code>{html.escape(path.name)}</code></figcaption></figure>"


def _missing(what: str) -> str:
    return f'<p class="missing">{html.escape(what)}</p>'


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


# ------------------------------------------------------------------------------------------------------ sections
def _anchors(run: Path, family: str | None) -> str:
    out = []
    card = None
    if family:
        try:
            from klas.families import get_family_cfg
            from klas.families._registry import _EMBEDDED_WEIGHTS

            if get_family_cfg(family).embedded:
                card = _load(_EMBEDDED_WEIGHTS / "card.json")
        except KlasError:
            card = None
    if card:
        out.append(f"<p>Model card of <b>{html.escape(card.get('family', ''))}</b> on "
                   f"{html.escape(str(card.get('dataset')))}"
                   f"; trained with <code>{html.escape(str(card.get('command', '')))}</code>.</p>")
        out.append(_table(["anchor", "arch", "params", "MFLOPs", "test acc %", "val acc %"],
                          [[a["name"], a.get("arch"), a.get("params"), _mflops(a.get("flops")), a.get("test_acc"),
                            a.get("val_acc")] for a in card.get("anchors", [])]))
    else:
        out.append(_missing("model card: missing (family without embedded weights, or no card.json)"))
    scores = _load(run / "scores" / "scores.json")
    if scores and scores.get("anchor_kl"):
        kl = scores["anchor_kl"]
        out.append("<p>KL divergence between the anchors' own softmax outputs (row || column), validation split:</p>")
        out.append(_table([""] + kl["names"], [[n] + row for n, row in zip(kl["names"], kl["matrix"])]))
    return "".join(out)


def _probes(run: Path) -> str:
    rec = _load(run / "probes" / "probes.json")
    if rec is None:
        return _missing("probes: missing (run `klas probe` or `klas run`)")
    acc = rec.get("final_val_acc", {})
    rows = [[a, len(v) if isinstance(v, list) else None, max(v) if isinstance(v, list) and v else v,
             (rec.get("head_val_acc") or {}).get(a)] for a, v in acc.items()]
    return (f"<p>{rec.get('n_train')} train / {rec.get('n_val')} val images, {_fmt(rec.get('wall_s'))} s.</p>"
            + _table(["anchor", "probes", "best probe val acc", "head val acc"], rows)
            + _img(run / "probes" / "probe_accuracy.png"))


def _heatmaps(run: Path) -> str:
    maps = sorted((run / "scores").glob("heatmap_*.png")) if (run / "scores").is_dir() else []
    if not maps:
        return _missing("KL heatmaps: missing (run `klas score`)")
    rec = _load(run / "scores" / "scores.json") or {}
    rows = [[f"{p['source']} -> {p['target']}", p.get("stitchable"), p.get("D_min"), p.get("D_max"),
             f"({p['best_score']['i']}, {p['best_score']['j']})" if p.get("best_score") else None,
             (p.get("diagonal") or {}).get("frac_within_1")] for p in rec.get("pairs", [])]
    head = (f"<p>Score form <code>{html.escape(str(rec.get('score_form')))}</code>, {rec.get('n_val')} validation "
            f"images, {_fmt(rec.get('wall_s'))} s.</p>")
    tab = _table(["anchor pair", "stitchable", "D min", "D max", "best (i, j)", "argmin within 1 of diagonal"], rows)
    return head + tab + "".join(_img(p) for p in maps)


def _selection(run: Path) -> str:
    rec = _load(run / "selection" / "selection.json")
    if rec is None:
        return _missing("selection: missing (run `klas select`)")
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


def _supernet(run: Path) -> str:
    rec = _load(run / "finetune" / "supernet.json")
    if rec is None:
        return _missing("finetune: missing (run `klas finetune`)")
    keys = ("steps", "epochs", "steps_per_epoch", "wall_s")
    rows = [[k, rec.get(k)] for k in keys if k in rec]
    return _table(["field", "value"], rows) + _img(run / "finetune" / "training.png")


def _evaluation(run: Path) -> str:
    rec = _load(run / "evaluation" / "evaluation.json")
    if rec is None:
        return _missing("evaluation: missing (run `klas evaluate`)")
    rows = sorted(rec.get("configs", []), key=lambda r: r["flops"])
    tab = _table(["configuration", "MFLOPs", "params", "test acc %", "latency ms", "Pareto"],
                 [[r["key"], _mflops(r["flops"]), r.get("params"), r["test_acc"], r.get("latency_ms"),
                   "yes" if r.get("pareto") else ""] for r in rows])
    return (f"<p>{len(rows)} configurations on {rec.get('n_test')} test images; AUC {_fmt(rec.get('auc'))}, "
            f"{rec.get('n_pareto', sum(1 for r in rows if r.get('pareto')))} on the Pareto front.</p>" + tab
            + _img(run / "evaluation" / "evaluation.png"))


def find_compares(run: Path, limit: int = 12) -> list[Path]:
    """compare.json files of method comparisons made inside the run (``klas compare --out RUN/...``, the study)."""
    found = sorted(run.glob("**/compare.json"))
    return found[:limit]


def _compare(run: Path) -> str:
    found = find_compares(run)
    if not found:
        return _missing("method comparison: missing (run `klas compare` with --out inside the run, "
                        "or `klas study auc`)")
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
    rec = _load(run / "zoo" / "manifest.json")
    if rec is None:
        return _missing("zoo manifest: missing (run `klas export`)")
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
    wall time the stage's own record holds, else missing."""
    fallbacks = {"probes": "probes/probes.json", "scores": "scores/scores.json", "finetune": "finetune/supernet.json"}
    rows = []
    for st in STAGE_ORDER:
        rec = _load(run / st / "stage.json")
        if rec is not None:
            rows.append([st, rec.get("wall_s"), "stage.json", rec.get("finished")])
            continue
        fb = _load(run / fallbacks[st]) if st in fallbacks else None
        if fb is not None and fb.get("wall_s") is not None:
            rows.append([st, fb["wall_s"], fallbacks[st] + " (compute only)", None])
        else:
            rows.append([st, None, "missing", None])
    return rows


def _timings(run: Path) -> str:
    rows = stage_timings(run)
    total = sum(r[1] for r in rows if isinstance(r[1], (int, float)))
    return (_table(["stage", "wall s", "source", "finished"], rows)
            + f"<p>Total of the recorded stages: {total:.1f} s.</p>")


def _study(results: Path | None, family: str | None) -> str:
    if results is None:
        return _missing("study results: not requested (pass --results benchmarks/results)")
    found = sorted(results.glob(f"study_*_{family}.json" if family else "study_*.json"))
    if not found:
        return _missing(f"study results: none in {results}")
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
                ("Selected stitches", _selection(run)), ("Supernetwork", _supernet(run)),
                ("Evaluation: accuracy vs FLOPs", _evaluation(run)), ("Methods compared", _compare(run)),
                ("Zoo manifest", _manifest(run)), ("Stage timings", _timings(run)),
                ("Study", _study(Path(extra) if extra else None, family))]
    head = (f"<h1>klas report: {html.escape(str(family or 'unknown family'))}</h1><p>Run <code>{html.escape(str(run))}"
            f"</code>" + (f", dataset {html.escape(str(meta.get('dataset')))}, created "
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
