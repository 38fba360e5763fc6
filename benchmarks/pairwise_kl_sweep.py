"""Sweep of the all-pairs softmax KL over (nA, nB, N, C): every implementation against the unfused PyTorch baselines
and a bandwidth floor measured in the same run, written as JSON + PNG under benchmarks/results/.

    python benchmarks/pairwise_kl_sweep.py --threads 1 2        # CPU: issue 29's four shapes at 1 and 2 threads
    python benchmarks/pairwise_kl_sweep.py --device cuda        # GPU: triton, cuda, baselines, floor
    python benchmarks/pairwise_kl_sweep.py --shapes 12x12x10000x100 --repeats 9

Per shape, thread count and implementation: median and best seconds over --repeats timed runs (after one warm-up),
achieved GB/s counting each input byte once, the ratio to the floor, and the largest error against the float64
reference (computed once per shape). ``speedup_table`` holds, per shape and thread count, the fused kernels' speed-up
against the fastest plain-PyTorch form timed in the same run (best of --repeats each); ``machine`` names the CPU, its
vector extensions (/proc/cpuinfo flags) and which C++ kernel ran (avx2 or portable). The floor is a
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
from klas.ops import available_impls, native, pairwise_kl_sum
from klas.ops.baselines import pairwise_kl_loop, pairwise_kl_product

# issue 29's table: the C++ op must be >= 2x the fastest plain-PyTorch form at each, at 1 and 2 threads
CPU_SHAPES = ["12x12x10000x100", "12x12x2000x1000", "24x24x5000x1000", "12x12x256x32000"]
GPU_SHAPES = ["12x12x10000x100", "24x24x50000x1000", "36x36x10000x1000", "12x12x50000x100", "4x4x200000x100"]
LOOP_MAX_PAIRS = 1296  # the per-pair loop is timed only up to 36 x 36 pairs
LOOP_MAX_WORK = 1.5e8  # ... and nA * nB * N * C <= this; beyond, it is 2-4x slower than the product form
VECTOR_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "amx_tile")


def machine_info(device: str) -> dict:
    info = {"device": device, "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    info["cpu"] = platform.processor()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        info["cpu"] = next(ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name"))
        flags = set(next(ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")))
        info["vector_extensions"] = [f for f in VECTOR_FLAGS if f in flags]
    except (OSError, StopIteration):
        pass
    if native.load():
        info["cpp_kernel"] = "avx2" if "avx2" in info.get("vector_extensions", []) and \
            os.environ.get("KLAS_KL_CPU_PORTABLE") != "1" else "portable"
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
    if a.shape[0] * b.shape[0] <= LOOP_MAX_PAIRS and a.numel() * b.shape[0] <= LOOP_MAX_WORK:
        out["loop"] = lambda: pairwise_kl_loop(a, b)
    dst_a, dst_b = torch.empty_like(a), torch.empty_like(b)
    out["floor_copy"] = lambda: (dst_a.copy_(a), dst_b.copy_(b)) and None
    return out


def run(args: argparse.Namespace) -> dict:
    from tqdm import tqdm

    device = args.device
    shapes = [tuple(int(v) for v in s.split("x")) for s in (args.shapes or (GPU_SHAPES if device == "cuda"
                                                                               else CPU_SHAPES))]
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    thread_counts = args.threads or [torch.get_num_threads()]
    rows, table = [], []
    gen = torch.Generator(device=device)
    gen.seed()
    bar = tqdm(total=len(shapes) * len(thread_counts), desc=f"pairwise KL sweep ({device})", unit="config")
    for shape in shapes:  # one shape's tensors at a time
        n_a, n_b, n, c = shape
        name_s = "x".join(map(str, shape))
        a = torch.randn(n_a, n, c, device=device, generator=gen).mul_(args.scale).to(dtype)
        b = torch.randn(n_b, n, c, device=device, generator=gen).mul_(args.scale).to(dtype)
        fns = candidates(device, a, b)
        ref = (pairwise_kl_sum(a, b, 1.0, impl="reference") / n).double()  # once: the float64 error yardstick
        nbytes = a.numel() * a.element_size() + b.numel() * b.element_size()
        for threads in thread_counts:
            if device == "cpu":
                torch.set_num_threads(threads)
            times = {}
            for name, fn in fns.items():
                bar.set_postfix_str(f"{name_s} {threads}thr {name}")
                times[name] = timed(fn, device, args.repeats)
                err = None if name == "floor_copy" else float((fn().double() - ref).abs().max())
                rows.append(dict(shape=list(shape), dtype=args.dtype, impl=name, threads=threads,
                                 median_s=statistics.median(times[name]), min_s=min(times[name]),
                                 repeats=args.repeats, gb_per_s=nbytes / min(times[name]) / 1e9,
                                 max_abs_err_vs_float64=err))
            bar.update()
            # speed-ups against the FASTEST plain-PyTorch form measured in this same run, best of --repeats each
            torch_best = min(min(times[k]) for k in ("product", "loop") if k in times)
            for r in rows:
                if r["shape"] == list(shape) and r["threads"] == threads:
                    r["x_floor"] = r["min_s"] / min(times["floor_copy"])
                    r["speedup_vs_fastest_torch"] = torch_best / r["min_s"]
            fused = [i for i in ("cpp", "triton", "cuda") if i in times]
            table.append(dict(shape=name_s, threads=threads, fastest_torch_s=torch_best,
                              **{f"{i}_s": min(times[i]) for i in fused},
                              **{f"{i}_speedup": torch_best / min(times[i]) for i in fused}))
            tqdm.write(f"{name_s} {threads} thr: " + ", ".join(f"{k} {min(v) * 1e3:.1f} ms" for k, v in times.items())
                       + " | " + ", ".join(f"{i} {torch_best / min(times[i]):.2f}x" for i in fused))
        del a, b, fns
        if device == "cuda":
            torch.cuda.empty_cache()
    bar.close()
    return {"benchmark": "pairwise_softmax_kl sweep", "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.executable).name] + sys.argv), "machine": machine_info(device),
            "scale": args.scale, "speedup_table": table, "results": rows}


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["results"] if r["threads"] == report["results"][0]["threads"]]  # first count
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
                 f"{m.get('gpu') or m.get('cpu', '?')} ({rows[0]['threads']} threads)", fontsize=9)
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
    p.add_argument("--threads", type=int, nargs="*", help="torch (and OpenMP) thread counts on the CPU, each timed in "
                   "the same run (default: torch's)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--tag", default="", help="suffix of the output file names (keeps other runs' files)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device")
    warnings.simplefilter("ignore", RuntimeWarning)  # fallback notes; the machine block records what ran
    report = run(args)
    stem = args.out / f"pairwise_kl_sweep_{args.device}_{args.dtype}{'_' + args.tag if args.tag else ''}"
    save_json(report, stem.with_suffix(".json"))
    plot(report, stem.with_suffix(".png"))
    print(f"wrote {stem}.json and {stem}.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
