"""Where the export spends its time: the embedded fmnist-deit anchors exported as ``klas run`` exports them (all
test images, val for the variants), with timers around each piece of ``klas.export`` (exporter, self-check, parity,
scoring, the int8 grid and its ``quantize_static`` calls, fp16, the variants' scoring, profiling). Run once with
``PRECISIONS = fp16,int8`` and once with ``none`` for the ratio; seconds and shares go to stdout and a JSON.
``--workers 2`` exports the members in two forked workers as ``klas run`` does on this machine (the total only).

    python benchmarks/export_time.py OUT_DIR [PRECISIONS] [--workers N] [--json benchmarks/results/export_time_fmnist-deit.json]

``--family efficientnet-lite --size 64`` times an EfficientNet-style family instead: timm's
``tf_efficientnet_lite0/1/2`` (batch norm, ReLU6, depthwise convolutions; randomly initialised, as nothing downloads
here: the time does not depend on the weights) with a 10-class head on Fashion-MNIST resized to SIZE x SIZE x 3, on
the first ``--test-images`` test images (the issue's user had 397).
"""
from __future__ import annotations

import argparse
import collections
import functools
import json
import time
from pathlib import Path

T: dict = collections.defaultdict(float)


def wrap(mod, name: str, label: str) -> None:
    f = getattr(mod, name)

    @functools.wraps(f)
    def timed(*a, **k):
        t = time.perf_counter()
        try:
            return f(*a, **k)
        finally:
            T[label] += time.perf_counter() - t

    setattr(mod, name, timed)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("precisions", nargs="?", default="fp16,int8")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--family", default="fmnist-deit", choices=("fmnist-deit", "efficientnet-lite"))
    p.add_argument("--size", type=int, default=64, help="efficientnet-lite: input size (64-224)")
    p.add_argument("--test-images", type=int, default=None, help="test images (default: all)")
    p.add_argument("--workers", type=int, default=1, help="members exported at once (export.workers); above 1 the "
                   "pieces run in forked workers, whose timers do not reach this process: only the total counts")
    a = p.parse_args()
    import torch

    import klas
    import klas.export.graph as G
    import klas.export.member as M
    import klas.export.parity as P
    import klas.export.variants as V
    from klas.data import load_dataset
    from klas.export import export_models
    from klas.stages.s6_export import ExportConfig
    from klas.stitch import StitchConfig, StitchedNet
    from klas_runtime.machine import machine_info

    for mod, name, label in [(M, "export_onnx", "exporter (incl. self-check)"), (G, "_dynamo_onnx", "dynamo export"),
                             (P, "self_check", "self-check"), (M, "check_parity", "parity vs float64"),
                             (M, "graph_score", "float32 score"), (M, "latency_record", "profiling"),
                             (M, "make_variants", "variants"), (V, "_int8", "int8 grid"),
                             (V, "to_int8", "quantize_static calls"), (V, "pre_process", "quant_pre_process"),
                             (V, "to_fp16", "fp16 convert"), (V, "_variant_entry", "variants' test scoring")]:
        wrap(mod, name, label)
    torch.set_num_threads(1)
    if a.family == "fmnist-deit":
        test, val = load_dataset("fashion-mnist", "test"), load_dataset("fashion-mnist", "val")
        fam = klas.create_family("fmnist-deit", pretrained=True)
    else:
        from klas.data import open_split
        from klas.families import AnchorCfg, FamilyCfg
        from klas.families._registry import register_family

        torch.manual_seed(0)
        cfg = register_family(FamilyCfg(
            name="efficientnet-lite", anchors=tuple(AnchorCfg(f"lite{k}", f"tf_efficientnet_lite{k}") for k in range(3)),
            input_shape=(3, a.size, a.size), dataset="fashion-mnist", num_classes=10))
        fam = klas.create_family(cfg.name, pretrained=False, num_classes=10)
        test, val = open_split(fam, "test"), open_split(fam, "val")
    test = test.subset(a.test_images)
    members = [(StitchConfig.anchor(v.name), StitchedNet(v, -1, v, -1, None), None) for v in fam]
    t = time.perf_counter()
    export_models(members, a.out, a.family, test, ExportConfig(provider="cpu", precisions=a.precisions,
                                                                          workers=a.workers),
                  progress=True, val=val if a.precisions != "none" else None)
    total = time.perf_counter() - t
    print(f"total {total:.1f} s ({a.precisions})")
    for k, v in T.items():
        print(f"  {k:32s} {v:7.1f} s {100 * v / total:5.1f} %")
    if a.json:
        a.json.write_text(json.dumps(dict(family=a.family, size=a.size if a.family != "fmnist-deit" else 28,
                                          test_images=len(test), precisions=a.precisions, workers=a.workers,
                                          total_s=total, seconds=dict(T),
                                          machine=machine_info()), indent=1) + "\n")


if __name__ == "__main__":
    main()
