"""What loses int8 accuracy on a CNN built for it: the full grid of onnxruntime static-quantization settings on the
small MobileNetV2-style network (batch norm, ReLU6, depthwise convolutions) that ``tests/test_int8_cnn.py`` trains
on Fashion-MNIST -- ops quantized (weight ops / all) x weights (per tensor, per channel, per channel at 7 bits) x
activations (int8 / uint8) x calibration (MinMax, Entropy, Percentile), and with int8 activations the same cells
with the stem and classifier kept in float32 -- each scored on test images against the
float32 graph (top-1 agreement, accuracy). The export decides on val (``klas.export.variants``); this is the
reference behind the settings it tries.

    python benchmarks/int8_cnn_grid.py [--test-images 2000] [--out benchmarks/results/int8_cnn_grid.json]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--test-images", type=int, default=2000)
    p.add_argument("--calibration-images", type=int, default=200)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/int8_cnn_grid.json"))
    a = p.parse_args()
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from tqdm import tqdm

    import test_int8_cnn as t  # the network and training of the test, not a copy
    from klas.data import load_dataset
    from klas.export import export_onnx
    from klas.export.parity import onnx_logits
    from klas.export.variants import INT8_OP_SETS, _Images, _quiet, end_weight_nodes, pre_process
    from klas_runtime.machine import machine_info

    torch.set_num_threads(1)
    data = t.train_and_export()
    test = load_dataset("fashion-mnist", "test").subset(a.test_images)
    val = load_dataset("fashion-mnist", "val").subset(a.calibration_images)
    xt, yt = test.normalize(test.images).numpy(), test.labels.numpy()
    xc = val.normalize(val.images).numpy()
    model, _ = export_onnx(data["net"].float(), torch.randn(2, 1, 28, 28), 18)
    model, pre = pre_process(model)
    ref = onnx_logits(model.SerializeToString(), xt, 500)
    rows = []
    ends = end_weight_nodes(model)
    grid = list(itertools.product(INT8_OP_SETS, ((False, False), (True, False), (True, True)),
                                  (QuantType.QInt8, QuantType.QUInt8), ("MinMax", "Entropy", "Percentile")))
    grid = [g + ((),) for g in grid] + [g + (ends,) for g in grid if g[2] == QuantType.QInt8]
    for ops, (pc, rr), act, method, keep in tqdm(grid, desc="int8 grid"):
        with tempfile.TemporaryDirectory() as tmp, _quiet(), contextlib.redirect_stdout(io.StringIO()):
            t0 = time.perf_counter()
            fresh = onnx.ModelProto()
            fresh.CopyFrom(model)  # NOTE: quantize_static rewrites a ModelProto it is given to external data
            quantize_static(fresh, Path(tmp) / "q.onnx", _Images(xc, "input"), quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=INT8_OP_SETS[ops], per_channel=pc, reduce_range=rr,
                            activation_type=act, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod[method], nodes_to_exclude=list(keep))
            secs = time.perf_counter() - t0
            raw = (Path(tmp) / "q.onnx").read_bytes()
        z = onnx_logits(raw, xt, 500)
        rows.append(dict(ops=ops, per_channel=pc, reduce_range=rr, activations=act.name, calibration=method,
                         float_nodes=list(keep),
                         top1_agreement=float((z.argmax(1) == ref.argmax(1)).mean()),
                         accuracy=float((z.argmax(1) == yt).mean() * 100), bytes=len(raw), quantize_s=secs))
    out = dict(benchmark="int8_cnn_grid", network="tests/test_int8_cnn.py TinyMobileNet", test_images=len(yt),
               calibration_images=len(xc), fp32_accuracy=float((ref.argmax(1) == yt).mean() * 100),
               pre_process=pre, machine=machine_info(), python=platform.python_version(), rows=rows)
    print(f"fp32 accuracy {out['fp32_accuracy']:.2f}% on {len(yt)} test images")
    print("| ops | weights | activations | calibration | stem/classifier | top-1 agree | accuracy % |\n"
          "|---|---|---|---|---|---|---|")
    for r in rows:
        w = "per channel, 7 bit" if r["reduce_range"] else ("per channel" if r["per_channel"] else "per tensor")
        print(f"| {r['ops']} | {w} | {r['activations']} | {r['calibration']} | "
              f"{'float32' if r['float_nodes'] else 'int8'} | {r['top1_agreement']:.4f} | "
              f"{r['accuracy']:.2f} |")
    a.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"-> {a.out}")


if __name__ == "__main__":
    main()
