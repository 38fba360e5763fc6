"""Sweep of the all-pairs softmax KL over (nA, nB, N, C): every implementation against the unfused PyTorch baselines
and a bandwidth floor measured in the same run, written as JSON + PNG under benchmarks/results/.

    python benchmarks/pairwise_kl_sweep.py                      # CPU (torch's thread count; --threads to set it)
    python benchmarks/pairwise_kl_sweep.py --device cuda        # GPU: triton, cuda, baselines, floor
    python benchmarks/pairwise_kl_sweep.py --shapes 12x12x10000x100 --repeats 9

Per shape and implementation: median seconds over --repeats timed runs (after one warm-up), achieved GB/s counting
each input byte once, the ratio to the floor, and the largest error against the float64 reference. The floor is a
copy of the inputs (every byte read once, and written once) timed the same way. Baselines: ``product`` is the
vectorized float32 PyTorch formulation (log-softmax, then sum P log P - P @ log Q^T), ``loop`` one F.kl_div per pair.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

from klas.io import save_json
from klas.ops import available_impls, pairwise_kl_sum
from klas.ops.baselines import pairwise_kl_loop, pairwise_kl_product

CPU_SHAPES = ["12x12x10000x100", "12x12x2000x1000", "24x24x10000x100", "4x4x50000x10", "36x36x2000x100"]
GPU_SHAPES = ["12x12x10000x100", "24x24x50000x1000", "36x36x10000x1000", "12x12x50000x100", "4x4x200000x100"]
LOOP_MAX_PAIRS = 1296  # the per-pair loop is timed only up to 36 x 36 pairs


def machine_info(device: str) -> dict:
    info = {"device": device, "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        info["cpu"] = platform.processor()
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            pass
    return info


def timed(fn, device: str, repeats: int) -> list[float]:
    """Seconds per call (one warm-up call first); CUDA calls are timed with events."""
    fn()
    out = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            out.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return out


def candidates(device: str, a: torch.Tensor, b: torch.Tensor) -> dict:
    """name -> callable returning the [nA, nB] mean KL (None for the floor)."""
    n = a.shape[1]
    impls = [i for i in available_impls(device) if i != "reference"]
    out = {i: (lambda i=i: pairwise_kl_sum(a, b, 1.0, impl=i) / n) for i in impls}
    out["product"] = lambda: pairwise_kl_product(a, b)
    if a.shape[0] * b.shape[0] <= LOOP_MAX_PAIRS:
        out["loop"] = lambda: pairwise_kl_loop(a, b)
    out["reference"] = lambda: pairwise_kl_sum(a, b, 1.0, impl="reference") / n
    dst_a, dst_b = torch.empty_like(a), torch.empty_like(b)
    out["floor_copy"] = lambda: (dst_a.copy_(a), dst_b.copy_(b)) and None
    return out


def run(args: argparse.Namespace) -> dict:
    from tqdm import tqdm

    device = args.device
    shapes = [tuple(int(v) for v in s.split("x")) for s in (args.shapes or (GPU_SHAPES if device == "cuda"
                                                                               else CPU_SHAPES))]
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    rows = []
    gen = torch.Generator(device=device)
    gen.seed()
    n_impls = len([i for i in available_impls(device) if i != "reference"]) + 3
    total = sum(n_impls + (s[0] * s[1] <= LOOP_MAX_PAIRS) for s in shapes)
    bar = tqdm(total=total, desc=f"pairwise KL sweep ({device})", unit="run")
    for shape in shapes:  # one shape's tensors at a time
        n_a, n_b, n, c = shape
        a = torch.randn(n_a, n, c, device=device, generator=gen).mul_(args.scale).to(dtype)
        b = torch.randn(n_b, n, c, device=device, generator=gen).mul_(args.scale).to(dtype)
        fns = candidates(device, a, b)
        ref = fns["reference"]().double()
        nbytes = a.numel() * a.element_size() + b.numel() * b.element_size()
        times = {}
        for name, fn in fns.items():
            bar.set_postfix_str(f"{'x'.join(map(str, shape))} {name}")
            times[name] = timed(fn, device, args.repeats)
            err = None if name == "floor_copy" else float((fn().double() - ref).abs().max())
            rows.append(dict(shape=list(shape), dtype=args.dtype, impl=name, median_s=statistics.median(times[name]),
                             min_s=min(times[name]), repeats=args.repeats,
                             gb_per_s=nbytes / statistics.median(times[name]) / 1e9, max_abs_err_vs_float64=err))
            bar.update()
        floor = statistics.median(times["floor_copy"])
        # the speed-up is quoted against the FASTEST plain-PyTorch form measured in this same run
        torch_best = min(statistics.median(times[k]) for k in ("product", "loop") if k in times)
        for r in rows:
            if r["shape"] == list(shape):
                r["x_floor"] = r["median_s"] / floor
                r["speedup_vs_fastest_torch"] = torch_best / r["median_s"]
        if "cpp" in times:
            print(f"{'x'.join(map(str, shape))}: cpp {statistics.median(times['cpp']) * 1e3:.1f} ms, product "
                  f"{statistics.median(times['product']) * 1e3:.1f} ms -> product / cpp = "
                  f"{statistics.median(times['product']) / statistics.median(times['cpp']):.2f}x "
                  f"({torch.get_num_threads()} threads)", file=sys.stderr)
        del a, b, fns
        if device == "cuda":
            torch.cuda.empty_cache()
    bar.close()
    return {"benchmark": "pairwise_softmax_kl sweep", "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.executable).name] + sys.argv), "machine": machine_info(device),
            "scale": args.scale, "results": rows}


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    shapes = list(dict.fromkeys("x".join(map(str, r["shape"])) for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(7, 1.6 * len(shapes) * len(impls) / 3), 4.5))
    width = 0.8 / len(impls)
    for k, impl in enumerate(impls):
        xs, ys = [], []
        for s, shape in enumerate(shapes):
            hit = [r for r in rows if r["impl"] == impl and "x".join(map(str, r["shape"])) == shape]
            if hit:
                xs.append(s + (k - (len(impls) - 1) / 2) * width)
                ys.append(hit[0]["median_s"] * 1e3)
        ax.bar(xs, ys, width, label=impl, hatch="//" if impl == "floor_copy" else None)
    ax.set_xticks(range(len(shapes)), [s.replace("x", " x ") for s in shapes], rotation=10)
    ax.set_yscale("log")
    ax.set_ylabel("median time per call (ms, log scale)")
    ax.set_xlabel("nA x nB x N x C")
    m = report["machine"]
    ax.set_title(f"all-pairs softmax KL, {report['results'][0]['dtype']} - "
                 f"{m.get('gpu') or m.get('cpu', '?')} ({m['torch_threads']} threads)", fontsize=9)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--shapes", nargs="*", help="nAxnBxNxC, e.g. 12x12x10000x100 (default: a preset per device)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--scale", type=float, default=3.0, help="logit standard deviation")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, help="torch (and OpenMP) threads on the CPU (default: torch's)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--tag", default="", help="suffix of the output file names (keeps other runs' files)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", RuntimeWarning)  # fallback notes; the machine block records what ran
    report = run(args)
    stem = args.out / f"pairwise_kl_sweep_{args.device}_{args.dtype}{'_' + args.tag if args.tag else ''}"
    save_json(report, stem.with_suffix(".json"))
    plot(report, stem.with_suffix(".png"))
    print(f"wrote {stem}.json and {stem}.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
