"""Reduced-precision variants of an exported zoo model: int8 (static QDQ quantization) and fp16.

For every float32 model the export writes, ``make_variants`` builds

* an **int8** variant: ``onnxruntime.quantization.quantize_static`` in QDQ format (int8 weights and activations)
  on the graph ``quant_pre_process`` made (shape inference + onnxruntime's basic fusions, e.g. batch norm into the
  convolution; recorded whether it changed the graph), calibrated on ``calibration_images`` samples of the *val*
  split. How is decided on val, per model, not assumed: a small grid -- which ops are quantized (the weight ops
  MatMul / Gemm / Conv only, or every op the quantizer knows), weights per channel or per tensor, then the
  calibration method (MinMax, Entropy, Percentile) on the best of those, then that one with the first and last
  weight op (stem and classifier) kept in float32 (``float_nodes``) -- each candidate scored on val images the
  calibration did not see (top-1 agreement with the float32 parent, then val accuracy, then the smaller max
  |logit difference| and file). Weights: per tensor, per channel, or per channel at 7 bits (``reduce_range``).
  Every candidate's figures are in the manifest (``variant.int8_choice``). Measured by
  ``benchmarks/int8_cnn_grid.py`` on a small MobileNetV2-style network (batch norm, ReLU6, depthwise
  convolutions): per-channel 8-bit weights lose most on this AVX2 CPU (top-1 agreement 0.90-0.96: without VNNI
  onnxruntime's u8 x s8 products saturate), 7-bit ones do not (0.98-0.99); every op rather than the weight ops
  only helps that network a little, while on the fmnist-deit ViTs the weight ops only win; uint8 activations (for
  the non-negative outputs of ReLU6) were never better than int8 and are not a candidate;
* an **fp16** variant: float16 weights and activations with float32 inputs / outputs
  (``onnxruntime.transformers.float16.convert_float_to_float16(keep_io_types=True)``; its graph is re-sorted
  topologically, as the converter appends the input casts after their consumers).

Each is checked with ``onnx.checker`` (full check), its test score measured with onnxruntime on every sample of
``data`` (the export passes the full test split) through the task (``task.predict`` / ``task.score``) and compared
with its parent's onnxruntime outputs on the same samples (top-1 agreement, max |logit difference|, and the paired
sign test of the zoo's admission, ``klas.metrics.sign_test``, both ways: ``variant.significance``, which the
runtime's pick reads). A variant that loses more than ``max_accuracy_loss`` points against its parent is not
written; it is returned as rejected, with the reason.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from klas.errors import KlasError
from klas.export.parity import SplitInputs, compare, onnx_logits, score_outputs
from klas_runtime.manifest import METADATA_KEY, embedded_entry, sha256_bytes

PRECISIONS = ("fp16", "int8")  # in the order they are built
INT8_OPS = ("MatMul", "Gemm", "Conv")
INT8_OP_SETS = {"weights": list(INT8_OPS), "all": None}  # None: every op type the quantizer supports
CALIBRATION_METHODS = ("MinMax", "Entropy", "Percentile")
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
    """``CalibrationDataReader`` over normalized samples in equal batches of at most ``CALIB_BATCH``."""

    def __new__(cls, x: np.ndarray, input_name: str):
        from onnxruntime.quantization import CalibrationDataReader

        class Reader(CalibrationDataReader):
            def __init__(self):
                # NOTE: equal batches: the Entropy / Percentile histogram collectors stack them
                size = max(d for d in range(1, CALIB_BATCH + 1) if len(x) % d == 0)
                self.batches = iter([{input_name: x[s:s + size]} for s in range(0, len(x), size)])

            def get_next(self):
                return next(self.batches, None)

        return Reader()


def to_int8(model, calibration: np.ndarray, per_channel: bool, input_name: str, ops: str = "weights",
            method: str = "MinMax", reduce_range: bool = False, cache: Path | None = None,
            exclude: tuple[str, ...] = ()):
    """Static QDQ int8 (activations and weights int8) calibrated on ``calibration`` by ``method`` (MinMax, Entropy,
    Percentile); ``ops``: "weights" (MatMul / Gemm / Conv, ``INT8_OPS``) or "all" (every op the quantizer has);
    ``reduce_range``: 7-bit weights (onnxruntime's advice for CPUs without VNNI, whose u8 x s8 products saturate);
    ``cache``: onnxruntime's calibration cache file (ranges computed once per method; the first call for a file
    must use the widest ``ops``, as its ranges are reused for every later call); ``exclude``: names of nodes kept
    in float32."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if ops not in INT8_OP_SETS:
        raise KlasError(f"int8 ops {ops!r}: expected one of {', '.join(INT8_OP_SETS)}")
    fresh = onnx.ModelProto()
    fresh.CopyFrom(model)  # NOTE: the quantizer may edit the model it is given; the grid calls it several times
    with tempfile.TemporaryDirectory(prefix="klas-int8-") as tmp, _quiet(), contextlib.redirect_stdout(io.StringIO()):
        out = Path(tmp) / "int8.onnx"  # NOTE: Entropy / Percentile print their progress; klas prints its own
        quantize_static(fresh, out, _Images(calibration, input_name), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=INT8_OP_SETS[ops], per_channel=per_channel, reduce_range=reduce_range,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod[method], nodes_to_exclude=list(exclude),
                        calibration_cache_path=str(cache) if cache is not None else None)
        return onnx.load(str(out))


def end_weight_nodes(model) -> tuple[str, ...]:
    """The names of the first and the last weight op (``INT8_OPS``) in graph order: the stem convolution, which
    sees the raw input's range, and the classifier, whose outputs are the logits -- the two nodes quantization
    guides most often keep in float."""
    named = [n.name for n in model.graph.node if n.op_type in INT8_OPS and n.name]
    return tuple(dict.fromkeys(named[:1] + named[-1:])) if len(named) > 2 else ()


def pre_process(model) -> tuple["onnx.ModelProto", dict]:  # noqa: F821
    """``quant_pre_process`` (shape inference, onnxruntime's basic graph fusions) as onnxruntime's quantization
    guide asks, and what it changed (node counts); on failure the model as it was, with the reason."""
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        with tempfile.TemporaryDirectory(prefix="klas-pre-") as tmp, _quiet():
            src, out = Path(tmp) / "in.onnx", Path(tmp) / "pre.onnx"
            onnx.save(model, str(src))  # NOTE: given a ModelProto it writes the weights as external data
            quant_pre_process(str(src), str(out), skip_symbolic_shape=True)
            pre = onnx.load(str(out))
    except Exception as e:  # noqa: BLE001 -- the quantizer runs without it (recorded)
        first = str(e).splitlines()[0][:200] if str(e) else ""
        return model, dict(applied=False, reason=f"{type(e).__name__}: {first}")
    return pre, dict(applied=True, nodes_before=len(model.graph.node), nodes_after=len(pre.graph.node))


def _normalized(data, lo: int = 0, hi: int | None = None) -> np.ndarray:
    """Samples ``lo:hi`` of a split, normalized, as one float32 array (calibration and selection sets)."""
    return np.ascontiguousarray(data.normalize(data.images[lo:hi]).numpy(), dtype=np.float32)


# --- one model's variants ------------------------------------------------------------------------------------------

def make_variants(parent: dict, parent_bytes: bytes, data, val, header: dict, options, write,
                  task=None, ref: np.ndarray | None = None) -> tuple[list[dict], list[dict]]:
    """The fp16 / int8 variants of the exported model ``parent`` (its manifest entry and ONNX bytes) that
    ``options.precisions`` asks for: ``(entries, rejected)``. Each accepted variant's bytes are passed to
    ``write(file, bytes)`` (the exporter stages them); rejected ones are described, not written. ``task``
    (default: image classification) scores every graph on ``data``; ``ref``: the parent's onnxruntime outputs on
    ``data`` when the caller has them (the parity check's), else computed here."""
    import onnx

    from klas.tasks import get_task

    precisions = parse_precisions(options.precisions)
    if not precisions:
        return [], []
    task = task if task is not None else get_task(None)
    name_in = parent["input"]["name"]
    x_test, y_test = SplitInputs(data), data.labels
    if ref is None or len(ref) != len(x_test):
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
            out, method = _int8(model, parent_bytes, val, options, name_in, task)
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
        write(entry["file"], raw)
        entries.append(entry)
    return entries, rejected


class _Quantizer:
    """``to_int8`` for a list of ``(ops, (per_channel, reduce_range), method, exclude)`` keys of one model, run in
    up to one forked process per core (``klas.workers.worker_count``): quantize_static's per-channel weight code
    is a Python loop over channels (1.3 of a 2.2 s call on EfficientNet-Lite0, profiled), so the grid's calls share
    the cores; each call is the one a sequential run would make, results in the order asked. Without ``fork``, with
    one core or inside a klas worker: in-process."""

    def __init__(self, model, calibration: np.ndarray, input_name: str, caches: str):
        self.job = (model, calibration, input_name, caches)
        self.pool = None

    def __enter__(self):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        from klas.workers import worker_count

        n = worker_count(4)  # 1 in a klas worker process (the export's members), which may not fork
        if n > 1:
            global _JOB
            _JOB = self.job  # NOTE: the forked workers inherit the model instead of unpickling it per call
            self.pool = ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("fork"))
        return self

    def __call__(self, keys) -> Iterator[bytes]:
        if self.pool is None or len(keys) < 2:
            return (_quantize(key, self.job) for key in keys)
        return self.pool.map(_quantize, keys)  # NOTE: in order, as each is done: scoring overlaps the rest

    def __exit__(self, *exc):
        global _JOB
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)
        _JOB = None


_JOB = None  # the forked workers' (model, calibration, input name, cache folder)


def _quantize(key, job=None) -> bytes:
    model, calibration, input_name, caches = job if job is not None else _JOB
    o, (pc, rr), m, keep = key
    q = to_int8(model, calibration, pc, input_name, o, m, rr, Path(caches) / f"{m}.json", keep)
    return q.SerializeToString()


def _int8(model, parent_bytes: bytes, val, options, name_in: str, task):
    """The int8 model and how it was made, chosen on val (module docstring): the grid over ops x per_channel
    (MinMax), then the calibration methods on the best of those; ``options.per_channel`` / ``int8_ops`` /
    ``calibration_method`` other than "auto" fix that choice."""
    import onnx

    n_cal = min(options.calibration_images, len(val))
    if n_cal < 1:
        raise KlasError("int8 variants: the val split is empty; nothing to calibrate on (export.precisions)")
    calibration = _normalized(val, 0, n_cal)
    model, pre = pre_process(model)
    fixed = dict(per_channel=options.per_channel, ops=getattr(options, "int8_ops", "auto"),
                 method=getattr(options, "calibration_method", "auto"))
    # weights: (per_channel, reduce_range); per channel at 8 bits saturates on AVX2 (measured), 7 bits does not
    pcs = ((False, False), (True, False), (True, True)) if fixed["per_channel"] == "auto" else (
        ((True, False), (True, True)) if fixed["per_channel"] == "on" else ((False, False),))
    op_sets = ("all", "weights") if fixed["ops"] == "auto" else (fixed["ops"],)  # widest first: the cache
    methods = CALIBRATION_METHODS if fixed["method"] == "auto" else (
        next(m for m in CALIBRATION_METHODS if m.lower() == fixed["method"].lower()),)
    base = dict(method="onnxruntime static quantization (quantize_static), QDQ, int8 activations and weights",
                pre_process=pre, calibration=dict(split=val.split, images=n_cal))
    grid = [(o, pc, methods[0]) for o in op_sets for pc in pcs]
    if len(grid) == 1 and len(methods) == 1:
        o, (pc, rr), m = grid[0]
        return to_int8(model, calibration, pc, name_in, o, m, rr), dict(base, ops=o, per_channel=pc,
                                                                       reduce_range=rr, calibration_method=m,
                                                                       float_nodes=[])
    held = val.subset(n_cal + options.per_channel_images)
    sel = held if len(held) > n_cal else val.subset(n_cal)
    lo = n_cal if len(held) > n_cal else 0
    x_sel, y_sel = _normalized(sel, lo), sel.labels[lo:]
    ref = onnx_logits(parent_bytes, x_sel, EVAL_BATCH, name_in)
    tried = {}

    def score(keys):  # in the order given: ties go to the earlier candidate
        for key, raw in zip(keys, quantize(keys)):
            o, (pc, rr), m, keep = key
            z = onnx_logits(raw, x_sel, EVAL_BATCH, name_in)
            agree, diff = compare(z, ref)
            tried[key] = (raw, dict(ops=o, per_channel=pc, reduce_range=rr, calibration_method=m,
                                    float_nodes=list(keep), top1_agreement=agree,
                                    val_acc=score_outputs(task, z, y_sel), max_abs_diff=diff, bytes=len(raw)))

    def rank(key):
        c = tried[key][1]
        return (c["top1_agreement"], c["val_acc"], -c["max_abs_diff"], -c["bytes"])

    with tempfile.TemporaryDirectory(prefix="klas-calib-") as caches, \
            _Quantizer(model, calibration, name_in, caches) as quantize:  # one calibration per method, reused
        grid = [key + ((),) for key in grid]
        score(grid[:1])  # the widest ops first, alone: it writes the calibration cache the others read
        score(grid[1:])
        best = max(tried, key=rank)
        score([(best[0], best[1], m, ()) for m in methods[1:]])  # the other methods on the best (MinMax's)
        best = max(tried, key=rank)
        ends = end_weight_nodes(model)
        if ends and tried[best][1]["top1_agreement"] < 1.0:  # the sensitive ends kept in float, on the best so far
            score([best[:3] + (ends,)])
    best = max(tried, key=rank)
    o, (pc, rr), m, keep = best
    return onnx.load_from_string(tried[best][0]), dict(
        base, ops=o, per_channel=pc, reduce_range=rr, calibration_method=m, float_nodes=list(keep), int8_choice=dict(
        rule="the highest top-1 agreement with the float32 parent on val images the calibration did not see "
             "(then val accuracy, smaller max |logit difference|, smaller file)",
        images=len(x_sel), held_out=lo > 0, candidates=[c for _, c in tried.values()]))


def paired_test(task, z: np.ndarray, ref: np.ndarray, targets, options) -> dict:
    """The zoo admission's paired one-sided sign test (``klas.metrics.sign_test``) of the variant's per-sample
    quality against its parent's on the same test samples, both ways, at ``options.significance`` (the runtime's
    pick counts an accuracy difference only when ``verdict`` is not "not significant")."""
    import torch

    from klas.metrics import sign_test

    targets = torch.as_tensor(targets)
    mine = task.quality(task.predict(torch.from_numpy(z))[0], targets)
    theirs = task.quality(task.predict(torch.from_numpy(ref))[0], targets)
    up, down = sign_test(mine, theirs), sign_test(theirs, mine)
    alpha = float(getattr(options, "significance", 0.05))
    verdict = ("more accurate" if up["p_value"] < alpha else "less accurate" if down["p_value"] < alpha
               else "not significant")
    return dict(test="paired one-sided exact sign test (McNemar), each way, on the test samples",
                samples=int(len(targets)), only_variant=up["only_candidate"], only_parent=up["only_reference"],
                p_more_accurate=up["p_value"], p_less_accurate=down["p_value"], alpha=alpha, verdict=verdict)


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
    significance = paired_test(task, z, ref, y_test, options)
    entry.update(test_acc=acc, test_acc_source=f"onnxruntime on {len(y_test)} {data.spec.name} test images",
                 input=parent["input"], output=parent["output"], opset=parent["opset"],
                 parity=dict(images=len(y_test), max_abs_diff=diff, top1_agreement=agree,
                             reference=f"onnxruntime CPU: this {precision} model vs its float32 parent "
                                       f"{parent['name']!r}"),
                 variant=dict(method, parent_test_acc=parent_acc, accuracy_loss=round(parent_acc - acc, 6),
                              max_accuracy_loss=options.max_accuracy_loss, significance=significance),
                 latency=[])
    model.metadata_props.add(key=METADATA_KEY, value=json.dumps(embedded_entry(entry, header)))
    model.doc_string = f"klas {header['family']} zoo model {entry['name']} ({precision} variant of {parent['name']})"
    onnx.checker.check_model(model, full_check=True)
    raw = model.SerializeToString()
    entry.update(sha256=sha256_bytes(raw), bytes=len(raw))
    return entry, raw
