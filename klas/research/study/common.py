"""What every sub-study shares: the run's context and scores, the task's score of a network, and how a record and
its figure are published."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from klas.io import save_json


def context(run_dir: Path | str, family=None, data_root=None, progress: bool = True):
    """The run's ``StageContext`` (``klas.research.context.run_context``) after the one-line check that ``run_dir``
    is a klas run directory."""
    from klas.research.context import run_context
    from klas.rundir import RunDir

    RunDir(run_dir)
    return run_context(run_dir, family, data_root=data_root, progress=progress)


def scores(ctx) -> tuple:
    """(the run's ``ScoresArtifact``, its score tensors, its baseline metric tables)."""
    from klas.stages.s2_scores import ScoresArtifact

    art = ctx.upstream(ScoresArtifact)
    return (art, *ScoresArtifact.tensors(ctx.folder_of(ScoresArtifact)))


@torch.no_grad()
def task_score(task, net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    """The task's metric (%) of ``net`` on inputs ``x`` and targets ``y``, batch by batch (eval mode)."""
    net.eval()
    if not len(y):
        return 0.0
    pred = torch.cat([task.predict(net(x[k:k + batch]))[0] for k in range(0, len(y), batch)])
    return task.score(pred, y)


def publish(rec: dict, t0: float, out_dir: Path, name: str, family: str, plot) -> dict:
    """Stamp a sub-study's record with its wall time (since ``t0``) and machine, write it to
    ``out_dir/study_<name>_<family>.json`` and its figure ``plot(rec, path)`` beside it (.png); returns the record."""
    from klas_runtime.machine import machine_info

    rec.update(wall_s=round(time.time() - t0, 2), machine=machine_info())
    path = Path(out_dir) / f"study_{name}_{family}.json"
    save_json(rec, path)
    plot(rec, path.with_suffix(".png"))
    return rec


def plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_fig(fig, path: Path, dpi: int) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt().close(fig)
