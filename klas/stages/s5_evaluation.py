"""Evaluation of a finetuned run: every configuration's test quality (the task's metric: top-1 accuracy for
classifiers), FLOPs, parameters and CPU
latency; the accuracy-vs-FLOPs Pareto front; and the KLAS paper's summary metric, the area under the accuracy vs
normalized-FLOPs curve (App. B "Success Metric"; the exact definition is ours, see docs/evaluation.md):

    x(F) = (F - F_min) / (F_max - F_min)            F_min, F_max: FLOPs of the family's smallest and largest anchor
    A(x) = max { acc_k : x(F_k) <= x }  (0 if none) the Pareto staircase: best accuracy deployable within budget x
    AUC  = integral_0^1 A(x) dx                      accuracies as fractions, so AUC lies in [0, 1]

The staircase (not a trapezoid through the points) is what a deployment can actually get at a budget, it never
credits a method for accuracy between two configurations it does not have, and adding a configuration can only raise
it. The same function scores every method (``klas compare``).

Under torchrun the test split is sharded over the ranks and the per-configuration correct counts are summed (exact:
integers), so the accuracies equal the single-process ones; latency is measured by rank 0 alone (one timing process
per machine, as deployed) and only rank 0 writes.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from klas import distributed as kd
from klas.stages.s4_finetune import FinetuneArtifact
from klas_runtime.machine import machine_info
from klas.contract import Artifact, StageContext, setting
from klas.metrics import (AUC_DEFINITION, auc, cascade_outputs, cascade_thresholds, normalize_flops, pareto_mask,
                          sign_test, staircase)

# --- measurements -------------------------------------------------------------------------------------------------

@torch.inference_mode()
def measure_latency(net: torch.nn.Module, input_shape: tuple[int, ...] | torch.Tensor, batch: int = 1, warmup: int = 10,
                    repeats: int = 30, threads: int = 1) -> dict:
    """CPU latency of one forward pass: ``warmup`` untimed calls, then the median (and p10/p90) of ``repeats`` timed
    ones, with torch's intra-op threads fixed to ``threads`` (restored afterwards). ``input_shape``: a random float
    batch of that per-sample shape, or the input batch itself (token ids)."""
    prev = torch.get_num_threads()
    was = net.training
    net.eval()
    try:
        torch.set_num_threads(threads)
        x = input_shape if isinstance(input_shape, torch.Tensor) else \
            torch.randn(batch, *input_shape, generator=torch.Generator().manual_seed(0))
        for _ in range(warmup):
            net(x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            net(x)
            times.append((time.perf_counter() - t0) * 1e3)
    finally:
        torch.set_num_threads(prev)
        net.train(was)
    q = statistics.quantiles(times, n=10) if len(times) >= 2 else [times[0]] * 9
    return dict(median_ms=statistics.median(times), p10_ms=q[0], p90_ms=q[-1], batch=batch, threads=threads,
                warmup=warmup, repeats=repeats)


# --- the stage ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EvaluationConfig:
    """Every finetuned configuration on val and test: accuracy, FLOPs, params, CPU latency. Which configurations
    and cascades join the zoo is decided on val (a paired sign test against the untouched anchors); test accuracy is
    reported after that decision."""

    val_subset: int | None = setting(None, "decide admission on the first N val images", ge=1, none="all")
    test_subset: int | None = setting(None, "evaluate on the first N test images", ge=1, none="all")
    alpha: float = setting(0.05, "significance level of the admission test, Bonferroni-corrected over all "
                           "candidates", gt=0, le=0.5)
    cascades: bool = setting(True, "also consider max-softmax cascades of two zoo models")
    max_cascades: int = setting(2, "cascades kept in the zoo (the best on the val front)", ge=0)
    batch_size: int = setting(500, "test images per forward", ge=1, key=False)
    latency: bool = setting(True, "measure CPU latency (batch 1) of every configuration")
    latency_repeats: int = setting(30, "timed runs per configuration (median reported)", ge=1)
    threads: int = setting(1, "torch threads while timing", ge=1)
    generations: int = setting(48, "test prompts continued greedily and scored against their references (tasks "
                               "that generate: ROUGE; 0: off)", ge=0)
    new_tokens: int = setting(24, "tokens generated per prompt", ge=1)


@dataclass(frozen=True)
class EvaluationArtifact(Artifact):
    """``evaluation.json``: one row per configuration (key, config, anchor, flops, params, val_acc, test_acc,
    latency_ms, pareto on test, admission on val), the AUC and its definition; the user's untouched anchors
    (``untouched``); the cascade candidates; the ``zoo``: untouched anchors + admitted configurations and cascades
    (decided on val), with the zoo's and the untouched anchors' AUC on test. Plus a markdown table and a PNG."""

    KIND: ClassVar[str] = "evaluation"
    VERSION: ClassVar[int] = 2  # 2: the task is recorded
    RECORD: ClassVar[str] = "evaluation.json"
    family: str
    task: str
    dataset: str
    split: str
    n_test: int
    state: str
    flops_range: dict
    auc: float
    auc_definition: str
    n_pareto: int
    selection: dict | None
    configs: list
    n_val: int
    untouched: list
    zoo: list
    cascades: list
    admission: dict
    zoo_auc: float | None
    anchors_auc: float | None
    machine: dict
    world_size: int


def run(cfg: EvaluationConfig, ctx: StageContext) -> EvaluationArtifact:
    """Evaluate every configuration of the finetuned run on val and test; writes ``evaluation.json`` (the
    artifact), a markdown table and a PNG of the metric-vs-FLOPs curve into ``<run>/evaluation``.

    Research variants (``klas.research``) set ``ctx.hooks``: ``state="init"`` evaluates the stitch layers before
    finetuning (written to ``evaluation/init``, or ``hooks["out"]``), ``built_family`` hands in an already built family
    (needed for ``init`` of runs whose anchors were passed in).
    """
    from tqdm import tqdm

    from klas.stitched import load_stitched_models

    di = ctx.dist
    state, family, task = ctx.hooks.get("state", "final"), ctx.hooks.get("built_family"), ctx.task
    latency, latency_repeats, threads, batch_size = cfg.latency, cfg.latency_repeats, cfg.threads, cfg.batch_size
    out = ctx.hooks.get("out") or ctx.folder("evaluation") / ("" if state == "final" else state)
    out = Path(out)
    net, meta = load_stitched_models(ctx.run_dir, state, family=family, record=ctx.upstream(FinetuneArtifact))
    fam = family if family is not None else meta.family  # a name: the preprocessing, without building the anchors
    test = ctx.split("test", family=fam).subset(cfg.test_subset)
    val = ctx.split("val", family=fam).subset(cfg.val_subset)
    f_min, f_max = min(meta.anchor_flops.values()), max(meta.anchor_flops.values())
    rows, outputs = [], {}

    figures = {}

    def measured(key: str, model, same_as: str | None = None) -> dict:
        if same_as is not None:  # the same weights as an untouched anchor: measured once, as the library's model
            outputs[key] = outputs[same_as]
            return figures[same_as]
        outputs[key] = (predictions(task, model, val, batch_size), predictions(task, model, test, batch_size))
        extra = {f"{s}_{k}": v for s, (o, d) in (("val", (outputs[key][0], val)), ("test", (outputs[key][1], test)))
                 for k, v in task.report(o[0], d.labels).items()}
        figures[key] = dict(val_acc=task.score(outputs[key][0][0], val.labels),
                            test_acc=task.score(outputs[key][1][0], test.labels), **extra,
                            **task.extra_metrics(model, ctx, fam, cfg))
        return figures[key]

    anchors = untouched_anchors(meta, family) if state == "final" else None
    untouched = []
    for v in anchors or []:
        # NOTE: the library's own model (``original``: timm's, or Hugging Face's logits), not klas's block view
        untouched.append(dict(key=v.name, flops=v.flops, params=sum(p.numel() for p in v.model.parameters()),
                              flops_norm=normalize_flops(v.flops, f_min, f_max), **task.cost_fields(v),
                              **measured(f"untouched:{v.name}", v.original), weights=_weights_record(v)))
    by_name = {v.name: v for v in anchors or []}
    quiet = not ctx.progress or not di.is_main
    for k in tqdm(net.indices, desc=f"[evaluate] {len(net.indices)} configs", disable=quiet):
        sn = net.net(k)
        c = sn.config
        same = f"untouched:{c.source}" if c.is_anchor and _same_weights(sn.src, by_name.get(c.source)) else None
        row = dict(config=c.to_dict(), key=c.key, anchor=c.is_anchor, flops=sn.flops,
                   flops_norm=normalize_flops(sn.flops, f_min, f_max), params=sn.num_params, **task.cost_fields(sn),
                   **measured(c.key, sn, same))
        if latency and di.is_main:
            lat = measure_latency(sn, sn.src.example_input(1), repeats=latency_repeats, threads=threads)
            row.update(latency_ms=round(lat["median_ms"], 4), latency=lat)
        else:
            row["latency_ms"] = None
        rows.append(row)
    if di.distributed:  # rank 0 alone timed the configurations: everyone returns its rows
        rows = kd.broadcast_object(rows, what="evaluation rows")
    mask = pareto_mask([r["flops"] for r in rows], [r["test_acc"] for r in rows])
    for r, m in zip(rows, mask):
        r["pareto"] = m
    zoo, cascades, admission = build_zoo(task, rows, untouched, outputs, val.labels, test.labels, cfg)
    # cascades at their average cost (measured on test, where this figure is reported)
    zoo_auc = auc([z["flops_avg"]["test"] if z["kind"] == "cascade" else z["flops"] for z in zoo],
                  [z["test_acc"] for z in zoo], f_min, f_max) if zoo else None
    anchors_auc = auc([u["flops"] for u in untouched], [u["test_acc"] for u in untouched], f_min, f_max) \
        if untouched else None
    art = EvaluationArtifact(family=meta.family, task=task.name, dataset=meta.dataset, split="test", n_test=len(test),
                             state=state, flops_range=dict(min=f_min, max=f_max, anchors=meta.anchor_flops),
                             auc=auc([r["flops"] for r in rows], [r["test_acc"] for r in rows], f_min, f_max),
                             auc_definition=AUC_DEFINITION, n_pareto=sum(mask), selection=meta.selection,
                             configs=rows, n_val=len(val), untouched=untouched, zoo=zoo, cascades=cascades,
                             admission=admission, zoo_auc=zoo_auc, anchors_auc=anchors_auc, machine=machine_info(),
                             world_size=di.world)
    if di.is_main:
        out.mkdir(parents=True, exist_ok=True)
        art.save(out)
        save_text(markdown_table(rows), out / "evaluation.md")
        plot_curves({f"{(meta.selection or {}).get('method') or 'run'} ({state})": rows},
                    out / "evaluation.png", title=f"{meta.family}: test {task.metric} vs FLOPs (AUC {art.auc:.4f})")
    kd.barrier("evaluation artifacts")
    return art


# --- admission: which configurations and cascades join the zoo (decided on val) -------------------------------------

@torch.inference_mode()
def predictions(task, net: torch.nn.Module, data, batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """The task's (prediction, confidence) of every sample of ``data``, in split order."""
    from klas.data import batches

    was = net.training
    net.eval()
    preds, conf = [], []
    for x, y in batches(data, batch_size):
        k, c = task.predict(net(x), y)
        preds.append(k)
        conf.append(c)
    net.train(was)
    return torch.cat(preds), torch.cat(conf)


def untouched_anchors(meta, family=None):
    """The anchors exactly as the user gave them (a passed-in family, or the family rebuilt from its weights), or
    None when the run's anchors were passed in and not handed again (nothing to compare with)."""
    if family is not None:
        return list(family)
    if not meta.pretrained:
        return None
    from klas.families import create_family

    return list(create_family(meta.family, pretrained=True, weights=meta.weights, num_classes=meta.num_classes,
                              input_shape=tuple(meta.input_shape)))


def _same_weights(view, untouched) -> bool:
    """Whether a configuration's anchor ``view`` holds exactly the weights of the ``untouched`` anchor (the
    independent and frozen recipes keep them): then both are one network, measured once."""
    if untouched is None or getattr(view, "model", None) is None:
        return False
    mine, given = view.model.state_dict(), untouched.model.state_dict()
    return mine.keys() == given.keys() and all(
        mine[k].dtype == given[k].dtype and mine[k].shape == given[k].shape and torch.equal(mine[k], given[k])
        for k in mine)


def _weights_record(view) -> dict | None:
    """Where an untouched anchor's weights came from (file and sha256), for the export's bit-for-bit check."""
    from klas.families.user import file_sha256  # a file, or a model folder (every file in it)

    f = getattr(view, "weights_file", None)
    return None if f is None else dict(file=str(f), sha256=file_sha256(Path(f)))


def build_zoo(task, rows: list[dict], untouched: list[dict], outputs: dict, y_val: torch.Tensor, y_test: torch.Tensor,
              cfg: EvaluationConfig) -> tuple[list[dict], list[dict], dict]:
    """The zoo: every untouched anchor, plus the configurations and cascades that beat the best untouched anchor
    within their (average) FLOPs on val -- a paired sign test at ``cfg.alpha``, Bonferroni-corrected over every
    candidate considered -- and that no other zoo member dominates on val. Test accuracy is only reported.
    Returns (zoo members, cascade candidates, admission summary). Without untouched anchors (anchors passed in and
    not handed back) the zoo is the val Pareto front of the configurations."""
    if not untouched:
        front = pareto_mask([r["flops"] for r in rows], [r["val_acc"] for r in rows])
        return ([dict(kind="configuration", key=r["key"], name=r["key"], config=r["config"], flops=r["flops"],
                      val_acc=r["val_acc"], test_acc=r["test_acc"]) for r, m in zip(rows, front) if m], [],
                dict(rule="val Pareto front (no untouched anchors to compare with)"))
    correct = {k: task.quality(v[0][0], y_val) for k, v in outputs.items()}

    def reference(flops: float) -> dict | None:
        within = [u for u in untouched if u["flops"] <= flops]
        return max(within, key=lambda u: u["val_acc"]) if within else None

    def judge(cand_correct: torch.Tensor, flops: float) -> dict:
        ref = reference(flops)
        if ref is None:  # cheaper than every anchor: nothing to beat
            return dict(reference=None, only_candidate=None, only_reference=None, p_value=0.0)
        return dict(reference=ref["key"], **sign_test(cand_correct, correct[f"untouched:{ref['key']}"]))

    # Bonferroni over every candidate, alpha split in halves: the configurations, then the cascades of zoo members
    level = cfg.alpha / 2 / max(len(rows), 1)
    for r in rows:
        r["admission"] = judge(correct[r["key"]], r["flops"])
        r["admitted"] = r["admission"]["p_value"] < level
    zoo = [dict(kind="anchor", key=f"untouched:{u['key']}", name=u["key"], config=dict(source=u["key"], i=-1,
                target=u["key"], j=-1), flops=u["flops"], val_acc=u["val_acc"], test_acc=u["test_acc"])
           for u in untouched]
    admitted = [dict(kind="configuration", key=r["key"], name=r["key"] if not r["anchor"] else f"{r['key']}.finetuned",
                     config=r["config"], flops=r["flops"], val_acc=r["val_acc"], test_acc=r["test_acc"])
                for r in rows if r["admitted"]]
    # admitted configurations that another member dominates on val are never worth picking: left out
    pool = zoo + admitted
    front = pareto_mask([m["flops"] for m in pool], [m["val_acc"] for m in pool])
    zoo += [m for m, keep in zip(admitted, front[len(zoo):]) if keep]
    cascades = _cascade_candidates(task, zoo, outputs, y_val, y_test) if cfg.cascades and task.cascades else []
    level_c = cfg.alpha / 2 / max(len(cascades), 1)
    for c in cascades:
        c["admission"] = judge(c.pop("_correct"), c["flops_avg"]["val"])
        c["admitted"] = c["admission"]["p_value"] < level_c
    ok = [c for c in cascades if c["admitted"]]
    ok_front = pareto_mask([c["flops_avg"]["val"] for c in ok], [c["val_acc"] for c in ok]) if ok else []
    best = sorted((c for c, keep in zip(ok, ok_front) if keep), key=lambda c: c["admission"]["p_value"])
    zoo += [dict(c, key=c["name"]) for c in best[:cfg.max_cascades]]
    for z in zoo:
        z.pop("admission", None), z.pop("admitted", None)
    return zoo, cascades, dict(rule="paired one-sided sign test on val against the best untouched anchor within the "
                               "candidate's (average) FLOPs; Bonferroni: alpha/2 over the configurations, alpha/2 over "
                               "the cascades", alpha=cfg.alpha, configurations=len(rows), level=level,
                               cascades=len(cascades), level_cascades=level_c,
                               admitted=sum(r["admitted"] for r in rows), admitted_cascades=len(ok))


def _cascade_candidates(task, members: list[dict], outputs: dict, y_val: torch.Tensor, y_test: torch.Tensor) -> list[dict]:
    """Every (cheaper, more accurate on val) pair of zoo members at thresholds = the 5 %, 10 %, ..., 95 % quantiles
    of the cheaper one's val confidence."""
    out = []
    pool = sorted((m for m in members if m["kind"] != "cascade"), key=lambda m: m["flops"])
    for a, sm in enumerate(pool):
        for lg in pool[a + 1:]:
            if lg["flops"] <= sm["flops"] or lg["val_acc"] <= sm["val_acc"]:
                continue
            (vs, ts), (vl, tl) = outputs[sm["key"]], outputs[lg["key"]]
            for t in cascade_thresholds(vs[1]):
                pv, dv = cascade_outputs(vs, vl, t)
                pt, dt = cascade_outputs(ts, tl, t)
                dvm, dtm = float(dv.double().mean()), float(dt.double().mean())
                out.append(dict(kind="cascade", name=f"{sm['name']}>{lg['name']}@{t:.4f}",
                                members=[sm["name"], lg["name"]], threshold=t, flops=sm["flops"] + lg["flops"],
                                flops_avg=dict(val=sm["flops"] + dvm * lg["flops"], test=sm["flops"] + dtm * lg["flops"]),
                                deferral=dict(val=dvm, test=dtm), val_acc=task.score(pv, y_val),
                                test_acc=task.score(pt, y_test), _correct=task.quality(pv, y_val)))
    return out


def save_text(text: str, path: Path) -> None:
    from klas.io import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(text)


def markdown_table(rows: list[dict]) -> str:
    """The configurations as a markdown table, cheapest first; Pareto configurations marked."""
    lines = ["| configuration | MFLOPs | params (K) | test acc (%) | latency (ms) | Pareto |",
             "|---|---:|---:|---:|---:|:---:|"]
    for r in sorted(rows, key=lambda r: r["flops"]):
        lat = "-" if r.get("latency_ms") is None else f"{r['latency_ms']:.3f}"
        lines.append(f"| {r['key']} | {r['flops'] / 1e6:.2f} | {r['params'] / 1e3:.1f} | {r['test_acc']:.2f} | {lat} "
                     f"| {'*' if r['pareto'] else ''} |")
    return "\n".join(lines) + "\n"


def plot_curves(curves: dict[str, list[dict]], path: Path, title: str = "") -> None:
    """Accuracy vs normalized FLOPs: every configuration as a point (anchors as stars) and each curve's Pareto
    staircase -- the function the AUC integrates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from klas.io import atomic_path

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for n, (label, rows) in enumerate(curves.items()):
        color = f"C{n % 10}"
        xs = [min(max(r["flops_norm"], 0.0), 1.0) for r in rows]
        acc = [r["test_acc"] for r in rows]
        stitched = [k for k, r in enumerate(rows) if not r["anchor"]]
        anchors = [k for k, r in enumerate(rows) if r["anchor"]]
        ax.scatter([xs[k] for k in stitched], [acc[k] for k in stitched], s=14, color=color, alpha=0.6)
        ax.scatter([xs[k] for k in anchors], [acc[k] for k in anchors], s=90, marker="*", color=color,
                   edgecolors="black", linewidths=0.5, zorder=3)
        grid = sorted(set(xs) | {1.0})
        ax.step(grid, [staircase(xs, acc, g) for g in grid], where="post", color=color, lw=1.5, label=label)
    ax.set_xlabel("normalized FLOPs (smallest anchor = 0, largest = 1)")
    ax.set_ylabel("top-1 test accuracy (%)")
    lo = min((r["test_acc"] for rows in curves.values() for r in rows), default=0.0)
    ax.set_ylim(bottom=max(0.0, lo - 5))
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


# --- the stage contract ---------------------------------------------------------------------------------------------
NAME, CONFIG, ARTIFACT, AFTER = "evaluation", EvaluationConfig, EvaluationArtifact, ("finetune",)
DESCRIBE = "test accuracy, FLOPs, params, latency; Pareto front"


def summary(art: EvaluationArtifact) -> dict:
    kinds = [z["kind"] for z in art.zoo]
    return dict(configurations=len(art.configs), zoo=len(art.zoo), zoo_configurations=kinds.count("configuration"),
                zoo_cascades=kinds.count("cascade"), zoo_auc=art.zoo_auc, anchors_auc=art.anchors_auc)
