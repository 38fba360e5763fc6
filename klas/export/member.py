"""One member of a zoo exported as ONE self-contained ONNX graph, with its precision variants: the exporter the
image classification task returns (``Task.exporter``), and any task whose network is a single graph from inputs
to outputs. A task whose models are not one graph (a decoder with its cache) returns an exporter of its own with
the same ``export(job, member)``.

What the graph is (standalone pruning, dynamo / TorchScript, the self-check) is ``klas.export.graph``; how it is
checked (float64 parity on real test samples) ``klas.export.parity``; the variants ``klas.export.variants``. What
is task-specific in the entry comes from the task: the example input (``example_inputs``), the input and output
specs the runtime reads (``input_spec``, ``output_spec``) and the score of a graph the evaluation did not measure
(``predict`` + ``score``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from klas.errors import KlasError
from klas.export.graph import export_onnx, standalone
from klas.export.parity import check_parity, graph_score
from klas.export.variants import make_variants
from klas.families import count_flops
from klas.io import sha256_file
from klas.stitch import StitchConfig
from klas_runtime.manifest import METADATA_KEY, embedded_entry, sha256_bytes, write_atomic
from klas_runtime.timing import latency_record

EXAMPLE_BATCH = 2  # the export's example input: a batch of 2 keeps the traced batch axis symbolic

ModelProvider = Callable[[StitchConfig], nn.Module]
"""Builds the trained network of one configuration (anchors: ``StitchConfig.anchor(name)``). It must return a
``klas.stitch.StitchedNet`` (or anything with its ``src``, ``tgt``, ``i``, ``j`` attributes and forward)."""


@dataclass
class Member:
    """One model of the zoo: its configuration, its network (or a provider building it from the configuration),
    the evaluation's row (its figures; None: measured at export), its manifest name, and the untouched anchor view
    whose weights the user gave (exported as given, checked bit for bit against their file)."""

    config: StitchConfig
    net: nn.Module | ModelProvider
    row: dict | None = None
    name: str | None = None
    untouched: Any = None

    def network(self) -> nn.Module:
        net = self.net if isinstance(self.net, nn.Module) else self.net(self.config)
        return net.eval()


@dataclass
class ExportJob:
    """What every member of one zoo shares: the task, the family, the test split (parity, scores) and the val split
    (int8 calibration; None: no variants), the zoo-level facts embedded in every file (``header``), the export
    settings (``klas.stages.s6_export.ExportConfig``) and the folder files are staged in."""

    task: Any
    family: Any
    test: Any
    val: Any
    header: dict
    options: Any
    out_dir: Path
    evaluated: int | None = None  # test samples the evaluation measured (the first ones): variants use the same
    staged: list = field(default_factory=list)  # files staged so far (removed again if the export fails)

    def stage(self, file: str, raw: bytes) -> None:
        """Write a model file under its hidden staging name; ``publish`` moves it into place."""
        write_atomic(self.out_dir / staged_name(file), raw)
        self.staged.append(file)


def staged_name(file: str) -> str:
    return f".{file}.staged"


class GraphExporter:
    """Exports one member as one ONNX graph: ``export(job, member) -> (manifest entries, rejected variants)``,
    its float32 entry first, then the variants the settings ask for; every accepted file is staged in the job.
    ``forkable``: what it writes does not depend on timings (latency is only recorded, ``profile``), so the zoo
    writer may export several members at once in forked workers and profile them afterwards, one at a time."""

    forkable = True

    def export(self, job: ExportJob, member: Member, profile: bool = True) -> tuple[list[dict], list[dict]]:
        kept = {}
        entry, raw = self.export_graph(job, member, kept)
        made, refused = [], []
        if job.val is not None:
            made, refused = make_variants(entry, raw, job.test, job.val, job.header, job.options, job.stage,
                                          task=job.task, ref=kept.get("outputs"))
        if profile:
            self.profile(job, [entry, *made])
        return [entry, *made], refused

    @staticmethod
    def profile(job: ExportJob, entries: list[dict]) -> None:
        """Each staged entry's latency on this machine (``options.profile``), added to its ``latency``."""
        o = job.options
        if o.profile:
            for e in entries:
                raw = (job.out_dir / staged_name(e["file"])).read_bytes()
                e["latency"].append(latency_record(raw, o.provider, o.threads, o.batch, o.warmup, o.runs))

    def export_graph(self, job: ExportJob, member: Member, kept: dict | None = None) -> tuple[dict, bytes]:
        """Export, check and verify the float32 graph; returns its manifest entry and bytes (the file is staged
        last; ``profile`` times it). ``kept`` receives the parity check's onnxruntime outputs on the test samples."""
        import onnx

        task, data, options, header, config = job.task, job.test, job.options, job.header, member.config
        net = member.network()
        example = task.example_inputs(job.family, EXAMPLE_BATCH)
        module = standalone(net, example)
        entry = dict(name=member.name or config.key, file=file_name(config, member.name), sha256="0" * 64, bytes=0,
                     precision="fp32", config=config_entry(config, net),
                     params=sum(p.numel() for p in module.parameters()), flops=count_flops(module, example[:1]),
                     origin="untouched" if member.untouched is not None else (
                         "finetuned" if config.is_anchor else "stitched"))
        if member.untouched is not None:
            entry["weights"] = check_untouched(member.untouched)
        model, info = export_onnx(module, example, options.opset, options.exporter)
        entry["exporter"] = info
        onnx.checker.check_model(model, full_check=True)
        raw = model.SerializeToString()
        row = member.row
        if row is not None and row.get("val_acc") is not None:
            entry["val_acc"] = float(row["val_acc"])
        if row is not None and row.get("test_acc") is not None:
            entry.update(test_acc=float(row["test_acc"]), test_acc_source="evaluation stage (PyTorch)")
        else:
            acc, n = graph_score(task, raw, data, options.accuracy_images)
            entry.update(test_acc=acc, test_acc_source=f"onnxruntime on {n} {data.spec.name} test images")
        entry.update(input=task.input_spec(data, job.family), output=task.output_spec(data, job.family),
                     opset=options.opset, parity=check_parity(raw, module, data, options, config.key, kept), latency=[])
        del model.metadata_props[:]
        model.metadata_props.add(key=METADATA_KEY, value=json.dumps(embedded_entry(entry, header)))
        model.doc_string = f"klas {header['family']} zoo model {config.key}"
        onnx.checker.check_model(model)
        raw = model.SerializeToString()
        entry.update(sha256=sha256_bytes(raw), bytes=len(raw))
        job.stage(entry["file"], raw)
        return entry, raw


# --- the entry's parts -------------------------------------------------------------------------------------------

def file_name(config: StitchConfig, name: str | None = None) -> str:
    """``fmnist-deit-ti.onnx`` for an anchor (``fmnist-deit-ti.finetuned.onnx`` for one finetuned in a shared
    supernetwork); ``ti.4+s.6.onnx``-style (source blocks kept, target block resumed at) for a stitch."""
    if config.is_anchor:
        return f"{name or config.source}.onnx"
    return f"{config.source}.{config.i + 1}+{config.target}.{config.j + 1}.onnx"


def check_untouched(view) -> dict:
    """The exported anchor's weights against the file the user gave, tensor by tensor and bit for bit (the ONNX
    parity check then ties the graph to them); a mismatch stops the export."""
    f = getattr(view, "weights_file", None)
    if f is None:
        return dict(file=None, check="no local file (hub or random weights): nothing to compare with")
    from klas.families._registry import read_state_dict  # the reader the family was built with

    f = Path(f)
    given = read_state_dict(f, view.name)
    mine = view.model.state_dict()
    shared = [k for k in given if k in mine]
    bad = [k for k in shared
           if not torch.equal(given[k].to(mine[k].dtype), mine[k]) or given[k].dtype != mine[k].dtype]
    if not shared or bad or len(shared) < len(given):
        raise KlasError(f"{f}: the anchor {view.name!r} to export differs from the weights file "
                        f"({len(bad)} tensors differ, {len(given) - len(shared)} missing): refusing to ship changed "
                        "anchors")
    digest = sha256_file(f) if f.is_file() else {p.name: sha256_file(p) for p in sorted(f.glob("*.safetensors"))}
    return dict(file=str(f), sha256=digest, check=f"bit-identical ({len(shared)} tensors)")


def config_entry(config: StitchConfig, net: nn.Module) -> dict:
    """The manifest's ``config``: the stitch and the blocks of each anchor the graph keeps."""
    for attr in ("src", "tgt", "i", "j"):
        if not hasattr(net, attr):
            raise KlasError(f"{config.key}: the model provider returned a {type(net).__name__}, not a StitchedNet "
                            f"(no {attr!r})")
    src_depth, tgt_depth = net.src.depth, net.tgt.depth
    if config.is_anchor:
        return dict(source=config.source, i=-1, target=config.target, j=-1, anchor=True,
                    source_blocks=[0, src_depth], target_blocks=[tgt_depth, tgt_depth])
    if (net.src.name, net.i, net.tgt.name, net.j) != (config.source, config.i, config.target, config.j):
        raise KlasError(f"{config.key}: the model provider returned {net.src.name}[:{net.i + 1}]->"
                        f"{net.tgt.name}[{net.j + 1}:] instead")
    return dict(source=config.source, i=config.i, target=config.target, j=config.j, anchor=False,
                source_blocks=[0, config.i + 1], target_blocks=[config.j + 1, tgt_depth])

