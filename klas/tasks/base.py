"""The task interface. Every method has the meaning its docstring gives for ANY kind of model; the image
classification task (``klas.tasks.image_classification``) is the reference implementation.

Shapes: ``logits`` are a network's raw outputs for a batch, [B, ...]; ``targets`` are what a split yields beside
the inputs; a *prediction* is what evaluation keeps per sample (e.g. the class), together with a *confidence* per
sample (what a cascade routes on).
"""
from __future__ import annotations

from typing import ClassVar

import torch


class Task:
    """Base class of a task plug-in; register an instance with ``klas.tasks.register_task``."""

    name: ClassVar[str] = ""
    cost_unit: ClassVar[str] = "image"  # what FLOPs and latency are counted per
    metric: ClassVar[str] = "accuracy"  # the reported quality, in percent: mean per-sample quality x 100
    runtime_entry: ClassVar[str] = "classify"  # the klas-runtime entry that serves this task's zoo
    datasets: ClassVar[tuple[str, ...]] = ()  # the [data] dataset names it reads (empty: its own data only)

    # --- data ---------------------------------------------------------------------------------------------------
    def open_split(self, family, split: str, data=None, *, root=None, dataset=None, augment: bool = False):
        """``split`` (train / val / test) as an object ``klas.data.batches`` reads: ``len()``, ``subset(n)``,
        ``normalize(raw)``, ``labels`` (targets, first dimension = samples) and ``images`` or ``stream``."""
        raise NotImplementedError

    def num_outputs(self, family) -> int:
        """Width of a probe's output (and of the anchors' heads)."""
        raise NotImplementedError

    def check_config(self, cfg) -> None:
        """Refuse, in one line, a run config whose family and data cannot work together (called before a run)."""

    # --- probes -------------------------------------------------------------------------------------------------
    def probe_features(self, view, h: torch.Tensor) -> torch.Tensor:
        """What a probe reads from block output ``h``: [B, C] per sample (pooled tokens / positions)."""
        return view.pool(h)

    def probe_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The probe training loss SUMMED over the samples of ``logits`` [N, outputs] (callers scale it)."""
        return self.loss(logits, targets, reduction="sum")

    # --- training -----------------------------------------------------------------------------------------------
    def loss(self, logits: torch.Tensor, targets: torch.Tensor, *, label_smoothing: float = 0.0,
             reduction: str = "mean") -> torch.Tensor:
        """The supervised training loss of a batch."""
        raise NotImplementedError

    def distillation(self, logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
        """The distillation term against a teacher's outputs (batch mean), scaled to be temperature-independent."""
        raise NotImplementedError

    # --- evaluation ---------------------------------------------------------------------------------------------
    def predict(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(prediction, confidence) per sample."""
        raise NotImplementedError

    def quality(self, prediction: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-sample quality in [0, 1], higher is better (bool where a sample is simply right or wrong): what the
        admission test pairs between a candidate and an anchor."""
        raise NotImplementedError

    def score(self, prediction: torch.Tensor, targets: torch.Tensor) -> float:
        """The reported metric in percent: mean per-sample quality x 100 (0 on an empty split)."""
        if len(targets) == 0:
            return 0.0
        return 100.0 * float(self.quality(prediction, targets).double().mean())

    # --- export and runtime -------------------------------------------------------------------------------------
    def manifest_fields(self, family) -> dict:
        """What the zoo manifest records about the task, for the runtime entry."""
        return dict(task=self.name, cost_unit=self.cost_unit, metric=self.metric, runtime_entry=self.runtime_entry)

    def example_inputs(self, family, batch: int, seed: int = 0) -> torch.Tensor:
        """A random input batch of the family's input shape (export tracing, self-checks, latency)."""
        return torch.randn(batch, *family.input_shape, generator=torch.Generator().manual_seed(seed))

    def input_spec(self, split, family) -> dict:
        """The manifest's ``input`` of an exported model: its graph input (name, shape with a symbolic batch, dtype)
        and how the runtime prepares raw samples for it, as ``split`` (the test split the export checked it on) was
        prepared for ``family`` (anything with ``input_shape`` and ``data_config``)."""
        raise NotImplementedError

    def output_spec(self, split, family) -> dict:
        """The manifest's ``output`` of an exported model: its graph output and what its values mean."""
        raise NotImplementedError

    def exporter(self):
        """The object that exports ONE zoo member: ``export(job, member) -> (manifest entries, rejected)``
        (``klas.export.member``). Default: the member as one self-contained ONNX graph with its float64 parity
        check and precision variants (``GraphExporter``); a task whose models are not one graph (a decoder with its
        cache) returns its own."""
        from klas.export.member import GraphExporter

        return GraphExporter()
