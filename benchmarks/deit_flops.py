"""Per-image FLOPs of DeiT-Ti/S/B at 224 x 224 (forward, and forward + backward), counted by torch's flop counter
(FLOPs = 2 x MACs; matmuls, convolutions, attention), the basis of the README's ImageNet-scale wall-time estimate.

    python benchmarks/deit_flops.py     # -> benchmarks/results/deit_flops.json

Random weights (no download): FLOPs do not depend on the weights.
"""
from __future__ import annotations

import json
from pathlib import Path

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

ARCHS = {"deit-ti": "deit_tiny_patch16_224", "deit-s": "deit_small_patch16_224", "deit-b": "deit_base_patch16_224"}


def count(model, x, backward: bool) -> int:
    with FlopCounterMode(display=False) as fc:
        out = model(x)
        if backward:
            out.sum().backward()
    return fc.get_total_flops()


def main() -> None:
    torch.set_num_threads(1)
    rows = {}
    for name, arch in ARCHS.items():
        m = timm.create_model(arch)
        x = torch.randn(1, 3, 224, 224)
        with torch.no_grad():
            fwd = count(m.eval(), x, False)
        fb = count(m.train(), x, True)
        rows[name] = dict(arch=arch, params=sum(p.numel() for p in m.parameters()), fwd_gflops=round(fwd / 1e9, 3),
                          fwd_bwd_gflops=round(fb / 1e9, 3))
        print(name, rows[name], flush=True)
    out = Path(__file__).resolve().parent / "results" / "deit_flops.json"
    out.write_text(json.dumps(dict(benchmark="deit_flops", command="python benchmarks/deit_flops.py",
                                   convention="torch.utils.flop_counter, FLOPs = 2 x MACs, one 224x224 image",
                                   models=rows), indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
