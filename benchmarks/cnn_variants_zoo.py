"""The precision-variant table of a CNN family, as a user with one would get it: two timm MobileNetV2 anchors
(``mobilenetv2_035`` / ``_050``: batch norm, ReLU6, depthwise convolutions; 1 x 28 x 28 input, 10 classes) trained
here by klas's own anchor trainer on Fashion-MNIST, exported with their fp16 and int8 variants exactly as ``klas
run`` exports (all test images; int8 settings chosen on val), profiled on this CPU (1 thread, batch 1 and 32) and
tabled by ``benchmarks/variants_table.py`` -- what each precision costs and buys here and what ``klas pick`` offers.

    python benchmarks/cnn_variants_zoo.py OUT_DIR [--epochs 2] [--train-images 20000]
        [--md benchmarks/results/zoo_variants_fmnist-mobilenetv2.md]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

FAMILY = "fmnist-mobilenetv2"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--train-images", type=int, default=20000)
    p.add_argument("--threads", type=int, default=2, help="threads for training and export")
    p.add_argument("--md", type=Path, default=Path(f"benchmarks/results/zoo_variants_{FAMILY}.md"))
    a = p.parse_args()
    import torch

    import klas
    from klas.data import load_dataset
    from klas.export import export_models
    from klas.families import AnchorCfg, FamilyCfg
    from klas.families._registry import get_family_cfg, register_family
    from klas.families.trainer import Recipe, train_family
    from klas.stages.s6_export import ExportConfig
    from klas.stitch import StitchConfig, StitchedNet
    from klas_runtime.profile import profile_zoo

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import variants_table

    torch.set_num_threads(a.threads)
    args = dict(in_chans=1, num_classes=10)
    register_family(FamilyCfg(
        name=FAMILY, anchors=(AnchorCfg("mnv2-035", "mobilenetv2_035", args), AnchorCfg("mnv2-050", "mobilenetv2_050", args)),
        input_shape=(1, 28, 28), dataset="fashion-mnist", num_classes=10,
        input=get_family_cfg("fmnist-deit").input))  # Fashion-MNIST's statistics, no resize or crop
    weights = a.out / "weights"
    train_family(FAMILY, weights, Recipe(epochs=a.epochs, train_subset=a.train_images))  # resumes / skips when done
    fam = klas.create_family(FAMILY, pretrained=True, weights=weights)
    test, val = load_dataset("fashion-mnist", "test"), load_dataset("fashion-mnist", "val")
    members = [(StitchConfig.anchor(v.name), StitchedNet(v, -1, v, -1, None), None) for v in fam]
    zoo = a.out / "zoo"
    export_models(members, zoo, fam, test, ExportConfig(provider="cpu", precisions="fp16,int8", threads=1),
                  progress=True, val=val)
    profile_zoo(zoo, providers=["cpu"], threads=[1], batches=[1, 32], progress=True)
    md, data = variants_table.table(zoo)
    a.md.write_text(md)
    a.md.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    print(md)


if __name__ == "__main__":
    main()
