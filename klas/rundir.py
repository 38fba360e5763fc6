"""A run directory: one folder per run, one subfolder per stage, a ``run.json`` naming the family it belongs to."""
from __future__ import annotations

import time
from pathlib import Path

from klas.errors import KlasError
from klas.io import load_json, save_json



class RunDir:
    """``RunDir(path, family)`` creates or opens a run; opening one made for another family is an error."""

    def __init__(self, path: Path | str, family: str | None = None, dataset: str | None = None):
        self.path = Path(path)
        meta_path = self.path / "run.json"
        if meta_path.is_file():
            self.meta = load_json(meta_path)
            if family is not None and self.meta.get("family") != family:
                raise KlasError(f"{self.path}: run directory belongs to family {self.meta.get('family')!r}, "
                                f"not {family!r} (use another --run-dir)")
        else:
            if family is None:
                raise KlasError(f"{self.path}: not a klas run directory (no run.json); run `klas probe` first")
            from klas import __version__
            self.meta = dict(family=family, dataset=dataset, klas_version=__version__,
                             created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
            from klas import distributed as dist

            if dist.info().is_main:  # under torchrun only rank 0 writes
                save_json(self.meta, meta_path)

    @property
    def family(self) -> str:
        return self.meta["family"]

    def stage(self, name: str) -> Path:
        """The folder of stage ``name`` (created)."""
        from klas.stages import STAGES

        if name not in STAGES and name != "zoo":
            raise KlasError(f"unknown stage {name!r}: expected one of {', '.join(STAGES)}")
        d = self.path / name
        d.mkdir(parents=True, exist_ok=True)
        return d

    def require(self, name: str, filename: str, hint: str | None = None) -> Path:
        """Path of an earlier stage's artifact, or a one-line error saying which command makes it."""
        p = self.path / name / filename
        if not p.is_file():
            raise KlasError(f"{p}: missing; run {hint or f'the {name} stage'} first")
        return p
