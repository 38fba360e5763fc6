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
from klas_runtime.machine import machine_info
from klas_runtime.manifest import (MANIFEST, SCHEMA, load_manifest, manifest_kind, model_path, now, save_manifest,
                                   write_atomic)


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
    exporter = task.exporter()
    old = _previous_files(out_dir)
    entries, rejected = [], []
    try:
        for m in tqdm(models, desc="export", unit="model", disable=not progress):
            made, refused = exporter.export(job, m if isinstance(m, Member) else Member(*m))
            entries += made
            rejected += refused
    except BaseException:
        for file in job.staged:
            (out_dir / staged_name(file)).unlink(missing_ok=True)
        raise
    for e in entries:
        os.replace(out_dir / staged_name(e["file"]), model_path(out_dir, e["file"]))
    for file, raw in task.zoo_files(family).items():  # e.g. a language model's tokenizer, hashed in the header
        write_atomic(out_dir / file, raw)
    entries += [cascade_entry(c, entries, data, options, out_dir) for c in cascades]
    manifest = dict(head, created=now(), created_on=machine_info(),
                    models=sorted(entries, key=lambda e: (e["flops"], e["name"])))
    if val is not None:
        manifest["rejected"] = rejected
    save_manifest(manifest, out_dir)
    for stale in old - {e["file"] for e in entries if "file" in e}:
        model_path(out_dir, stale).unlink(missing_ok=True)
    return manifest


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


def _previous_files(out_dir: Path) -> set[str]:
    """Model files of an earlier zoo in ``out_dir`` (to remove those the new one drops); none if unreadable."""
    if not (out_dir / MANIFEST).is_file():
        return set()
    try:
        return {m["file"] for m in load_manifest(out_dir, verify_files=False)["models"] if "file" in m}
    except ZooError:  # klas_runtime's errors (KlasError's base)
        return set()
