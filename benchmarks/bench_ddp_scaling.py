"""Data-parallel scaling of the heaviest CPU stage, supernetwork finetuning, on fmnist-deit (shipped weights):
the same global batch and step budget under ``torchrun --nproc-per-node N`` (gloo, one torch thread per rank) for
each N, timed by the stage itself (``supernet.json`` ``wall_s``: the training loop, without stitch-layer fitting).

    .venv/bin/python benchmarks/bench_ddp_scaling.py [--procs 1 2] [--steps 30] [--batch-size 128]

Writes ``benchmarks/results/ddp_scaling_<machine>.json`` (throughput per N, speed-up, efficiency, the command and
the machine) and a PNG next to it. On a shared 2-core box the 2-rank figure is bounded by the cores other jobs use.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STITCHES = [("fmnist-deit-ti", 5, "fmnist-deit-s", 5), ("fmnist-deit-s", 7, "fmnist-deit-b", 7),
            ("fmnist-deit-ti", 3, "fmnist-deit-b", 3)]


def worker(run: Path, sel: Path, steps: int, batch_size: int) -> None:
    """One rank (launched by torchrun): finetune for ``steps`` steps; rank 0 writes supernet.json."""
    import torch

    torch.set_num_threads(1)
    from klas.stages.s4_finetune import FinetuneConfig, finetune_supernet
    from klas.stitch import FitCfg

    cfg = FinetuneConfig(epochs=1, steps_per_epoch=steps, batch_size=batch_size, val_images=0, augment=True,
                         init=FitCfg(samples=256, batch_size=256), train_subset=8192)
    finetune_supernet(run, cfg, seed=0, selection_path=sel, family="fmnist-deit", progress=False)


def _selection(path: Path) -> Path:
    sel = dict(family="fmnist-deit", method="bench", params={}, anchors=["fmnist-deit-ti", "fmnist-deit-b"],
               anchor_pairs=[], candidates=[],
               selected=[dict(source=s, i=i, target=t, j=j) for s, i, t, j in STITCHES])
    path.write_text(json.dumps(sel))
    return path


def launch(n: int, tmp: Path, sel: Path, steps: int, batch_size: int) -> dict:
    run = tmp / f"run_{n}"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n), __file__,
           "--worker", str(run), str(sel), str(steps), str(batch_size)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    total = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{n} ranks failed:\n{proc.stderr[-3000:]}")
    meta = json.loads((run / "finetune" / "supernet.json").read_text())
    assert meta["world_size"] == n
    return dict(procs=n, train_wall_s=meta["wall_s"], job_wall_s=round(total, 2),
                images_per_s=round(steps * batch_size / meta["wall_s"], 1))


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.bar([str(r["procs"]) for r in rows], [r["images_per_s"] for r in rows], color="C0")
    for k, r in enumerate(rows):
        ax.text(k, r["images_per_s"], f"x{r['speedup']:.2f}", ha="center", va="bottom")
    ax.set_xlabel("gloo processes (1 thread each)")
    ax.set_ylabel("training images / s")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        sel = _selection(Path(d) / "selection.json")
        for n in args.procs:
            rows.append(launch(n, Path(d), sel, args.steps, args.batch_size))
            print(f"{n} process(es): {rows[-1]['images_per_s']} images/s ({rows[-1]['train_wall_s']}s training)",
                  flush=True)
    base = rows[0]["images_per_s"] / rows[0]["procs"]
    for r in rows:
        r["speedup"] = round(r["images_per_s"] / rows[0]["images_per_s"], 3)
        r["efficiency"] = round(r["images_per_s"] / (base * r["procs"]), 3)
    import torch

    machine = dict(platform=platform.platform(), processor=platform.processor() or platform.machine(),
                   cpus=os.cpu_count(), torch=torch.__version__, backend="gloo", threads_per_rank=1,
                   load_avg_at_end=os.getloadavg())
    out = dict(benchmark="ddp_scaling", stage="supernet finetuning", family="fmnist-deit", steps=args.steps,
               global_batch=args.batch_size, configs=2 + len(STITCHES), rows=rows, machine=machine,
               command=" ".join([".venv/bin/python", "benchmarks/bench_ddp_scaling.py", *sys.argv[1:]]),
               date=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"ddp_scaling_{(platform.machine() or 'cpu')}_cpu{os.cpu_count()}"
    stem.with_suffix(".json").write_text(json.dumps(out, indent=2) + "\n")
    plot(rows, stem.with_suffix(".png"), f"supernet finetuning, fmnist-deit, global batch {args.batch_size} (gloo)")
    print(f"wrote {stem}.json")


if __name__ == "__main__":
    main()
