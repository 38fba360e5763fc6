"""Stage contexts for research code: a stage run outside the pipeline over an existing run directory (a comparison
method's selection, an arm of ``klas compare``, the study's readers), through ``StageContext.open``."""
from __future__ import annotations

from pathlib import Path

from klas.contract import StageContext


def run_context(run_dir: Path | str, family=None, *, data_root: Path | str | None = None, seed: int = 0,
                progress: bool = True, hooks: dict | None = None) -> StageContext:
    """A ``StageContext`` for ``run_dir``: ``family`` a built Family (used as it is), a registered name, or None (the
    run's own, from its ``run.json``, built with pretrained weights); the data is the run's dataset (``run.json``)
    under ``data_root``; ``hooks`` go to ``ctx.hooks``. ``StageContext.open`` registers the research plug-ins."""
    from klas.config import DataConfig
    from klas.rundir import read_run_meta

    meta = read_run_meta(Path(run_dir)) or {}  # checked; none yet: the stage makes the run folder
    family = family if family is not None else meta.get("family")
    if family is None:
        from klas.rundir import RunDir

        RunDir(run_dir)  # the one-line "not a klas run directory" error
    data = DataConfig(dataset=meta.get("dataset"), root=None if data_root is None else str(data_root))
    return StageContext.open(run_dir, family, seed=seed, data=data, progress=progress, **(hooks or {}))
