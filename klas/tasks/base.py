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
    cascades: ClassVar[bool] = True  # evaluation may offer cascades of two zoo members
    score_plugins: ClassVar[bool] = True  # the scores stage feeds the registered baseline metrics
    stages: ClassVar[tuple[str, ...] | None] = None  # the pipeline stages it supports (None: all)

    # --- family -------------------------------------------------------------------------------------------------
    def build_anchor(self, anchor, input_shape, *, pretrained: bool = False, weights=None, num_classes=None):
        """One anchor (``AnchorCfg``) as a block view measured at ``input_shape``: timm for image models."""
        from klas.families._registry import create_anchor

        return create_anchor(anchor, input_shape, pretrained=pretrained, weights=weights, num_classes=num_classes)

    def parse_family(self, table: dict, source: str, base):
        """A ``[family]`` TOML table of this task -> ``FamilyCfg`` (one-line errors naming ``source`` and the key;
        relative paths from ``base``)."""
        from klas.families.user import parse_image_family

        return parse_image_family(table, source, base)

    def check_family(self, cfg, views, source: str = "") -> None:
        """Refuse, in one line, built anchors that cannot form one family (called for families from a config)."""
        from klas.families._registry import check_stitchable

        check_stitchable(cfg.name, views, source)

    def anchor_trainer(self):
        """(recipe settings class, ``train(family, out_dir, recipe, data_root, anchors, threads) -> card path``):
        how ``klas anchors train`` trains an embedded family's anchors from scratch."""
        from klas.families.trainer import Recipe, train_family

        return Recipe, train_family

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

    def new_probes(self, family, train, cfg, seed: int) -> dict:
        """Fresh probes per anchor: modules mapping the block features of a batch (one tensor per block) to logits
        [depth, B, ..., outputs]. Default: linear probes on standardized features (``ProbeNet``)."""
        from klas.stages.s1_probes import linear_probes

        return linear_probes(family, train, cfg, seed, self)

    def probes_from_tensors(self, family, view, tensors: dict, where: str):
        """The trained probes of ``view`` from the probes file's tensors (``<anchor>/<k>.weight|bias``)."""
        from klas.stages.s1_probes import linear_probes_from_tensors

        return linear_probes_from_tensors(view, self.num_outputs(family), tensors, where)

    def probe_objective(self, net, logits: torch.Tensor, feats: list, targets: torch.Tensor) -> torch.Tensor:
        """The loss of one anchor's probes on a batch, summed over probes and samples: ``logits`` [depth, B, ...]
        from ``net(feats)``."""
        return self.probe_loss(logits.flatten(0, 1), targets.repeat(logits.shape[0], *([1] * (targets.dim() - 1))))

    def score_chunks(self, family, nets: dict, x: torch.Tensor, memory_mb: int):
        """The scores stage's input for one batch, in chunks of samples: (per anchor its probes' and head's logits
        [depth + 1, n, C], per anchor the probe features or None). Default: the whole batch at once."""
        from klas.stages.s1_probes import anchor_features

        logits, feats = {}, {}
        for v in family:
            f, head = anchor_features(v, x, self)
            feats[v.name] = f
            logits[v.name] = torch.cat([nets[v.name](f), head[None]])  # [depth + 1, B, C]
        yield logits, feats

    # --- training -----------------------------------------------------------------------------------------------
    def loss(self, logits: torch.Tensor, targets: torch.Tensor, *, label_smoothing: float = 0.0,
             reduction: str = "mean") -> torch.Tensor:
        """The supervised training loss of a batch."""
        raise NotImplementedError

    def distillation(self, logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
        """The distillation term against a teacher's outputs (batch mean), scaled to be temperature-independent."""
        raise NotImplementedError

    # --- evaluation ---------------------------------------------------------------------------------------------
    def predict(self, logits: torch.Tensor, targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(prediction, confidence) per sample; ``targets`` where a prediction is measured against them (a language
        model's per-token likelihoods), ignored by classifiers."""
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

    def report(self, prediction: torch.Tensor, targets: torch.Tensor) -> dict:
        """Extra figures of a split beside the score (e.g. perplexity), for the evaluation rows."""
        return {}

    def cost_fields(self, net) -> dict:
        """Extra per-model costs beside FLOPs and latency (e.g. KV-cache bytes per token)."""
        return {}

    def extra_metrics(self, net, ctx, family, cfg) -> dict:
        """Extra test figures of one network that need more than its logits (e.g. ROUGE of generations)."""
        return {}

    def print_summary(self, ev, run_dir) -> None:
        """The closing summary of ``klas run`` from the evaluation artifact ``ev`` (and the zoo in ``run_dir``)."""
        from klas.summary import print_zoo

        print_zoo(ev, run_dir)

    # --- export and runtime -------------------------------------------------------------------------------------
    def manifest_fields(self, family) -> dict:
        """What the zoo manifest records about the task, for the runtime entry."""
        return dict(task=self.name, cost_unit=self.cost_unit, metric=self.metric, runtime_entry=self.runtime_entry)

    def zoo_files(self, family) -> dict[str, bytes]:
        """Files of the zoo beside its models (name -> bytes), hashed in the header ``manifest_fields`` writes (a
        language model's tokenizer); none for image classification."""
        return {}

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
