"""The zoo writer: every member through the task's exporter, the cascades over them, and ``manifest.json``.

Files are staged under hidden names while the members export and moved into place only once every one passed, so
a failing member leaves the folder as it was; model files of an earlier zoo in the folder that the new one drops
are removed once the new manifest is written.
"""
from __future__ import annotations

import os
from pathlib import Path

from klas.errors import KlasError
from klas.export.member import ExportJob, Member, staged_name
from klas.families import get_family_cfg
from klas.tasks import DEFAULT_TASK, get_task, task_of
from klas_runtime.errors import ZooError
from klas_runtime.io import zoo_lock
from klas_runtime.machine import machine_info
from klas_runtime.manifest import (MANIFEST, SCHEMA, load_manifest, manifest_kind, model_path, now, read_manifest,
                                   save_manifest, write_atomic)
from klas_runtime.profile import measured_identity, merge_latency


def task_header(task, family) -> dict:
    """The task's ``manifest_fields`` for the manifest header; none for image classification, which is what a
    manifest without them means (every zoo written before tasks existed, and the runtime's ``classify`` entry):
    its zoo is the same, byte for byte, as before tasks."""
    fields = task.manifest_fields(family)
    return {} if fields == get_task(DEFAULT_TASK).manifest_fields(family) else fields


def export_models(models: list, out_dir: Path | str, family, data, options, progress: bool = True,
                  cascades: list[dict] = (), val=None, evaluated: int | None = None) -> dict:
    """Export ``models`` into ``out_dir`` and write its manifest; returns the manifest.

    ``models``: ``Member``s or ``(config, net or provider, evaluation row[, name, untouched anchor view])``
    tuples; ``family``: a built Family, a FamilyCfg or a registered name (its task exports, its input shape and
    data config go into the manifest); ``data``: the test split (parity, scores); ``cascades``: evaluation zoo
    entries over two of the models, which become cascade entries. With ``val`` (the split int8 variants are
    calibrated on) every model also gets the ``options.precisions`` variants, measured on all of ``data``;
    without it, the float32 zoo only."""
    from tqdm import tqdm

    from klas import __version__

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    family = get_family_cfg(family) if isinstance(family, str) else family
    task = task_of(family)
    fields = task_header(task, family)
    head = dict(schema=SCHEMA, schema_version=manifest_kind(fields).versions[1], family=family.name,
                dataset=data.spec.name, klas_version=__version__, **fields)
    job = ExportJob(task=task, family=family, test=data, val=val, header=head, options=options, out_dir=out_dir,
                    evaluated=evaluated)
    members = [m if isinstance(m, Member) else Member(*m) for m in models]
    entries, rejected = [], []
    try:
        with tqdm(total=len(members), desc="export", unit="model", disable=not progress) as bar:
            for made, refused in _export_members(task.exporter(), job, members, bar):
                entries += made
                rejected += refused
    except BaseException:
        for file in job.staged:
            (out_dir / staged_name(file)).unlink(missing_ok=True)
        for f in out_dir.glob(staged_name("*")):  # a failed worker's, which the job did not hear of
            f.unlink(missing_ok=True)
        raise
    with zoo_lock(out_dir):  # another writer (`klas profile`) of this folder waits; its records are carried over
        old = _previous_files(out_dir)
        for e in entries:
            os.replace(out_dir / staged_name(e["file"]), model_path(out_dir, e["file"]))
        for file, raw in task.zoo_files(family).items():  # e.g. a language model's tokenizer, hashed in the header
            write_atomic(out_dir / file, raw)
        entries += [cascade_entry(c, entries, data, options, out_dir) for c in cascades]
        manifest = dict(head, created=now(), created_on=machine_info(),
                        models=sorted(entries, key=lambda e: (e["flops"], e["name"])))
        if val is not None:
            manifest["rejected"] = rejected
        carry_latency(manifest, out_dir)
        save_manifest(manifest, out_dir)
        for stale in old - {e["file"] for e in entries if "file" in e}:
            model_path(out_dir, stale).unlink(missing_ok=True)
    return manifest


MEMBER_BYTES = 2 << 30  # a forked member export's own memory, at most (ONNX copies, sessions, the int8 grid)


def _export_members(exporter, job: ExportJob, members: list[Member], bar) -> list[tuple[list, list]]:
    """``(entries, rejected)`` of every member, in the members' order. An exporter whose files do not depend on
    timings (``forkable``) exports several at once in forked CPU workers of one thread each (``klas.workers``; the
    costliest first), its latency profiles measured afterwards here, one model at a time as a sequential run
    does; the entries and files are those of a sequential run (``tests/test_export_workers.py``)."""
    from klas.workers import run_forked, worker_count

    names = [m.name or m.config.key for m in members]  # the manifest's names
    forkable = getattr(exporter, "forkable", False) and len(set(names)) == len(names)
    requested = getattr(job.options, "workers", None)
    workers = worker_count(len(members), requested, job_bytes=MEMBER_BYTES) if forkable else 1
    if workers == 1:
        out = []
        for m in members:
            out.append(exporter.export(job, m))
            bar.update(1)
        return out

    by_name = dict(zip(names, members))

    def one(name: str, progress) -> tuple[list, list, list]:
        first = len(job.staged)
        made, refused = exporter.export(job, by_name[name], profile=False)
        progress.update(1)
        return made, refused, job.staged[first:]

    import onnxruntime  # noqa: F401 -- loaded once for the workers; the manifest's created_on names its version

    order = sorted(names, key=lambda n: -float((by_name[n].row or {}).get("flops") or 0))
    results = run_forked(one, order, workers, bar, what="zoo member")
    done = [results[n] for n in names]
    for made, _, staged in done:
        job.staged += staged
        exporter.profile(job, made)
    return [d[:2] for d in done]


def carry_latency(manifest: dict, previous_dir: Path | str, say=print) -> int:
    """Carry the latency records of the zoo in ``previous_dir`` (the one being replaced; call under its lock) over
    to the new ``manifest``'s entries that are unchanged -- same name and same file (sha256; cascades: threshold
    and members' files) -- where the new export did not measure the same (device, provider, threads, batch); say
    in one line how many records of changed entries are dropped. Returns the number carried."""
    try:
        old = read_manifest(previous_dir)
    except ZooError:  # no zoo there yet, or one this klas cannot read: nothing to carry
        return 0
    by_old, by_new = {m["name"]: m for m in old["models"]}, {m["name"]: m for m in manifest["models"]}
    carried, dropped, names = 0, 0, []
    for name, prev in by_old.items():
        new = by_new.get(name)
        have = {_record_key(r) for r in (new or {}).get("latency", [])}
        extra = [r for r in prev["latency"] if _record_key(r) not in have]  # the new export measured the rest
        if new is not None and measured_identity(prev, by_old) == measured_identity(new, by_new):
            new["latency"] = new["latency"] + extra
            carried += len(extra)
        elif extra:
            dropped += len(extra)
            names.append(name)
    if dropped:
        say(f"[export] {Path(previous_dir)}: {dropped} latency record(s) of {len(names)} entr"
            f"{'y' if len(names) == 1 else 'ies'} whose files changed ({', '.join(names[:3])}"
            f"{' ...' if len(names) > 3 else ''}) dropped; measure them again with `klas profile {previous_dir}`",
            flush=True)
    return carried


def cascade_entry(c: dict, entries: list[dict], data, options, out_dir: Path) -> dict:
    """The manifest entry of a cascade over two exported models: worst-case and average FLOPs, accuracy as the
    evaluation measured it, and latency measured through the runtime on real test samples."""
    by_name = {e["name"]: e for e in entries}
    missing = [m for m in c["members"] if m not in by_name]
    if missing:
        raise KlasError(f"cascade {c['name']}: member {missing[0]!r} is not in the zoo")
    small, large = (by_name[m] for m in c["members"])
    entry = dict(name=c["name"], kind="cascade", members=list(c["members"]), threshold=c["threshold"],
                 flops=small["flops"] + large["flops"], flops_avg=c["flops_avg"], deferral=c["deferral"],
                 params=small["params"] + large["params"], val_acc=c["val_acc"], test_acc=c["test_acc"],
                 test_acc_source="evaluation stage (PyTorch members)", latency=[])
    if options.profile:
        from klas_runtime.timing import cascade_latency_record

        n = min(len(data), max(options.runs, options.warmup) * options.batch)
        inputs = data.normalize(data.images[:n]).numpy()
        entry["latency"].append(cascade_latency_record(
            out_dir / small["file"], out_dir / large["file"], c["threshold"], options.provider, options.threads,
            options.batch, options.warmup, options.runs, inputs=inputs,
            inputs_label=f"{n} {data.spec.name} test images"))
    return entry


def _record_key(rec: dict) -> tuple:
    return rec["device"], rec["provider"], rec["threads"], rec["batch"], rec.get("inputs") == "random"


def _previous_files(out_dir: Path) -> set[str]:
    """Model files of an earlier zoo in ``out_dir`` (to remove those the new one drops); none if unreadable."""
    if not (out_dir / MANIFEST).is_file():
        return set()
    try:
        return {m["file"] for m in load_manifest(out_dir, verify_files=False)["models"] if "file" in m}
    except ZooError:  # klas_runtime's errors (KlasError's base)
        return set()
