"""``klas run``: the stages in order, each skipped when its outputs are valid for the current inputs.

A stage's identity is a content hash of the config sections it reads plus the hashes of the stages it consumes, so a
changed config re-runs exactly the stages it affects (and everything downstream of them). Each finished stage writes
``<run_dir>/<stage>/stage.json`` (hash, wall time, summary) last, atomically: an interrupted stage has no record and
re-runs (resuming from its own checkpoints where it has them).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from klas import distributed as dist
from klas.config import section_hash
from klas.errors import KlasError
from klas.io import load_json, save_json
from klas.rundir import RunDir


@dataclass(frozen=True)
class Stage:
    name: str  # also the run-dir folder
    sections: tuple[str, ...]  # config sections it reads
    after: tuple[str, ...]  # stages whose outputs it reads
    outputs: tuple[str, ...]  # files (relative to its folder) that must exist for the stage to count as done
    run: Callable[[dict, RunDir], dict]  # returns a small JSON-able summary
    describe: str = ""


def _stage_fns() -> list[Stage]:
    from klas import pipeline_stages as s

    return s.STAGES


def stage_hashes(cfg: dict, stages: list[Stage]) -> dict[str, str]:
    hashes: dict[str, str] = {}
    # threads change speed, not results: they are not part of any stage's identity
    base = ({k: v for k, v in cfg["run"].items() if k != "threads"}, cfg["data"])
    for st in stages:
        hashes[st.name] = section_hash(st.name, base, [cfg[k] for k in st.sections], [hashes[u] for u in st.after])
    return hashes


def stage_status(run_dir: RunDir, stage: Stage, digest: str) -> str:
    """'done' (valid outputs for these inputs), 'stale' (outputs for other inputs) or 'todo'."""
    rec = run_dir.path / stage.name / "stage.json"
    if not rec.is_file():
        return "todo"
    meta = load_json(rec)
    if meta.get("hash") != digest:
        return "stale"
    if not all((run_dir.path / stage.name / o).exists() for o in stage.outputs):
        return "stale"
    return "done"


def run_pipeline(cfg: dict, run_path: Path | str, dry_run: bool = False, until: str | None = None) -> dict:
    """Run (or, with ``dry_run``, only plan) every stage; returns {stage: summary}."""
    stages = _stage_fns()
    names = [s.name for s in stages]
    if until is not None and until not in names:
        raise KlasError(f"--until {until!r}: expected one of {', '.join(names)}")
    run_dir = RunDir(run_path, cfg["run"]["family"], cfg["data"]["dataset"] or None)
    hashes = stage_hashes(cfg, stages)
    summaries: dict[str, dict] = {}
    plan, rerun = [], set()
    for st in stages:
        status = stage_status(run_dir, st, hashes[st.name])
        if status == "done" and rerun & set(st.after):
            status = "stale"  # an upstream stage re-runs: its outputs are rewritten, so this one's inputs are new
        if status != "done":
            rerun.add(st.name)
        plan.append((st, status))
        if until == st.name:
            break
    if dry_run:
        for k, (st, status) in enumerate(plan, 1):
            what = "skip (outputs valid)" if status == "done" else ("re-run (inputs changed)" if status == "stale"
                                                                     else "run")
            print(f"[{k}/{len(plan)}] {st.name:11s} {what:24s} {st.describe}")
        return {}
    t_all = time.time()
    for k, (st, status) in enumerate(plan, 1):
        folder = run_dir.stage(st.name)
        if status == "done":
            summaries[st.name] = load_json(folder / "stage.json").get("summary", {})
            print(f"[{k}/{len(plan)}] {st.name}: up to date, skipped", flush=True)
            continue
        print(f"[{k}/{len(plan)}] {st.name}: {st.describe}", flush=True)
        t0 = time.time()
        summary = st.run(cfg, run_dir)
        wall = time.time() - t0
        if dist.info().is_main:  # under torchrun only rank 0 writes; the others wait at the barrier
            save_json(dict(stage=st.name, hash=hashes[st.name], wall_s=round(wall, 2),
                           finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"), summary=summary), folder / "stage.json")
        dist.barrier(f"stage {st.name}")
        summaries[st.name] = summary
        print(f"[{k}/{len(plan)}] {st.name}: done in {wall:.1f}s", flush=True)
    print(f"[run] all stages finished in {time.time() - t_all:.1f}s; run directory: {run_dir.path}", flush=True)
    return summaries
