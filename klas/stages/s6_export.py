"""The export stage: the evaluation's zoo as ONNX files plus ``manifest.json`` in ``<run>/zoo``.

For every member of the evaluation's zoo (the untouched anchors, the admitted configurations) the task's exporter
(``klas.export``; image classification: one standalone graph per model, pruned to the weights its forward uses,
``torch.onnx.export(dynamo=True)`` with a TorchScript fallback per model, ``onnx.checker``, onnxruntime logits
against a float64 PyTorch reference on real test samples, fp16 / int8 variants) writes one self-contained file;
cascades become entries over two of them. A model that misses the tolerance is not written: the export stops with
the figures. Latency is then measured on this machine.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from klas.contract import Artifact, StageContext, digest, setting
from klas.errors import KlasError
from klas.export import ModelProvider, cascades, check_rows, export_models, members, zoo_items
from klas.export.manifest import carry_latency
from klas.io import sha256_file, swap_dirs
from klas.stages.s4_finetune import FinetuneArtifact
from klas.stages.s5_evaluation import EvaluationArtifact
from klas_runtime.errors import ZooError
from klas_runtime.io import zoo_lock
from klas_runtime.manifest import MANIFEST, SCHEMA_VERSION, load_manifest, save_manifest

__all__ = ["ExportArtifact", "ExportConfig", "finetuned_networks", "run", "summary"]


@dataclass(frozen=True)
class ExportConfig:
    """The ONNX zoo: the anchors and the Pareto configurations, each checked against PyTorch on real test images
    and timed with onnxruntime on this machine."""

    opset: int = setting(18, "ONNX opset", ge=18)
    exporter: str = setting("auto", "ONNX exporter: auto = torch.onnx.export(dynamo=True), TorchScript only where a "
                            "model's dynamo graph fails its self-check; dynamo = no fallback (fail instead); "
                            "torchscript = the deprecated TorchScript exporter for every model (much faster to export; "
                            "the same parity check); language-model decoders always use dynamo", choices=("auto", "dynamo", "torchscript"))
    parity_images: int = setting(10000, "test images for the ONNX vs PyTorch check", ge=1)
    parity_batch: int = setting(499, "images per parity batch (odd on purpose: exercises the dynamic batch axis)",
                                ge=1, key=False)
    atol: float = setting(1e-3, "max |logit difference| allowed", gt=0)
    min_agreement: float = setting(0.999, "min top-1 agreement with PyTorch (fraction)", ge=0, le=1)
    accuracy_images: int | None = setting(None, "test images for the accuracy of models the evaluation lacks",
                                          ge=1, none="all")
    profile: bool = setting(True, "measure onnxruntime latency of every model (else: `klas profile` later)")
    provider: str | None = setting(None, "onnxruntime execution provider to time on", choices=("cpu", "cuda"),
                                   none="auto")
    threads: int = setting(1, "intra-op threads while timing", ge=1)
    workers: int | None = setting(None, "image models exported at once: forked CPU processes of one thread each, "
                                  "timed afterwards one at a time", ge=1, none="auto", key=False)
    batch: int = setting(1, "batch size while timing", ge=1)
    warmup: int = setting(20, "untimed runs first", ge=0)
    runs: int = setting(200, "timed runs per measurement", ge=1)
    precisions: str = setting("fp16,int8", "reduced-precision variants of every model (klas.export.variants): "
                              "int8 = static QDQ calibrated on val images, fp16 = float16 inside, float32 I/O"
                              "; language models: int8 / int4 = weight-only MatMulNBits, fp16 as for images",
                              choices=("fp16,int8", "fp16", "int8", "int4", "int8,int4", "fp16,int8,int4", "none"))
    calibration_images: int = setting(256, "val images the int8 variants are calibrated on", ge=1)
    per_channel: str = setting("auto", "int8 weights per channel (on: 8 and 7 bits tried), per tensor (off), or "
                               "auto: all three built, the one agreeing more with the float32 model on held-out "
                               "val images kept",
                               choices=("auto", "on", "off"))
    per_channel_images: int = setting(1000, "val images after the calibration ones that decide the int8 grid "
                                      "(per_channel / int8_ops / calibration_method = auto)", ge=1)
    int8_ops: str = setting("auto", "ops int8 quantizes: weights = MatMul/Gemm/Conv, all = every op the quantizer "
                            "has, auto = both built, the one agreeing more with float32 on held-out val kept",
                            choices=("auto", "weights", "all"))
    calibration_method: str = setting("auto", "int8 calibration: minmax, entropy, percentile, or auto (each tried on "
                                      "the best ops / per_channel, decided on held-out val)",
                                      choices=("auto", "minmax", "entropy", "percentile"))
    significance: float = setting(0.05, "level of the paired sign test (variant vs its float32 model, test split) "
                                  "below which the runtime's pick counts their accuracy difference", gt=0, le=0.5)
    # --- language models (the causal-lm task's decoders, klas.lm.export) ---
    parity_prompts: int = setting(8, "language models: test sequences whose first tokens are the parity prompts",
                                  ge=1)
    greedy_steps: int = setting(32, "language models: greedy decode steps compared with PyTorch per prompt", ge=1)
    decode_tokens: int = setting(32, "language models: output tokens per timed generation", ge=1)
    decode_runs: int = setting(5, "language models: timed generations per prompt length and batch", ge=1)
    max_perplexity_increase: float = setting(0.02, "language models: a variant whose val perplexity exceeds its "
                                             "float32 parent's by more than this fraction is left out (rejected)",
                                             ge=0)
    max_accuracy_loss: float = setting(1.0, "a variant losing more test accuracy points than this against its "
                                       "float32 model is left out of the zoo (listed under rejected)", ge=0)


@dataclass(frozen=True)
class ExportArtifact(Artifact):
    """The zoo folder ``<run>/zoo``: ``manifest.json`` (its record, in the runtime's schema, validated by
    ``klas_runtime``) and the model files it lists. ``manifest`` is the whole manifest; ``models`` its entries."""

    KIND: ClassVar[str] = "export"
    VERSION: ClassVar[int] = SCHEMA_VERSION
    RECORD: ClassVar[str] = MANIFEST
    FOLDER: ClassVar[str] = "zoo"
    manifest: dict

    @property
    def models(self) -> list[dict]:
        return self.manifest["models"]

    @property
    def files(self) -> list[str]:
        """The model files the manifest lists (cascades have none of their own)."""
        return [m["file"] for m in self.models if "file" in m]

    def save(self, folder: Path | str) -> None:
        save_manifest(self.manifest, Path(folder))  # validated first

    @classmethod
    def load(cls, folder: Path | str) -> "ExportArtifact":
        """The manifest of ``folder``, validated (one-line error); the model files' hashes are the digest's job."""
        path = Path(folder) / MANIFEST
        if not path.is_file():
            raise KlasError(f"{path}: missing; run the export stage first")
        try:
            return cls(load_manifest(Path(folder), verify_files=False))
        except KlasError:
            raise
        except ZooError as e:
            raise KlasError(str(e)) from None

    @classmethod
    def digest(cls, folder: Path | str) -> str | None:
        """Over the manifest, which holds every model file's sha256; None if the manifest is missing or invalid,
        or any file it lists is missing or differs from its recorded hash (each one is hashed again)."""
        folder = Path(folder)
        if not (folder / MANIFEST).is_file():
            return None
        try:
            load_manifest(folder, verify_files=True)
        except ZooError:
            return None
        return digest(sha256_file(folder / MANIFEST))


def finetuned_networks(ctx: StageContext) -> ModelProvider:
    """The trained network of each configuration of the run, whatever its recipe (``klas.stitched.load_stitched``);
    the finetune record is read once, when the first one is asked for."""
    from klas.stitched import load_stitched

    return lambda config: load_stitched(ctx.run_dir.path, config, record=ctx.upstream(FinetuneArtifact))


# --- the stage contract ---------------------------------------------------------------------------------------------
NAME, CONFIG, ARTIFACT, AFTER = "export", ExportConfig, ExportArtifact, ("evaluation",)
FOLDER = ExportArtifact.FOLDER  # the artifact is the run's zoo folder, <run>/zoo
DESCRIBE = "export the zoo (untouched anchors + admitted models and cascades) to ONNX + manifest"


def run(cfg: ExportConfig, ctx: StageContext) -> ExportArtifact:
    """The evaluation's zoo (``ctx.upstream(EvaluationArtifact)``): its untouched anchors rebuilt from the weights
    the finetune record names, its configurations from the finetune stage (``finetuned_networks``), checked on
    ``ctx.split("test")``, int8 calibrated on ``ctx.split("val")``. The new zoo is built in a sibling folder and
    swapped in with one rename: a kill at any moment leaves the old zoo or the new one whole, never a mix."""
    ev = ctx.upstream(EvaluationArtifact)
    where = str(ctx.folder_of(EvaluationArtifact) / EvaluationArtifact.RECORD)
    check_rows(ev.configs, where)
    items = zoo_items(ev.zoo, where)
    anchors = _untouched_anchors(ctx) if any(it.untouched for it in items) else {}
    models = members(items, finetuned_networks(ctx), anchors, where)
    # NOTE: the family's definition is all the export needs (preprocessing, input shape, task); the networks come
    # from the finetune stage and the untouched anchors from their files, so no anchor is built here
    family = ctx.family_cfg
    test = ctx.split("test", family=family)
    val = ctx.split("val", family=family) if cfg.precisions != "none" else None
    final = ctx.folder_of(ExportArtifact)
    staging = final.parent / f".{final.name}.staging-{os.getpid()}"
    for stale in final.parent.glob(f".{final.name}.staging-*"):  # left by a killed export
        shutil.rmtree(stale, ignore_errors=True)
    try:
        manifest = export_models(models, staging, family, test, cfg, ctx.progress, cascades(ev.zoo), val,
                                 evaluated=ev.n_test)
        with zoo_lock(final):  # a `klas profile` of the old zoo merges into the new one after (klas_runtime.io)
            if carry_latency(manifest, final):  # figures measured since on unchanged models are kept
                save_manifest(manifest, staging)
            swap_dirs(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ExportArtifact(manifest)


def _untouched_anchors(ctx: StageContext) -> dict:
    """The user's anchors exactly as given (name -> view), rebuilt from the weights the finetune record names;
    none when the run's anchors were passed in (nothing to compare with)."""
    from klas.stages.s5_evaluation import untouched_anchors

    return {v.name: v for v in untouched_anchors(ctx.upstream(FinetuneArtifact)) or []}


def summary(art: ExportArtifact) -> dict:
    return dict(models=len(art.models))
