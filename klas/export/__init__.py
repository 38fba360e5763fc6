"""The export package: a stitched zoo as standalone ONNX files plus ``manifest.json``, which ``klas_runtime`` reads.

* ``graph``    -- one network as one self-contained ONNX graph (standalone pruning, dynamo / TorchScript exporter,
                  the dynamo graph's self-check);
* ``parity``   -- onnxruntime outputs, the float64 parity check, graph agreement, a graph's score through the task;
* ``variants`` -- fp16 and int8 variants of an exported graph;
* ``member``   -- ``GraphExporter``: one zoo member as one graph with its variants (``Task.exporter``);
* ``manifest`` -- the zoo writer: members, cascades, ``manifest.json``, staging;
* ``zoo``      -- what to export: the evaluation's zoo as members.

The export stage (``klas.stages.s6_export``) is the thin stage over these: its config, its artifact (the zoo folder)
and ``run(cfg, ctx)``.
"""
from __future__ import annotations

from klas.export.graph import EXPORTER_DYNAMO, EXPORTER_TORCHSCRIPT, INPUT_NAME, OUTPUT_NAME, export_onnx, standalone
from klas.export.manifest import cascade_entry, export_models, task_header
from klas.export.member import ExportJob, GraphExporter, Member, ModelProvider, check_untouched, config_entry, file_name
from klas.export.parity import (Parity, SplitInputs, check_parity, compare, float64_parity, graph_score, onnx_logits,
                                self_check)
from klas.export.variants import PRECISIONS, make_variants, parse_precisions, to_fp16, to_int8
from klas.export.zoo import ZooItem, cascades, check_rows, members, zoo_items

__all__ = ["EXPORTER_DYNAMO", "EXPORTER_TORCHSCRIPT", "INPUT_NAME", "OUTPUT_NAME", "PRECISIONS", "ExportJob",
           "GraphExporter", "Member", "ModelProvider", "Parity", "SplitInputs", "ZooItem", "cascade_entry", "cascades",
           "check_parity", "check_rows", "check_untouched", "compare", "config_entry", "export_models", "export_onnx",
           "file_name", "float64_parity", "graph_score", "make_variants", "members", "onnx_logits", "parse_precisions",
           "self_check", "standalone", "task_header", "to_fp16", "to_int8", "zoo_items"]
