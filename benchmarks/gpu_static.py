"""Static inspection of klas's GPU kernels for sm_90 (H100), on a machine without a GPU:

    .venv/bin/python benchmarks/gpu_static.py            # every reachable Triton config + the CUDA kernel
    .venv/bin/python benchmarks/gpu_static.py --configs saturated --out /tmp/s.json   # the subset make test checks

* Triton (kernels/pairwise_kl.py): the kernel has no @triton.autotune; its launcher (``_launch_config``) picks
  BLOCK_I, BLOCK_J, BLOCK_C and num_warps from the shape. Every configuration it can return is enumerated by calling
  it over a grid of shapes, and each is compiled with ``triton.compile(ASTSource(...), GPUTarget("cuda", 90, 32))``
  for float32 / float16 / bfloat16 inputs (pointers 16-byte aligned, as torch allocates them). The configuration
  each roofline shape below actually launches is also compiled with the JIT's shape specialization (integers
  divisible by 16 marked so), i.e. the binary that shape would run.
* CUDA (csrc/pairwise_kl_cuda.cu): nvcc -cubin -arch=sm_90 with the flags torch's CUDAExtension adds, cached under
  build/gpu_static/ by a hash of the sources, flags and nvcc version.

From each cubin: registers per thread, static shared memory, local memory and stack (``cuobjdump -res-usage``),
spill stores / loads (STL / LDL instructions in the SASS), and the theoretical occupancy on an H100 computed from
registers, shared memory and threads per block. Writes benchmarks/results/gpu_static.json (atomically) and exits 1
when any configuration spills or cannot launch. The roofline figures are ESTIMATES from datasheet numbers, not
measurements (no GPU here).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # compiled, not interpreted: triton.compile must lower to a cubin

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "gpu_static.json"
CACHE = ROOT / "build" / "gpu_static"
TARGET = ("cuda", 90, 32)

# H100 (compute capability 9.0) per-SM limits, CUDA C Programming Guide, "Technical Specifications per Compute
# Capability" and the occupancy calculator's allocation rules.
H100 = dict(regs_per_sm=65536, max_regs_per_block=65536, max_regs_per_thread=255, reg_alloc_unit_per_warp=256,
            smem_per_sm=228 * 1024, max_smem_per_block=227 * 1024, smem_reserved_per_block=1024,
            smem_alloc_unit=128, max_threads_per_sm=2048, max_threads_per_block=1024, max_blocks_per_sm=32,
            warp_size=32)
# H100 SXM5 datasheet throughput (132 SMs at 1.98 GHz boost), for the roofline estimate only.
H100_SXM = dict(name="H100 SXM5 80GB", sms=132, clock_hz=1.98e9, hbm_bytes_per_s=3.35e12,
                fp32_flops_per_s=66.9e12,  # 128 FP32 lanes/SM/clk, an FMA counted as 2 flops
                fp32_instr_per_s=132 * 128 * 1.98e9,  # one FADD/FMUL/FFMA per lane per clock
                sfu_exp_per_s=132 * 16 * 1.98e9)  # MUFU.EX2: 16 results/SM/clk on cc 9.0
ROOFLINE_SHAPES = [(24, 24, 50000, 1000, "fp32"), (24, 24, 50000, 1000, "bf16"), (12, 12, 256, 32000, "fp32"),
                   (12, 12, 256, 32000, "bf16")]
DTYPES = {"fp32": 4, "fp16": 2, "bf16": 2}


def _ceil(x: int, unit: int) -> int:
    return -(-x // unit) * unit


def occupancy(regs: int, smem: int, threads: int, limits: dict = H100) -> dict:
    """Blocks per SM and theoretical occupancy (active warps / max warps) for one kernel; ``launchable`` is False,
    with the reasons, when a single block exceeds a per-block limit."""
    why = []
    if threads < 1 or threads > limits["max_threads_per_block"]:
        why.append(f"{threads} threads per block (max {limits['max_threads_per_block']})")
    if regs > limits["max_regs_per_thread"]:
        why.append(f"{regs} registers per thread (max {limits['max_regs_per_thread']})")
    warps = -(-max(threads, 1) // limits["warp_size"])
    regs_per_warp = _ceil(max(regs, 1) * limits["warp_size"], limits["reg_alloc_unit_per_warp"])
    if regs_per_warp * warps > limits["max_regs_per_block"]:
        why.append(f"{regs} registers x {threads} threads = {regs_per_warp * warps} per block "
                   f"(max {limits['max_regs_per_block']})")
    if smem > limits["max_smem_per_block"]:
        why.append(f"{smem} bytes of shared memory per block (max {limits['max_smem_per_block']})")
    if why:
        return dict(launchable=False, why=why, blocks_per_sm=0, active_warps=0, occupancy=0.0, limiter=None)
    max_warps = limits["max_threads_per_sm"] // limits["warp_size"]
    smem_block = _ceil(smem, limits["smem_alloc_unit"]) + limits["smem_reserved_per_block"]
    by = {"warps": max_warps // warps, "blocks": limits["max_blocks_per_sm"],
          "registers": limits["regs_per_sm"] // (regs_per_warp * warps),
          "shared_memory": limits["smem_per_sm"] // smem_block}
    limiter = min(by, key=by.get)
    blocks = by[limiter]
    return dict(launchable=True, why=[], blocks_per_sm=blocks, active_warps=blocks * warps,
                occupancy=round(blocks * warps / max_warps, 4), limiter=limiter)


# --- tools -------------------------------------------------------------------------------------------------------
def tool(name: str) -> str:
    """A CUDA binary utility: the one bundled with Triton first (it matches Triton's ptxas), else CUDA's."""
    import triton
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if bundled.exists():
        return str(bundled)
    for cand in [shutil.which(name), *sorted(Path("/usr/local").glob(f"cuda*/bin/{name}"))]:
        if cand and Path(cand).exists():
            return str(cand)
    raise SystemExit(f"gpu_static: {name} not found (looked in triton/backends/nvidia/bin, PATH, /usr/local/cuda*/bin)")


def nvcc() -> str:
    for cand in [os.environ.get("NVCC"), shutil.which("nvcc"), *sorted(Path("/usr/local").glob("cuda*/bin/nvcc"))]:
        if cand and Path(cand).exists():
            return str(cand)
    raise SystemExit("gpu_static: nvcc not found (NVCC, PATH, /usr/local/cuda*/bin); it builds csrc/*.cu for sm_90")


def _version(exe: str) -> str:
    out = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    return out[-1] if out else "?"


def inspect_cubin(path: Path) -> dict[str, dict]:
    """Per function in the cubin: REG, SHARED (static), LOCAL, STACK from cuobjdump -res-usage, and the number of
    local-memory stores / loads (STL / LDL: register spills) in its SASS, counted where there is a stack frame."""
    res = subprocess.run([tool("cuobjdump"), "-res-usage", str(path)], capture_output=True, text=True, check=True)
    funcs, name = {}, None
    for line in res.stdout.splitlines():
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            name = m.group(1)
            continue
        if name and "REG:" in line:
            f = {k.lower(): int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line)}
            funcs[name] = dict(regs=f["reg"], static_smem_bytes=f["shared"], local_bytes=f["local"],
                               stack_bytes=f["stack"], spill_stores=0, spill_loads=0)
            name = None
    if not any(f["stack_bytes"] or f["local_bytes"] for f in funcs.values()):
        return funcs  # spills live in the stack frame: none without one (and -sass costs ~1 s per cubin)
    sass = subprocess.run([tool("cuobjdump"), "-sass", str(path)], capture_output=True, text=True, check=True)
    name = None
    for line in sass.stdout.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            name = m.group(1)
        elif name in funcs:
            funcs[name]["spill_stores"] += bool(re.search(r"\bSTL(\.\w+)*\s", line))
            funcs[name]["spill_loads"] += bool(re.search(r"\bLDL(\.\w+)*\s", line))
    return funcs


def verdict(rec: dict) -> list[str]:
    """Why a compiled configuration is not acceptable (empty: it is)."""
    bad = list(rec["why"]) if not rec["launchable"] else []
    if rec["spill_stores"] or rec["spill_loads"] or rec["local_bytes"] or rec["stack_bytes"]:
        bad.append(f"spills: {rec['stack_bytes']} B stack frame, {rec['spill_stores']} STL / "
                   f"{rec['spill_loads']} LDL instructions, {rec['local_bytes']} B local")
    return bad


# --- Triton --------------------------------------------------------------------------------------------------------
def triton_configs(saturated_only: bool = False) -> list[dict]:
    """Every (BLOCK_I, BLOCK_J, BLOCK_C, num_warps) the launcher returns, found by calling it on a grid of shapes
    (rows 1..40, classes 1..2^14); ``saturated_only``: the largest BLOCK_C per (BLOCK_I, BLOCK_J), i.e. the tiles of
    8K values that every shape with enough classes runs, and the most registers per row pair."""
    import torch
    from klas.kernels.pairwise_kl import _launch_config
    seen = {}
    for n_a in (1, 2, 3, 4, 5, 8, 9, 16, 17, 32, 40):
        for n_b in (1, 2, 3, 4, 5, 8, 9, 16, 17, 32, 40):
            for c in [1, 3, 5, *(2 ** k + 1 for k in range(2, 15))]:
                cfg = _launch_config(n_a, n_b, 64, c, torch.device("cpu"))
                key = (cfg["block_i"], cfg["block_j"], cfg["block_c"], cfg["num_warps"])
                seen[key] = dict(block_i=key[0], block_j=key[1], block_c=key[2], num_warps=key[3])
    configs = [seen[k] for k in sorted(seen)]
    if saturated_only:
        top = {}
        for c in configs:
            k = (c["block_i"], c["block_j"])
            top[k] = max(top.get(k, c), c, key=lambda x: x["block_c"])
        configs = [top[k] for k in sorted(top)]
    return configs


def _jit_attrs(fn, values: dict) -> dict:
    """The divisibility hints Triton's JIT gives a launch: 16-aligned pointers, integers that are multiples of 16."""
    attrs = {}
    for i, n in enumerate(fn.arg_names):
        if n.endswith("_ptr") or (n in values and values[n] % 16 == 0):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return attrs


def compile_triton(job: dict) -> dict:
    """Compile one configuration (runs in a worker process); returns the cubin bytes and Triton's metadata."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile as tcompile
    from klas.kernels.pairwise_kl import _kernel
    fn = _kernel(False)
    dt = job["dtype"]
    sig = {n: "constexpr" if n.startswith("BLOCK") else "fp32" if n == "inv_t" else
           ("*fp32" if n == "out_ptr" else "*" + dt) if n.endswith("_ptr") else "i32" for n in fn.arg_names}
    src = ASTSource(fn=fn, signature=sig, attrs=_jit_attrs(fn, job.get("int_args", {})),
                    constexprs={"BLOCK_I": job["block_i"], "BLOCK_J": job["block_j"], "BLOCK_C": job["block_c"]})
    k = tcompile(src, target=GPUTarget(*TARGET), options={"num_warps": job["num_warps"]})
    return dict(cubin=k.asm["cubin"], dyn_smem_bytes=int(k.metadata.shared), name=k.metadata.name,
                num_warps=int(k.metadata.num_warps))


def shape_int_args(n_a: int, n_b: int, n: int, c: int, cfg: dict) -> dict:
    """The integer arguments a contiguous [n_a, n, c] x [n_b, n, c] launch passes (only their % 16 matters)."""
    return dict(n_a=n_a, n_b=n_b, n_samples=n, n_classes=c, a_stride_row=n * c, a_stride_sample=c,
                b_stride_row=n * c, b_stride_sample=c, tiles_j=cfg["tiles_j"], pair_tiles=cfg["pair_tiles"])


def triton_records(configs: list[dict], dtypes: list[str], shapes: list[tuple], jobs: int, tmp: Path) -> list[dict]:
    import torch
    from klas.kernels.pairwise_kl import _launch_config
    work = [dict(c, dtype=d, spec="aligned pointers") for c in configs for d in dtypes]
    for n_a, n_b, n, c, d in shapes:
        cfg = _launch_config(n_a, n_b, n, c, torch.device("cpu"))
        work.append(dict(block_i=cfg["block_i"], block_j=cfg["block_j"], block_c=cfg["block_c"],
                         num_warps=cfg["num_warps"], dtype=d, spec=f"JIT specialization of {n_a}x{n_b}x{n}x{c}",
                         int_args=shape_int_args(n_a, n_b, n, c, cfg)))
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        def tqdm(x, **_):
            return x
    with ProcessPoolExecutor(max_workers=max(1, jobs)) as pool:
        compiled = list(tqdm(pool.map(compile_triton, work), total=len(work), desc="triton sm_90", file=sys.stderr))
    records = []
    for w, out in zip(work, compiled):
        path = tmp / f"triton_{len(records)}.cubin"
        path.write_bytes(out["cubin"])
        res = inspect_cubin(path)
        if len(res) != 1:
            raise SystemExit(f"gpu_static: {path}: expected one kernel in the Triton cubin, found {len(res)}")
        (r,) = res.values()
        threads = out["num_warps"] * H100["warp_size"]
        smem = out["dyn_smem_bytes"] + r["static_smem_bytes"]
        rec = dict(kernel="triton pairwise_kl", dtype=w["dtype"], spec=w["spec"], block_i=w["block_i"],
                   block_j=w["block_j"], block_c=w["block_c"], num_warps=out["num_warps"], threads=threads,
                   **r, dyn_smem_bytes=out["dyn_smem_bytes"], smem_bytes=smem, **occupancy(r["regs"], smem, threads))
        rec["problems"] = verdict(rec)
        records.append(rec)
    return records


# --- CUDA ----------------------------------------------------------------------------------------------------------
def _cuda_flags() -> list[str]:
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS
    # What CUDAExtension passes with TORCH_CUDA_ARCH_LIST=9.0 and setup.py's extra nvcc args (-O3, no fast math).
    return ["-O3", "-std=c++17", *COMMON_NVCC_FLAGS, "-DKLAS_WITH_CUDA=1", f"-I{ROOT / 'csrc'}",
            "-gencode=arch=compute_90,code=sm_90", "-cubin"]


def build_cuda(cache: Path = CACHE) -> tuple[Path, str]:
    """csrc/*.cu -> one sm_90 cubin per file, reused while sources, flags and nvcc are unchanged."""
    exe, flags = nvcc(), _cuda_flags()
    srcs = sorted((ROOT / "csrc").glob("*.cu"))
    h = hashlib.sha256(json.dumps([flags, _version(exe)]).encode())
    for f in sorted((ROOT / "csrc").glob("*.[ch]*")):
        h.update(f.name.encode() + f.read_bytes())
    key = h.hexdigest()[:16]
    out_dir = cache / f"cuda-{key}"
    cubins = [out_dir / (s.stem + ".cubin") for s in srcs]
    if not all(c.exists() for c in cubins):
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".tmp-"))
        try:
            for s in srcs:
                r = subprocess.run([exe, *flags, "-o", str(tmp / (s.stem + ".cubin")), str(s)],
                                   capture_output=True, text=True)
                if r.returncode != 0:
                    raise SystemExit(f"gpu_static: nvcc failed on {s.relative_to(ROOT)} for sm_90: "
                                     + (r.stderr.strip().splitlines() or ["?"])[-1])
            out_dir.parent.mkdir(parents=True, exist_ok=True)
            if not out_dir.exists():
                tmp.rename(out_dir)  # atomic: a half-built cache is never seen
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir, key


def _demangle(name: str) -> str:
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt:
        return name
    return subprocess.run([cxxfilt, name], capture_output=True, text=True).stdout.strip() or name


def cuda_records(cache: Path = CACHE) -> tuple[list[dict], str]:
    src = (ROOT / "csrc" / "pairwise_kl_cuda.cu").read_text()
    m = re.search(r"constexpr int kThreads = (\d+);", src)
    if not m:
        raise SystemExit("gpu_static: csrc/pairwise_kl_cuda.cu: no `constexpr int kThreads = N;` (threads/block)")
    threads = int(m.group(1))
    out_dir, key = build_cuda(cache)
    records = []
    for cubin in sorted(out_dir.glob("*.cubin")):
        for name, r in sorted(inspect_cubin(cubin).items()):
            pretty = _demangle(name)
            t = re.search(r"pairwise_kl_kernel<([^,]+), (\d+)>", pretty)
            dtype = {"float": "fp32", "__half": "fp16", "__nv_bfloat16": "bf16"}.get(t.group(1), t.group(1)) if t \
                else "?"
            rec = dict(kernel=f"cuda {cubin.stem}", function=pretty, dtype=dtype,
                       rows_per_thread=int(t.group(2)) if t else None, threads=threads, **r,
                       smem_bytes=r["static_smem_bytes"], **occupancy(r["regs"], r["static_smem_bytes"], threads))
            rec["problems"] = verdict(rec)
            records.append(rec)
    return records, key


# --- roofline --------------------------------------------------------------------------------------------------------
def roofline(n_a: int, n_b: int, n: int, c: int, dtype: str, dev: dict = H100_SXM) -> dict:
    """Lower bounds (ESTIMATES) for the direct-form kernel: HBM reads of both inputs once, 2 FP32 instructions per
    (pair, sample, class) (FADD la - lb, FFMA p * (.) + acc: 3 flops), exps (both sides' sums + p of a)."""
    read = (n_a + n_b) * n * c * DTYPES[dtype]
    pair_elems = n_a * n_b * n * c
    exps = (2 * n_a + n_b) * n * c
    t = {"hbm_read_floor_ms": read / dev["hbm_bytes_per_s"] * 1e3,
         "fp32_issue_ms": 2 * pair_elems / dev["fp32_instr_per_s"] * 1e3,
         "exp_sfu_ms": exps / dev["sfu_exp_per_s"] * 1e3}
    bound = max(t, key=t.get)
    return dict(shape=dict(n_a=n_a, n_b=n_b, n=n, c=c, dtype=dtype), label="estimate", bytes_read=read,
                flops=3 * pair_elems, fp32_instructions=2 * pair_elems, exps=exps,
                **{k: round(v, 4) for k, v in t.items()}, bound=bound, estimated_min_ms=round(t[bound], 4),
                goal_ms_1p3x_floor=round(1.3 * t["hbm_read_floor_ms"], 4))


def _atomic_write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=OUT, help=f"JSON report (default {OUT.relative_to(ROOT)})")
    p.add_argument("--configs", choices=("all", "saturated"), default="all",
                   help="all launcher configurations, or the largest BLOCK_C per (BLOCK_I, BLOCK_J)")
    p.add_argument("--dtypes", default="fp32,fp16,bf16", help="comma-separated input dtypes (fp32, fp16, bf16)")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="parallel Triton compiles")
    p.add_argument("--cache", type=Path, default=CACHE, help="nvcc output / Triton cache folder")
    args = p.parse_args(argv)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if not dtypes or any(d not in DTYPES for d in dtypes):
        print(f"gpu_static: --dtypes {args.dtypes!r}: expected a comma-separated subset of fp32,fp16,bf16",
              file=sys.stderr)
        return 2
    if args.jobs < 1:
        print(f"gpu_static: --jobs {args.jobs}: expected >= 1", file=sys.stderr)
        return 2
    args.cache.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TRITON_CACHE_DIR", str(args.cache / "triton"))
    sys.path.insert(0, str(ROOT))
    import torch
    import triton
    cuda, cuda_key = cuda_records(args.cache)
    with tempfile.TemporaryDirectory() as tmp:
        shapes = [s for s in ROOFLINE_SHAPES if s[4] in dtypes]
        tri = triton_records(triton_configs(args.configs == "saturated"), dtypes, shapes, args.jobs, Path(tmp))
    bad = [r for r in cuda + tri if r["problems"]]
    report = dict(
        label="static inspection of compiled GPU binaries (no GPU run); roofline figures are estimates",
        command="python benchmarks/gpu_static.py" + ("" if argv is None else " " + " ".join(map(str, argv))),
        target=dict(gpu_target=list(TARGET), arch="sm_90", device_limits="H100 (compute capability 9.0)", **H100),
        tools=dict(triton=triton.__version__, torch=torch.__version__, nvcc=_version(nvcc()),
                   triton_ptxas=_version(tool("ptxas")), cuobjdump=_version(tool("cuobjdump")),
                   cuda_flags=_cuda_flags(), cuda_cache_key=cuda_key),
        configs=args.configs, dtypes=dtypes,
        summary=dict(records=len(cuda) + len(tri), problems=len(bad),
                     max_regs_triton=max((r["regs"] for r in tri), default=None),
                     min_occupancy_triton=min((r["occupancy"] for r in tri), default=None),
                     max_regs_cuda=max((r["regs"] for r in cuda), default=None),
                     min_occupancy_cuda=min((r["occupancy"] for r in cuda), default=None)),
        roofline=dict(label="estimate", device=H100_SXM,
                      shapes=[roofline(*s) for s in ROOFLINE_SHAPES]),
        cuda=cuda, triton=tri)
    _atomic_write(args.out, report)
    for r in bad:
        print(f"gpu_static: {r['kernel']} {r['dtype']} {r.get('function') or r.get('spec')} "
              f"{[r.get(k) for k in ('block_i', 'block_j', 'block_c', 'num_warps')]}: {'; '.join(r['problems'])}",
              file=sys.stderr)
    print(f"gpu_static: {len(cuda)} CUDA + {len(tri)} Triton binaries for sm_90, {len(bad)} with problems -> "
          f"{args.out}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
