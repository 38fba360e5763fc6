"""The pipeline's stages, in order: family -> probes -> scores -> selection -> finetune -> evaluation -> export
(-> the torch-free runtime, package ``klas_runtime``). One module per stage, named by its place in the order; each
follows the stage contract of ``klas.contract`` (NAME, CONFIG, ARTIFACT, AFTER, DESCRIBE, ``run``, ``summary``).
"""
from __future__ import annotations

import importlib
from types import ModuleType

MODULES = ("s1_probes", "s2_scores", "s3_selection", "s4_finetune", "s5_evaluation", "s6_export")
STAGES = tuple(m.split("_", 1)[1] for m in MODULES)  # probes, scores, selection, finetune, evaluation, export


def stage_modules() -> list[ModuleType]:
    """The stage modules in pipeline order (imported on first use: they import torch)."""
    return [importlib.import_module(f"klas.stages.{m}") for m in MODULES]


def stage_module(name: str) -> ModuleType:
    return stage_modules()[STAGES.index(name)]
