"""``klas run`` and every single-stage command: the stages in order, and the one cache that says which are done.

A stage's **key** is a content hash of its own config (the settings that change results), the run-wide settings
(family, seed, weights, data) and the **digests of the upstream artifacts it reads** (sha256 over their record and
files). A stage is done when ``<run>/<stage>/stage.json`` holds the current key *and* its artifact still has the
digest recorded there, so an artifact rewritten by anything else (another command, a hand edit) makes the stage
and everything downstream stale. The record is deleted before a stage re-runs and written last, so an interrupted
stage is never taken as done (it resumes from its own checkpoints, which are keyed the same way).
"""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from types import ModuleType

from klas import distributed as dist
from klas.config import Config
from klas.contract import StageContext, digest, key_fields
from klas.errors import KlasError
from klas.io import load_json, save_json
from klas.rundir import RunDir, check_run_path, read_run_meta
from klas.stages import STAGES, stage_modules

RECORD = "stage.json"


def artifact_folder(run_dir: Path, mod: ModuleType) -> Path:
    return Path(run_dir) / getattr(mod, "FOLDER", mod.NAME)


def stage_key(cfg: Config, mod: ModuleType, upstream: dict[str, str | None]) -> str:
    run = key_fields(cfg.run)
    # NOTE: the [data] settings that change results; the ones added with the streaming pipeline enter the key only
    # when they differ from their defaults, so runs made before them stay up to date
    data = key_fields(cfg.data)
    data = {k: v for k, v in data.items() if k in ("dataset", "root") or v != _DATA_DEFAULTS.get(k)}
    parts = [mod.NAME, mod.ARTIFACT.VERSION, run, data, key_fields(cfg[mod.NAME]), upstream]
    family = getattr(cfg, "family_key", None)
    if family is not None:  # a family from the config: its definition and the sha256 of every weights file
        parts.append(family)
    return digest(*parts)


def _data_defaults() -> dict:
    from klas.config import DataConfig

    return asdict(DataConfig())


_DATA_DEFAULTS = _data_defaults()


def read_record(run_dir: Path, name: str) -> dict | None:
    p = Path(run_dir) / name / RECORD
    if not p.is_file():
        return None
    try:
        rec = load_json(p)
    except KlasError:
        return None  # a damaged record counts as none: the stage re-runs
    return rec if isinstance(rec, dict) else None


def _status(run_dir: Path, mod: ModuleType, key: str) -> tuple[str, str | None]:
    """('done' | 'stale' | 'todo', why) for one stage under ``key``."""
    rec = read_record(run_dir, mod.NAME)
    if rec is None:
        return "todo", None
    if rec.get("key") != key:
        return "stale", "settings or upstream artifacts changed"
    if mod.ARTIFACT.digest(artifact_folder(run_dir, mod)) != rec.get("artifact"):
        return "stale", "its artifact changed or is missing"
    return "done", None


def plan(cfg: Config, run_dir: Path, until: str | None = None, force: tuple[str, ...] = ()) -> list[dict]:
    """What ``run_pipeline`` would do: one row per stage up to ``until`` (status, why, key where known)."""
    if until is not None and until not in STAGES:
        raise KlasError(f"--until {until!r}: expected one of {', '.join(STAGES)}")
    rows, digests, rerun = [], {}, set()
    for mod in task_stages(cfg):
        upstream = {u: digests.get(u) for u in mod.AFTER}
        if rerun & set(mod.AFTER):
            key = None
            status, why = ("stale", "an upstream stage re-runs") if read_record(run_dir, mod.NAME) else ("todo", None)
        else:
            key = stage_key(cfg, mod, upstream)
            status, why = _status(run_dir, mod, key)
            if status == "done" and mod.NAME in force:
                status, why = "stale", "forced"
        if status == "done":
            digests[mod.NAME] = read_record(run_dir, mod.NAME)["artifact"]
        else:
            rerun.add(mod.NAME)
        rows.append(dict(module=mod, status=status, why=why, key=key))
        if mod.NAME == until:
            break
    return rows


def task_stages(cfg: Config) -> list[ModuleType]:
    """The stages the family's task supports (``Task.stages``; a task may not export yet), in pipeline order."""
    from klas.families import get_family_cfg
    from klas.tasks import task_of

    fam = cfg.family_cfg or get_family_cfg(cfg.run.family)
    names = task_of(fam).stages
    return [m for m in stage_modules() if names is None or m.NAME in names]


def run_pipeline(cfg: Config, run_path: Path | str, dry_run: bool = False, until: str | None = None,
                 force: tuple[str, ...] = (), family=None, progress: bool = True,
                 on_start=None) -> dict[str, object]:
    """Run (or, with ``dry_run``, only print the plan of) every stage up to ``until``; returns {stage: artifact}
    for the stages that exist at the end. ``dry_run`` writes nothing. ``on_start()`` is called once the run may
    go ahead (after the run directory's lock is taken), so a refused run prints nothing but its refusal."""
    from klas.research import register_all

    register_all()  # a Config built in code may name research metrics / methods (load_config registers them too)
    run_path = check_run_path(run_path)  # a dry run fails as the real one would
    read_run_meta(run_path, cfg.run.family)
    rows = plan(cfg, run_path, until, force)
    if any(r["status"] != "done" for r in rows):
        from klas.families import get_family_cfg
        from klas.tasks import task_of

        task_of(get_family_cfg(cfg.run.family)).check_config(cfg)
    if dry_run:
        if on_start is not None:
            on_start()
        for k, r in enumerate(rows, 1):
            what = {"done": "skip (up to date)", "todo": "run"}.get(r["status"], f"re-run ({r['why']})")
            print(f"[{k}/{len(rows)}] {r['module'].NAME:11s} {what:48s} {r['module'].DESCRIBE}")
        return {}
    run_dir = RunDir(run_path, cfg.run.family, cfg.data.dataset)
    if not dist.info().is_main:
        return _run_stages(cfg, run_dir, rows, force, family, progress)
    with run_dir.lock():  # each stage's status is decided again under the lock, just before it runs
        if on_start is not None:
            on_start()
        return _run_stages(cfg, run_dir, rows, force, family, progress)


def _run_stages(cfg: Config, run_dir: RunDir, rows: list[dict], force: tuple[str, ...], family,
                progress: bool) -> dict[str, object]:
    run_path = run_dir.path
    if dist.info().is_main:
        from klas.io import atomic_path

        with atomic_path(run_path / "config.toml") as tmp:  # the settings of the latest command, for the next one
            tmp.write_text(cfg.to_toml(comments=False))
    ctx_base = dict(run_dir=run_dir, run=cfg.run, data=cfg.data, progress=progress, prebuilt=family)
    out: dict[str, object] = {}
    digests: dict[str, str] = {}
    t_all = time.time()
    for k, r in enumerate(rows, 1):
        mod = r["module"]
        head = f"[{k}/{len(rows)}] {mod.NAME}"
        folder = artifact_folder(run_path, mod)
        upstream = {u: digests.get(u) for u in mod.AFTER}
        key = stage_key(cfg, mod, upstream)
        status, why = _status(run_path, mod, key)
        if status == "done" and mod.NAME not in force:
            digests[mod.NAME] = read_record(run_path, mod.NAME)["artifact"]
            out[mod.NAME] = mod.ARTIFACT.load(folder)
            print(f"{head}: up to date, skipped", flush=True)
            continue
        print(f"{head}: {mod.DESCRIBE}" + (f" (re-run: {why})" if why and status == "stale" else ""), flush=True)
        record = run_path / mod.NAME / RECORD
        if dist.info().is_main:
            record.unlink(missing_ok=True)  # invalidate first: an interrupted re-run is never taken as done
        # each stage builds its own family (finetuning trains in place); the typed artifacts made so far go along
        ctx = StageContext(key=key, artifacts={type(a): a for a in out.values()}, **ctx_base)
        t0 = time.time()
        art = mod.run(cfg[mod.NAME], ctx)
        wall = time.time() - t0
        dist.barrier(f"stage {mod.NAME}")
        digests[mod.NAME] = mod.ARTIFACT.digest(folder)
        summary = mod.summary(art)
        if dist.info().is_main:
            save_json(dict(stage=mod.NAME, key=key, artifact=digests[mod.NAME], upstream=upstream,
                           wall_s=round(wall, 2), finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"), summary=summary),
                      record)
        dist.barrier(f"stage {mod.NAME} record")
        out[mod.NAME] = art
        print(f"{head}: done in {wall:.1f}s", flush=True)
    print(f"[run] finished in {time.time() - t_all:.1f}s; run directory: {run_path}", flush=True)
    return out


def apply_run_settings(cfg: Config) -> None:
    """Process-wide settings of ``[run]`` (torch CPU threads), applied before any stage."""
    if cfg.run.threads:
        import torch

        torch.set_num_threads(cfg.run.threads)
