"""Peak resident memory of the probes stage on a streamed ImageFolder of N small images (issue 16).

    python benchmarks/streaming_memory.py --images 5000 50000 --workers 2

For each N: writes an ImageFolder of N 32 x 32 RGB PNGs (10 classes; klas holds min(10,000, N/10) of them out as
val) and a tiny 3-anchor ResNet family (random weights saved as safetensors), then runs ``klas probe`` (1 epoch,
data streamed from disk: ``[data] in_memory = "no"``) in a fresh subprocess and reads its peak RSS (``VmHWM``, main
process) and that of its DataLoader workers (``RUSAGE_CHILDREN`` max RSS). Results:
``benchmarks/results/streaming_memory.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROBE = r"""
import resource, sys, time
from klas.config import load_config
from klas.pipeline import apply_run_settings, run_pipeline
t0 = time.time()
cfg = load_config(sys.argv[1], sys.argv[3:])
apply_run_settings(cfg)
run_pipeline(cfg, sys.argv[2], until="probes", progress=False)
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print("RESULT", hwm, kids, round(time.time() - t0, 2))
"""


def make_folder(root: Path, n: int, size: int = 32, classes: int = 10, seed: int = 0) -> None:
    import numpy as np
    from PIL import Image

    if (root / ".done").is_file() and int((root / ".done").read_text()) == n:
        return
    rng = np.random.default_rng(seed)
    n_test = max(classes, n // 10)
    for split, count in (("train", n), ("val", n_test)):
        for c in range(classes):
            (root / split / f"c{c:02d}").mkdir(parents=True, exist_ok=True)
        for i in range(count):
            c = i % classes
            img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            img[:, :, c % 3] = (img[:, :, c % 3] // 2 + 20 * c).astype(np.uint8)
            Image.fromarray(img, "RGB").save(root / split / f"c{c:02d}" / f"{i:06d}.png", compress_level=1)
    (root / ".done").write_text(str(n))


def make_family(root: Path) -> Path:
    import timm
    import torch
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    lines = ['[family]', 'name = "bench-tiny-resnet"', 'num_classes = 10', '', '[family.input]', 'channels = 3',
             'size = 32', 'crop_pct = 1.0', '']
    for k, c in enumerate((4, 6, 8)):
        args = dict(layers=[1, 1, 1, 1], channels=[c, 2 * c, 4 * c, 8 * c], stem_width=c, num_classes=10)
        torch.manual_seed(k)
        save_file({n: t.contiguous() for n, t in timm.create_model("resnet18", **args).state_dict().items()},
                  str(root / f"r{c}.safetensors"))
        lines += ["[[family.anchors]]", f'name = "r{c}"', 'arch = "resnet18"',
                  f"model_args = {{ layers = [1, 1, 1, 1], channels = [{c}, {2 * c}, {4 * c}, {8 * c}], "
                  f"stem_width = {c} }}", f'weights = "r{c}.safetensors"', ""]
    (root / "family.toml").write_text("\n".join(lines))
    return root / "family.toml"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, nargs="+", default=[5000, 50000])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("/tmp/klas_streaming_memory"))
    ap.add_argument("--in-memory", default="no", choices=("no", "yes", "auto"))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "streaming_memory.json")
    args = ap.parse_args()
    fam = make_family(args.work / "family")
    rows = []
    for n in args.images:
        data = args.work / f"folder_{n}"
        t0 = time.time()
        make_folder(data, n)
        gen_s = time.time() - t0
        run = args.work / f"run_{n}_{args.in_memory}"
        subprocess.run(["rm", "-rf", str(run)], check=True)
        cfg = args.work / f"bench_{n}.toml"
        cfg.write_text(f'[run]\nfamily = "{fam}"\nthreads = 1\n[data]\ndataset = "imagefolder"\nroot = "{data}"\n'
                       f'workers = {args.workers}\nin_memory = "{args.in_memory}"\n'
                       f'[probes]\nepochs = 1\nbatch_size = 256\nstat_samples = 512\n')
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        out = subprocess.run([sys.executable, "-c", PROBE, str(cfg), str(run)], env=env, capture_output=True,
                             text=True)
        if out.returncode != 0:
            raise SystemExit(f"probes on {n} images failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
        hwm_kb, kids_kb, wall = out.stdout.split("RESULT")[1].split()
        probes = json.loads((run / "probes" / "probes.json").read_text())
        row = dict(images=n, n_train=probes["n_train"], n_val=probes["n_val"], in_memory=args.in_memory,
                   workers=args.workers, peak_rss_main_mb=round(int(hwm_kb) / 1024, 1),
                   peak_rss_worker_mb=round(int(kids_kb) / 1024, 1), probes_wall_s=float(wall),
                   folder_write_s=round(gen_s, 1))
        print(json.dumps(row), flush=True)
        rows.append(row)
    rec = dict(benchmark="streaming_memory", command="python benchmarks/streaming_memory.py " + " ".join(sys.argv[1:]),
               what="peak RSS of `klas probe` (1 epoch, 3 tiny ResNets at 32x32, batch 256) on an ImageFolder of N "
                    "32x32 RGB PNGs; main process VmHWM and the largest DataLoader worker (RUSAGE_CHILDREN)",
               machine=dict(platform=platform.platform(), cpus=os.cpu_count()), rows=rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rec, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
