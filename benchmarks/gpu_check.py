"""The one prepared GPU check (issue 30), for when a GPU machine is lent; <= 8 minutes on one H100/H200:

    python benchmarks/gpu_check.py                 # on the GPU machine: writes benchmarks/results/gpu_*.json
    python benchmarks/gpu_check.py --dry-run       # CPU only, tiny sizes, writes to a temp dir (or KLAS_GPU_CHECK_DRY=1)

Steps, each timed and recorded even when it fails (the next one still runs; the time budget skips the rest):
  1. build   pip install --no-deps --no-build-isolation -e . with TORCH_CUDA_ARCH_LIST=9.0; klas._C has CUDA kernels
  2. kernels tests/test_ops_gpu.py, then Triton and CUDA (dry: cpp) against the float64 reference on awkward shapes,
             fp32/fp16/bf16, near-identical distributions and extreme logits
  3. bench   24x24x50000x1000 fp32/bf16 and 12x12x256x32000 fp32/bf16: the kernels against the read floor (one
             fp32 sum over both inputs, and bytes / 3.35 TB/s) and the torch forms (product, per-pair loop)
  4. stages  probes .. finetune of the demo family at a small budget on CUDA (finetune: bf16 autocast) and on the
             CPU: images/s of probes and finetune, and the scores tables compared (dry: CPU once)
  5. nccl    a one-GPU torchrun of the distributed path (klas.distributed: init, PairwiseKL all_reduce) (dry: gloo)
The dry run exercises every step's code on the CPU; it does not run pip (that would rebuild the shared klas/_C.so).
Fashion-MNIST for step 4: KLAS_FASHION_MNIST, else build/fashion-mnist (copy it there and carry it to the machine).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BIG = [(24, 24, 50000, 1000, "fp32"), (24, 24, 50000, 1000, "bf16"), (12, 12, 256, 32000, "fp32"),
       (12, 12, 256, 32000, "bf16")]
TINY = [(5, 3, 64, 100, "fp32"), (5, 3, 64, 100, "bf16")]
os.environ.pop("TRITON_INTERPRET", None)  # the compiled Triton kernel, never the interpreter


class Check:
    def __init__(self, dry: bool, out: Path, budget_s: float):
        self.dry, self.out, self.deadline, self.t0 = dry, out, time.time() + budget_s, time.time()
        self.steps: dict[str, dict] = {}

    def step(self, name: str, fn) -> None:
        if time.time() > self.deadline:
            self.steps[name] = dict(status="skipped", why="time budget spent")
            print(f"[gpu_check] {name}: skipped (time budget spent)", flush=True)
            return
        t = time.time()
        print(f"[gpu_check] {name} ...", flush=True)
        try:
            res = dict(status="ok", **(fn() or {}))
        except Exception as e:  # recorded, the other steps still run
            res = dict(status="failed", error=f"{type(e).__name__}: {str(e).strip().splitlines()[0][:500] if str(e).strip() else ''}",
                       trace=traceback.format_exc()[-3000:])
        res["seconds"] = round(time.time() - t, 1)
        self.steps[name] = res
        print(f"[gpu_check] {name}: {res['status']} in {res['seconds']}s"
              + (f" -- {res['error']}" if "error" in res else ""), flush=True)


def _device():
    import torch
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.cuda.get_device_name(0)
    return torch.device("cpu"), platform.processor() or platform.machine()


def _sh(cmd: list[str], timeout: float, env: dict | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        tail = (r.stdout + r.stderr).strip().splitlines()
        raise RuntimeError(f"{' '.join(cmd[:6])} exited {r.returncode}: {tail[-1] if tail else ''}\n"
                           + "\n".join(tail[-40:]))
    return r


# --- 1. build ------------------------------------------------------------------------------------------------------
def build(ck: Check) -> dict:
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-e", "."]
    env = dict(os.environ, TORCH_CUDA_ARCH_LIST="9.0")
    if not ck.dry:
        _sh(cmd, 420, env)
    from klas.ops import native  # first import of klas in this process: after the build
    cpu, cuda = native.has_kernel("cpu"), native.has_kernel("cuda")
    if not cpu or (not ck.dry and not cuda):
        raise RuntimeError(f"klas._C kernels: cpu={cpu} cuda={cuda} (expected True, True)")
    return dict(command=" ".join(cmd[2:]) + " (TORCH_CUDA_ARCH_LIST=9.0)", ran=not ck.dry, cpu_kernel=cpu,
                cuda_kernel=cuda)


# --- 2. kernels ----------------------------------------------------------------------------------------------------
def kernels(ck: Check) -> dict:
    import torch
    sys.path.insert(0, str(ROOT / "tests"))
    from test_ops_common import HALF_RTOL, assert_kl_close, kl_reference, logits
    from klas.ops import available_impls, pairwise_softmax_kl
    pytest_line = "not run in the dry run: every test in tests/test_ops_gpu.py needs CUDA"
    if not ck.dry:
        env = dict({k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, KLAS_REQUIRE_EXT="1")
        r = _sh([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_ops_gpu.py"], 360, env)
        pytest_line = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
    dev, _ = _device()
    impls = [i for i in (("cpp",) if ck.dry else ("triton", "cuda")) if i in available_impls(dev)]
    if not impls:
        raise RuntimeError(f"no kernel implementation available on {dev} (available: {available_impls(dev)})")
    rng = torch.Generator().manual_seed(30)
    cases = [(3, 5, 7, 13, 1.0, 0.0), (1, 1, 1, 1, 1.0, 0.0), (33, 2, 3, 129, 50.0, 0.0), (4, 4, 9, 100, 1.0, 1000.0)]
    if not ck.dry:
        cases += [(17, 9, 30, 1001, 0.01, 0.0), (40, 33, 300, 1000, 3.0, 0.0), (12, 12, 16, 32000, 2.0, 0.0)]
    rows = []
    for impl in impls:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for n_a, n_b, n, c, scale, offset in cases:
                if dtype == torch.float16 and offset:
                    continue  # 1000 + noise is not representable finely in fp16
                for near in (False, True):
                    a = logits(rng, n_a, n, c, scale) + offset
                    b = a[:n_b] + 1e-3 * torch.randn(a[:n_b].shape, generator=rng) if near and n_b <= n_a \
                        else logits(rng, n_b, n, c, scale) + offset
                    a, b = a.to(dtype), b.to(dtype)
                    got = pairwise_softmax_kl(a.to(dev), b.to(dev), 0.7, impl=impl).cpu()
                    ref = kl_reference(a, b, 0.7)
                    err = float((got.double().numpy() - ref).__abs__().max())
                    ok = True
                    try:
                        assert_kl_close(got, ref, **({} if dtype == torch.float32 else dict(rtol=HALF_RTOL)))
                    except AssertionError:
                        ok = False
                    rows.append(dict(impl=impl, dtype=str(dtype).split(".")[-1], shape=[n_a, n_b, n, c],
                                     scale=scale, offset=offset, near_identical=near, max_abs_err=err, ok=ok))
    bad = [x for x in rows if not x["ok"]]
    if bad:
        raise RuntimeError(f"{len(bad)} of {len(rows)} accuracy cases out of tolerance, first: {bad[0]}")
    return dict(pytest=pytest_line, impls=impls, cases=len(rows), accuracy=rows)


# --- 3. bench ------------------------------------------------------------------------------------------------------
def _timer(dev, fn, reps: int) -> float:
    import torch
    fn()  # warm-up (compiles the Triton kernel)
    best = float("inf")
    for _ in range(reps):
        if dev.type == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            best = min(best, s.elapsed_time(e) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
    return best


def bench(ck: Check) -> dict:
    import torch
    from klas.ops import available_impls, pairwise_kl_sum
    from klas.ops.baselines import pairwise_kl_loop, pairwise_kl_product
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_static
    dev, name = _device()
    impls = [i for i in (("cpp",) if ck.dry else ("triton", "cuda")) if i in available_impls(dev)]
    rows = []
    for n_a, n_b, n, c, dt in TINY if ck.dry else BIG:
        if time.time() > ck.deadline:
            break
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dt]
        g = torch.Generator(device=dev).manual_seed(0)
        a = (torch.randn(n_a, n, c, device=dev, generator=g) * 3).to(dtype)
        b = (torch.randn(n_b, n, c, device=dev, generator=g) * 3).to(dtype)
        fns = {i: (lambda i=i: pairwise_kl_sum(a, b, impl=i)) for i in impls}
        fns["torch_product"] = lambda: pairwise_kl_product(a, b)
        fns["torch_loop"] = lambda: pairwise_kl_loop(a, b)
        fns["read_floor_sum"] = lambda: (a.sum(dtype=torch.float32), b.sum(dtype=torch.float32))
        t = {}
        for k, fn in fns.items():
            try:
                t[k] = _timer(dev, fn, 1 if k == "torch_loop" else 5)
            except torch.OutOfMemoryError:
                t[k] = None
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        torch_best = min((v for k, v in t.items() if k.startswith("torch_") and v), default=None)
        est = gpu_static.roofline(n_a, n_b, n, c, dt)
        row = dict(shape=[n_a, n_b, n, c], dtype=dt, seconds=t, fastest_torch_s=torch_best,
                   datasheet_floor_s=est["bytes_read"] / gpu_static.H100_SXM["hbm_bytes_per_s"],
                   bytes_read=est["bytes_read"])
        for i in impls:
            if t.get(i):
                row[f"{i}_vs_read_floor_sum"] = t[i] / t["read_floor_sum"]
                row[f"{i}_vs_datasheet_floor"] = t[i] / row["datasheet_floor_s"]
                row[f"{i}_speedup_vs_fastest_torch"] = torch_best / t[i] if torch_best else None
        rows.append(row)
        del a, b
    _write(ck, "bench", dict(device=name, goals="kernel <= 1.3x read floor, >= 5x fastest torch form at "
                             "24x24x50000x1000", rows=rows))
    return dict(rows=len(rows))


# --- 4. stages -----------------------------------------------------------------------------------------------------
def _fmnist() -> str | None:
    for cand in (os.environ.get("KLAS_FASHION_MNIST"), "/usr/share/datasets/fashion-mnist",
                 str(ROOT / "build" / "fashion-mnist")):
        if cand and Path(cand).is_dir():
            return cand
    return None


STAGES = ("probes", "scores", "selection", "finetune")


def _run_stages(run: Path, cfg: Path, cpu: bool, data: str, until: str) -> dict:
    env = dict(os.environ, KLAS_FASHION_MNIST=data)
    if cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    _sh([sys.executable, "-m", "klas", "run", str(cfg), "--run-dir", str(run), "--until", until], 300, env)
    done = STAGES[:STAGES.index(until) + 1]
    return {s: json.loads((run / s / "stage.json").read_text()).get("wall_s") for s in done}


def stages(ck: Check) -> dict:
    import torch
    from klas.io import load_tensors
    from klas.stages.s2_scores import SCORES_FILE
    data = _fmnist()
    if data is None:
        raise RuntimeError("no Fashion-MNIST: set KLAS_FASHION_MNIST or copy it to build/fashion-mnist")
    # The dry run stops after the probes (2 shared cores: the later stages' CLI path is tests/test_pipeline.py's).
    probe_imgs, ft_steps, ft_batch, until = (64, 2, 32, "probes") if ck.dry else (8192, 40, 128, "finetune")
    val = 64 if ck.dry else 1000
    toml = (f"[run]\nthreads = {1 if ck.dry else 8}\n[probes]\nepochs = 1\ntrain_subset = {probe_imgs}\n"
            f"val_subset = {val}\nstat_samples = 64\n[scores]\nval_subset = {val}\ndm_samples = 50\n"
            "[selection]\nnum_buckets = 2\n"
            f"[finetune]\namp = \"auto\"\nsteps_per_epoch = {ft_steps}\nbatch_size = {ft_batch}\n"
            f"train_subset = {probe_imgs}\nval_images = 0\n[finetune.init]\nsamples = 64\n")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "small.toml"
        cfg.write_text(toml)
        runs = {"cpu": Path(tmp) / "cpu"}
        walls = {"cpu": _run_stages(runs["cpu"], cfg, True, data, until)}
        if not ck.dry:
            runs["cuda"] = Path(tmp) / "cuda"
            walls["cuda"] = _run_stages(runs["cuda"], cfg, False, data, until)
        other = runs.get("cuda", runs["cpu"])  # the dry run compares the CPU run with itself (the code path)
        have = (runs["cpu"] / "scores" / SCORES_FILE).exists()
        sa, sb = (load_tensors(r / "scores" / SCORES_FILE) if have else {} for r in (runs["cpu"], other))
        diffs = {}
        for k in sorted(set(sa) & set(sb)):
            x, y = sa[k].double(), sb[k].double()
            if x.shape == y.shape and x.is_floating_point() and torch.isfinite(x).all():
                diffs[k] = float(((x - y).abs().max() / x.abs().max().clamp_min(1e-12)))
        sel = [(r / "selection" / "selection.json").read_text() if (r / "selection" / "selection.json").exists()
               else None for r in (runs["cpu"], other)]
    fps = {dev: dict(probes_images_per_s=probe_imgs / w["probes"] if w.get("probes") else None,
                     finetune_images_per_s=ft_steps * ft_batch / w["finetune"] if w.get("finetune") else None,
                     wall_s=w) for dev, w in walls.items()}
    res = dict(config=toml, throughput=fps, scores_rel_max_diff=diffs, same_selection=None if sel[0] is None else sel[0] == sel[1],
               within_bf16_tolerance=all(v <= 2e-2 for v in diffs.values()),
               note="images/s = training images the stage processes / its wall time (stage overhead included)")
    _write(ck, "stages", dict(res, device=_device()[1]))
    return {k: v for k, v in res.items() if k != "config"}


# --- 5. nccl -------------------------------------------------------------------------------------------------------
_DIST = """
import dataclasses, json, sys, torch
from klas import distributed
from klas.ops import PairwiseKL
# One rank: klas.distributed joins a group only when WORLD_SIZE > 1 and its helpers are no-ops in one process, so
# the group is created here and info() is told it is distributed: klas's flattened all_reduce then goes through the
# backend (NCCL on CUDA tensors), where a SUM over one rank must give the tables back unchanged.
backend = sys.argv[1]
torch.distributed.init_process_group(backend)
di = distributed.init()
real_info = distributed.info
distributed.info = lambda: dataclasses.replace(real_info(), world=2)
g = torch.Generator().manual_seed(1)
a = torch.randn(6, 40, 77, generator=g)
acc, full = PairwiseKL(6), PairwiseKL(6)
acc.update(a[:, di.rank::di.world].to(di.device))
full.update(a.to(di.device))
distributed.all_reduce_pairwise_kl([acc])
distributed.barrier()
ok = torch.allclose(acc.compute().cpu(), full.compute().cpu(), rtol=1e-6, atol=1e-9) and acc.count == full.count
print(json.dumps(dict(rank=di.rank, world=di.world, device=str(di.device), sum_device=str(acc.sum.device),
                      backend=torch.distributed.get_backend(), equal=bool(ok))))
torch.distributed.destroy_process_group()
"""


def nccl(ck: Check) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "dist_check.py"
        script.write_text(_DIST)
        backend = "gloo" if ck.dry else "nccl"
        if ck.dry:  # a plain process with torchrun's variables: the agent's start-up is seconds of a 2-core box
            env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(29500 + os.getpid() % 1000))
            r = _sh([sys.executable, str(script), backend], 180, env)
        else:
            r = _sh([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                     str(script), backend], 180)
    line = [x for x in r.stdout.splitlines() if x.startswith("{")]
    if not line:
        raise RuntimeError(f"no result line from the torchrun job: {r.stdout[-500:]}")
    res = json.loads(line[-1])
    want = "gloo" if ck.dry else "nccl"
    if res["backend"] != want or not res["equal"] or (not ck.dry and not res["sum_device"].startswith("cuda")):
        raise RuntimeError(f"distributed check: {res} (expected backend {want}, equal tables)")
    return res


def _write(ck: Check, what: str, obj: dict) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", _device()[1].lower()).strip("-")[:40] or "device"
    path = ck.out / f"gpu_{what}_{slug}.json"
    ck.out.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=ck.out, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(dict(obj, dry_run=ck.dry, command="python benchmarks/gpu_check.py"
                       + (" --dry-run" if ck.dry else "")), f, indent=1)
    os.replace(tmp, path)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU only, tiny sizes, results to a temp dir")
    p.add_argument("--out", type=Path, help="results folder (default benchmarks/results; dry run: a temp dir)")
    p.add_argument("--budget-s", type=float, default=450.0, help="skip the remaining steps after this many seconds")
    p.add_argument("--steps", default="build,kernels,bench,stages,nccl", help="comma-separated subset")
    args = p.parse_args(argv)
    dry = args.dry_run or os.environ.get("KLAS_GPU_CHECK_DRY") == "1"
    steps = {"build": build, "kernels": kernels, "bench": bench, "stages": stages, "nccl": nccl}
    chosen = [s.strip() for s in args.steps.split(",") if s.strip()]
    if not chosen or any(s not in steps for s in chosen):
        print(f"gpu_check: --steps {args.steps!r}: expected a comma-separated subset of {','.join(steps)}",
              file=sys.stderr)
        return 2
    out = args.out or (Path(tempfile.mkdtemp(prefix="klas-gpu-check-")) if dry else RESULTS)
    if dry and out.resolve() == RESULTS.resolve():
        print(f"gpu_check: --out {out}: a dry run never writes to benchmarks/results", file=sys.stderr)
        return 2
    if not dry:
        import torch
        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device (torch.cuda.is_available() is False); use --dry-run on the CPU",
                  file=sys.stderr)
            return 2
    ck = Check(dry, out, args.budget_s)
    for s in chosen:
        ck.step(s, lambda s=s: steps[s](ck))
    summary = dict(device=_device()[1], steps=ck.steps, total_s=round(time.time() - ck.t0, 1))
    path = _write(ck, "check", summary)
    failed = [s for s, r in ck.steps.items() if r["status"] != "ok"]
    print(f"[gpu_check] {len(ck.steps) - len(failed)}/{len(ck.steps)} steps ok -> {path}"
          + (f"; not ok: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
