"""Reduced-precision variants of an exported zoo model: int8 (static QDQ quantization) and fp16.

For every float32 model the export writes, ``make_variants`` builds

* an **int8** variant: ``onnxruntime.quantization.quantize_static`` in QDQ format, activations and weights int8,
  calibrated (MinMax) on ``calibration_images`` samples of the *val* split through a ``CalibrationDataReader``. Only
  the MatMul / Gemm / Conv nodes are quantized (the ops that carry the weights): quantizing every op (Add, Mul,
  Softmax, LayerNorm...) measured worse on the fmnist-deit anchors on every axis -- accuracy 82.17 vs 82.52 %
  (deit-ti), file 312 vs 205 KB, slower. Weights per channel or per tensor: ``per_channel = "auto"`` quantizes
  both and keeps the one whose top-1 agrees more often with the float32 parent on val samples the calibration did
  not see; ``quant_pre_process`` was measured and left out (same accuracy, no faster on these graphs);
* an **fp16** variant: float16 weights and activations with float32 inputs / outputs
  (``onnxruntime.transformers.float16.convert_float_to_float16(keep_io_types=True)``; its graph is re-sorted
  topologically, as the converter appends the input casts after their consumers).

Each is checked with ``onnx.checker`` (full check), its test score measured with onnxruntime on every sample of
``data`` (the export passes the full test split) through the task (``task.predict`` / ``task.score``) and compared
with its parent's onnxruntime outputs on the same samples (top-1 agreement, max |logit difference|). A variant that
loses more than ``max_accuracy_loss`` points against its parent is not written; it is returned as rejected, with
the reason.
"""
from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from pathlib import Path

import numpy as np

from klas.errors import KlasError
from klas.export.parity import SplitInputs, compare, onnx_logits, score_outputs
from klas_runtime.manifest import METADATA_KEY, embedded_entry, sha256_bytes
from klas_runtime.timing import latency_record

PRECISIONS = ("fp16", "int8")  # in the order they are built
INT8_OPS = ("MatMul", "Gemm", "Conv")
CALIB_BATCH = 64
EVAL_BATCH = 500


def parse_precisions(text: str | None, allowed: tuple[str, ...] = PRECISIONS, kind: str = "") -> tuple[str, ...]:
    """``"fp16,int8"`` -> ("fp16", "int8") in ``allowed``'s order (the variants of ``kind`` of model; default: image
    classifiers'); "none" / "" -> (); a one-line error names the setting."""
    if text is None or text.strip().lower() in ("", "none"):
        return ()
    got = [p.strip().lower() for p in text.split(",") if p.strip()]
    bad = [p for p in got if p not in allowed]
    if bad:
        of = f" for {kind}" if kind else ""
        raise KlasError(f"export.precisions {text!r}: unknown precision {bad[0]!r}{of} (expected a comma-separated "
                        f"list of {', '.join(allowed)}, or none)")
    return tuple(p for p in allowed if p in got)


def variant_name(parent: str, precision: str) -> str:
    return f"{parent}.{precision}"


def variant_file(parent_file: str, precision: str) -> str:
    return f"{parent_file[:-len('.onnx')]}.{precision}.onnx"


# --- conversions ---------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _quiet():
    """The quantizer and the fp16 converter log per-tensor warnings through the root logger; klas prints its own."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def to_fp16(model):
    """float16 weights and activations, float32 inputs and outputs (graph re-sorted topologically)."""
    import onnx_ir as ir
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with _quiet():
        half = convert_float_to_float16(model, keep_io_types=True)
    graph = ir.from_proto(half)
    graph.graph.sort()  # NOTE: the converter appends the input Casts after the nodes that read them
    return ir.to_proto(graph)


class _Images:
    """``CalibrationDataReader`` over normalized samples in batches of ``CALIB_BATCH``."""

    def __new__(cls, x: np.ndarray, input_name: str):
        from onnxruntime.quantization import CalibrationDataReader

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.batches = iter([{input_name: x[s:s + CALIB_BATCH]} for s in range(0, len(x), CALIB_BATCH)])

            def get_next(self):
                return next(self.batches, None)

        return Reader()


def to_int8(model, calibration: np.ndarray, per_channel: bool, input_name: str):
    """Static QDQ int8 (activations and weights int8, MinMax calibration on ``calibration``), MatMul/Gemm/Conv only."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    fresh = onnx.ModelProto()
    fresh.CopyFrom(model)  # NOTE: the quantizer may edit the model it is given; auto calls it twice
    with tempfile.TemporaryDirectory(prefix="klas-int8-") as tmp, _quiet():
        out = Path(tmp) / "int8.onnx"
        quantize_static(fresh, out, _Images(calibration, input_name), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=list(INT8_OPS), per_channel=per_channel,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
        return onnx.load(str(out))


def _normalized(data, lo: int = 0, hi: int | None = None) -> np.ndarray:
    """Samples ``lo:hi`` of a split, normalized, as one float32 array (calibration and selection sets)."""
    return np.ascontiguousarray(data.normalize(data.images[lo:hi]).numpy(), dtype=np.float32)


# --- one model's variants ------------------------------------------------------------------------------------------

def make_variants(parent: dict, parent_bytes: bytes, data, val, header: dict, options, write,
                  task=None) -> tuple[list[dict], list[dict]]:
    """The fp16 / int8 variants of the exported model ``parent`` (its manifest entry and ONNX bytes) that
    ``options.precisions`` asks for: ``(entries, rejected)``. Each accepted variant's bytes are passed to
    ``write(file, bytes)`` (the exporter stages them); rejected ones are described, not written. ``task``
    (default: image classification) scores every graph on ``data``."""
    import onnx

    from klas.tasks import get_task

    precisions = parse_precisions(options.precisions)
    if not precisions:
        return [], []
    task = task if task is not None else get_task(None)
    name_in = parent["input"]["name"]
    x_test, y_test = SplitInputs(data), data.labels
    ref = onnx_logits(parent_bytes, x_test, EVAL_BATCH, name_in)
    parent_acc = score_outputs(task, ref, y_test)
    entries, rejected = [], []
    for precision in precisions:
        model = onnx.load_from_string(parent_bytes)
        if precision == "fp16":
            out, method = to_fp16(model), dict(
                method="float16 weights and activations, float32 inputs/outputs "
                       "(onnxruntime.transformers.float16, keep_io_types)")
        else:
            out, method = _int8(model, parent_bytes, val, options, name_in)
        entry, raw = _variant_entry(parent, out, precision, method, task, x_test, y_test, ref, parent_acc, data,
                                    header, options)
        if entry["variant"]["accuracy_loss"] > options.max_accuracy_loss:
            loss = entry["variant"]["accuracy_loss"]
            rejected.append(dict(
                name=entry["name"], parent=parent["name"], precision=precision, test_acc=entry["test_acc"],
                parent_test_acc=parent_acc, accuracy_loss=loss, bytes=len(raw), parity=entry["parity"],
                reason=f"loses {loss:.2f} accuracy points against its float32 parent on {len(data)} "
                       f"{data.spec.name} test images ({entry['test_acc']:.2f}% vs {parent_acc:.2f}%), more than "
                       f"export.max_accuracy_loss = {options.max_accuracy_loss:g}"))
            continue
        if options.profile:
            entry["latency"].append(latency_record(raw, options.provider, options.threads, options.batch,
                                                   options.warmup, options.runs))
        write(entry["file"], raw)
        entries.append(entry)
    return entries, rejected


def _int8(model, parent_bytes: bytes, val, options, name_in: str):
    """The int8 model and how it was made; ``per_channel = "auto"`` builds both weight granularities and keeps the
    one agreeing more with the parent on val samples after the calibration ones (ties: per tensor, the smaller)."""
    n_cal = min(options.calibration_images, len(val))
    if n_cal < 1:
        raise KlasError("int8 variants: the val split is empty; nothing to calibrate on (export.precisions)")
    calibration = _normalized(val, 0, n_cal)
    method = dict(method="onnxruntime static quantization, QDQ, int8 activations and weights, MinMax",
                  ops=list(INT8_OPS), calibration=dict(split=val.split, images=n_cal))
    if options.per_channel != "auto":
        per_channel = options.per_channel == "on"
        return to_int8(model, calibration, per_channel, name_in), dict(method, per_channel=per_channel)
    held = val.subset(n_cal + options.per_channel_images)
    x_sel = _normalized(held, n_cal) if len(held) > n_cal else calibration
    ref = onnx_logits(parent_bytes, x_sel, EVAL_BATCH, name_in)
    tried = {}
    for per_channel in (False, True):
        q = to_int8(model, calibration, per_channel, name_in)
        agree, diff = compare(onnx_logits(q.SerializeToString(), x_sel, EVAL_BATCH, name_in), ref)
        tried[per_channel] = (q, dict(per_channel=per_channel, top1_agreement=agree, max_abs_diff=diff))
    best = max(tried, key=lambda pc: (tried[pc][1]["top1_agreement"], -tried[pc][1]["max_abs_diff"], not pc))
    return tried[best][0], dict(method, per_channel=best, per_channel_choice=dict(
        rule="auto: the higher top-1 agreement with the float32 parent on held-out val images",
        images=len(x_sel), held_out=len(held) > n_cal, candidates=[tried[False][1], tried[True][1]]))


def _variant_entry(parent: dict, model, precision: str, method: dict, task, x_test, y_test, ref, parent_acc, data,
                   header, options) -> tuple[dict, bytes]:
    import onnx

    entry = dict(name=variant_name(parent["name"], precision), file=variant_file(parent["file"], precision),
                 sha256="0" * 64, bytes=0, precision=precision, parent=parent["name"],
                 **{k: parent[k] for k in ("config", "params", "flops", "origin") if k in parent})
    del model.metadata_props[:]
    raw = model.SerializeToString()
    z = onnx_logits(raw, x_test, EVAL_BATCH, parent["input"]["name"])
    agree, diff = compare(z, ref)
    acc = score_outputs(task, z, y_test)
    entry.update(test_acc=acc, test_acc_source=f"onnxruntime on {len(y_test)} {data.spec.name} test images",
                 input=parent["input"], output=parent["output"], opset=parent["opset"],
                 parity=dict(images=len(y_test), max_abs_diff=diff, top1_agreement=agree,
                             reference=f"onnxruntime CPU: this {precision} model vs its float32 parent "
                                       f"{parent['name']!r}"),
                 variant=dict(method, parent_test_acc=parent_acc, accuracy_loss=round(parent_acc - acc, 6),
                              max_accuracy_loss=options.max_accuracy_loss),
                 latency=[])
    model.metadata_props.add(key=METADATA_KEY, value=json.dumps(embedded_entry(entry, header)))
    model.doc_string = f"klas {header['family']} zoo model {entry['name']} ({precision} variant of {parent['name']})"
    onnx.checker.check_model(model, full_check=True)
    raw = model.SerializeToString()
    entry.update(sha256=sha256_bytes(raw), bytes=len(raw))
    return entry, raw
