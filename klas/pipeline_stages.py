"""The stages of ``klas run``, in pipeline order: each maps its config section onto one stage's library call.

Each stage function takes the validated config and the run directory, runs the stage (which has its own
checkpointing/resume), and returns a small summary for ``stage.json`` and the final table.
"""
from __future__ import annotations

from klas.pipeline import Stage
from klas.rundir import RunDir


def _opt(v):
    """0 / '' in the config mean "the default" (None) for the library calls."""
    return None if v in (0, "", None) else v


def _common(cfg: dict) -> dict:
    return dict(data_root=_opt(cfg["data"]["root"]))


def _probes(cfg: dict, run: RunDir) -> dict:
    from klas.stages.s1_probes import train_probes

    c = cfg["probes"]
    rec = train_probes(cfg["run"]["family"], run.path, epochs=c["epochs"], batch_size=c["batch_size"], lr=c["lr"],
                       seed=cfg["run"]["seed"], train_subset=_opt(c["train_subset"]), **_common(cfg))
    return dict(final_val_acc={a: p[-1] if isinstance(p, list) else p
                               for a, p in rec.get("final_val_acc", {}).items()}) if "final_val_acc" in rec else {}


def _scores(cfg: dict, run: RunDir) -> dict:
    from klas.stages.s2_scores import compute_scores

    c = cfg["scores"]
    kw = dict(score_form=c["score_form"]) if c["score_form"] else {}
    compute_scores(cfg["run"]["family"], run.path, batch_size=c["batch_size"], temperature=c["temperature"],
                   impl=_opt(c["impl"]), val_subset=_opt(c["val_subset"]), **kw, **_common(cfg))
    return {}


def _selection(cfg: dict, run: RunDir) -> dict:
    from klas.stages.s3_selection import select

    c = cfg["selection"]
    rec = select(cfg["run"]["family"], run.path, method=c["method"], tau=c["tau"], num_buckets=_opt(c["num_buckets"]),
                 score_form=_opt(cfg["scores"]["score_form"]), anchor_rule=_opt(c["anchor_rule"]), **_common(cfg))
    return dict(method=rec["method"], selected=len(rec["selected"]), candidates=len(rec["candidates"]),
                anchor_pairs=rec.get("anchor_pairs"))


def _supernet(cfg: dict, run: RunDir) -> dict:
    from klas.stitch import FitCfg
    from klas.stages.s4_finetune import FinetuneCfg, finetune_supernet

    c = cfg["supernet"]
    ft = FinetuneCfg(epochs=c["epochs"], steps_per_epoch=_opt(c["steps_per_epoch"]), batch_size=c["batch_size"],
                     lr=c["lr"], train_samples=_opt(c["train_subset"]), sampling=c["sampling"],
                     seed=cfg["run"]["seed"], init=FitCfg(method=c["init"], seed=cfg["run"]["seed"]))
    rec = finetune_supernet(run.path, cfg=ft, family=cfg["run"]["family"], restart=True, **_common(cfg))
    return dict(configurations=len(rec.get("configs", rec.get("configurations", []))))


def _evaluation(cfg: dict, run: RunDir) -> dict:
    from klas.stages.s5_evaluation import evaluate_run

    c = cfg["evaluation"]
    rec = evaluate_run(run.path, test_samples=_opt(c["test_subset"]), latency_repeats=c["latency_repeats"],
                       threads=c["threads"], **_common(cfg))
    rows = rec.get("rows", rec.get("configs", []))
    return dict(configurations=len(rows), pareto=sum(1 for r in rows if r.get("pareto")), auc=rec.get("auc"))


def _export(cfg: dict, run: RunDir) -> dict:
    from klas.stages.s6_export import ExportOptions, export_zoo

    c = cfg["export"]
    opts = ExportOptions(opset=c["opset"], parity_images=c["parity_images"], threads=(c["threads"],),
                         batches=(c["batch"],), data_root=_opt(cfg["data"]["root"]))
    manifest = export_zoo(run.path, run.path / "zoo", options=opts)
    return dict(models=len(manifest["models"]), zoo=str(run.path / "zoo"))


STAGES = [
    Stage("probes", ("probes",), (), ("probes.json",), _probes, "train one linear probe per block (ProbeNet)"),
    Stage("scores", ("scores",), ("probes",), ("scores.json",), _scores,
          "stream all-pairs KL (D, Cap, S) over the val split"),
    Stage("selection", ("selection", "scores"), ("scores",), ("selection.json",), _selection,
          "choose anchor pairs and the stitches per FLOPs bucket"),
    Stage("supernet", ("supernet",), ("selection",), ("supernet.json",), _supernet,
          "least-squares stitch init + supernetwork finetuning"),
    Stage("evaluation", ("evaluation",), ("supernet",), ("evaluation.json",), _evaluation,
          "test accuracy, FLOPs, params, latency; Pareto front"),
    Stage("zoo", ("export",), ("evaluation",), ("manifest.json",), _export,
          "export the Pareto front to ONNX + manifest"),
]
