"""Stage contexts for research code: a stage run outside the pipeline over an existing run directory (a comparison
method's selection, an arm of ``klas compare``, the study's readers), through ``StageContext.open``."""
from __future__ import annotations

from pathlib import Path

from klas.contract import StageContext


def run_context(run_dir: Path | str, family=None, *, data_root: Path | str | None = None, seed: int = 0,
                progress: bool = True, hooks: dict | None = None) -> StageContext:
    """A ``StageContext`` for ``run_dir``: ``family`` a built Family (used as it is), a registered name, or None (the
    run's own, from its ``run.json``, built with pretrained weights); the data is the run's dataset (``run.json``)
    under ``data_root``; ``hooks`` go to ``ctx.hooks``. Registers the research plug-ins first."""
    from klas.config import DataConfig
    from klas.io import load_json
    from klas.research import register_all

    register_all()
    meta_path = Path(run_dir) / "run.json"
    meta = load_json(meta_path) if meta_path.is_file() else {}
    family = family if family is not None else meta.get("family")
    if family is None:
        from klas.rundir import RunDir

        RunDir(run_dir)  # the one-line "not a klas run directory" error
    data = DataConfig(dataset=meta.get("dataset"), root=None if data_root is None else str(data_root))
    ctx = StageContext.open(run_dir, family, seed=seed, data=data, progress=progress)
    ctx.hooks.update(hooks or {})  # NOTE: not through open(**hooks): the evaluation stage has a hook named family
    return ctx
