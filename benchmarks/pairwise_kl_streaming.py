"""Streaming all-pairs softmax KL at vocabulary sizes (32k-128k classes): ``klas.ops.PairwiseKL`` fed chunks of
samples (C++ op) against the same stream through the chunked plain-PyTorch product form, at equal peak memory.

    python benchmarks/pairwise_kl_streaming.py                       # C = 32000, 65536, 128000; 1 thread
    python benchmarks/pairwise_kl_streaming.py --classes 32000 --samples 64 --chunks 8 4 2 --threads 2

Each (method, C, chunk) runs in a fresh subprocess that generates its chunks on the fly (no logits are kept) and
reports the rise of its peak RSS (VmHWM) over the RSS before the first chunk, and its best-of-3 time in the KL
calls over the whole stream (generating the chunks is not timed). The PyTorch form materializes log-softmax, exp
and products of a chunk, so at equal peak memory it must take smaller chunks; ``equal_memory`` pairs each C++ run
with the fastest PyTorch run whose peak is no
larger.
Results: benchmarks/results/pairwise_kl_streaming.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHILD = r"""
import sys, time, torch
from klas.ops import PairwiseKL
from klas.ops.baselines import pairwise_kl_product
method, n_rows, n, c, chunk, threads = sys.argv[1], *map(int, sys.argv[2:])
torch.set_num_threads(threads)
def rss(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key))
def stream():
    gen = torch.Generator().manual_seed(0)
    acc = PairwiseKL(n_rows, n_rows, impl="cpp") if method == "cpp" else None
    total = torch.zeros(n_rows, n_rows, dtype=torch.float64)
    spent = 0.0  # seconds in the KL calls only (generating the chunks is not timed)
    for s in range(0, n, chunk):
        a = torch.randn(n_rows, min(chunk, n - s), c, generator=gen).mul_(3.0)
        b = torch.randn(n_rows, min(chunk, n - s), c, generator=gen).mul_(3.0)
        t0 = time.perf_counter()
        if acc is not None:
            acc.update(a, b)
        else:  # the chunked PyTorch form: per-chunk mean times chunk size, summed in float64
            total += pairwise_kl_product(a, b).double() * a.shape[1]
        spent += time.perf_counter() - t0
        del a, b
    (acc.compute() if acc is not None else (total / n).float())
    return spent
base = rss("VmRSS")
best = min(stream() for _ in range(3))
print("RESULT", (rss("VmHWM") - base) / 1024, best)
"""


def measure(method: str, rows: int, n: int, c: int, chunk: int, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", CHILD, method, str(rows), str(n), str(c), str(chunk), str(threads)],
                         env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{method} C={c} chunk={chunk} failed:\n{out.stderr[-2000:]}")
    peak_mb, secs = out.stdout.split("RESULT")[1].split()
    return dict(method=method, classes=c, chunk=chunk, peak_rise_mb=round(float(peak_mb), 1), best_s=float(secs))


def main() -> None:
    from tqdm import tqdm

    sys.path.insert(0, str(Path(__file__).parent))
    from pairwise_kl_sweep import machine_info

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--classes", type=int, nargs="+", default=[32000, 65536, 128000])
    ap.add_argument("--rows", type=int, default=12, help="nA = nB")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--chunks", type=int, nargs="+", default=[8, 4, 2, 1], help="samples per update (largest first)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "pairwise_kl_streaming.json")
    args = ap.parse_args()
    runs = []
    todo = [(m, c, k) for c in args.classes for m in ("cpp", "torch") for k in args.chunks]
    for m, c, k in tqdm(todo, desc="streaming KL", unit="run"):
        runs.append(measure(m, args.rows, args.samples, c, k, args.threads))
        tqdm.write(json.dumps(runs[-1]))
    equal = []
    for r in (r for r in runs if r["method"] == "cpp" and r["chunk"] == args.chunks[0]):
        fit = [t for t in runs if t["method"] == "torch" and t["classes"] == r["classes"]
               and t["peak_rise_mb"] <= r["peak_rise_mb"]]
        best = min(fit, key=lambda t: t["best_s"]) if fit else None
        equal.append(dict(classes=r["classes"], cpp_chunk=r["chunk"], cpp_peak_mb=r["peak_rise_mb"],
                          cpp_s=r["best_s"], torch_chunk=best and best["chunk"],
                          torch_peak_mb=best and best["peak_rise_mb"], torch_s=best and best["best_s"],
                          speedup=best and round(best["best_s"] / r["best_s"], 2)))
    rec = dict(benchmark="pairwise_kl_streaming", command="python benchmarks/pairwise_kl_streaming.py "
               + " ".join(sys.argv[1:]), machine=machine_info("cpu"), rows=args.rows, samples=args.samples,
               threads=args.threads, runs=runs, equal_memory=equal)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(rec, indent=1) + "\n")
    tmp.replace(args.out)
    print(json.dumps(equal, indent=1))


if __name__ == "__main__":
    main()
