"""The GPU kernels compiled for sm_90 (H100) on this GPU-less machine (benchmarks/gpu_static.py): every Triton
launcher configuration with the largest class tile (fp32, bf16; plus what the roofline shapes launch) and the CUDA
kernel must launch on an H100 and must not spill. nvcc and Triton's ptxas/cuobjdump are part of the image: no skip.

The occupancy arithmetic is checked against the per-SM limits independently (maximality on random kernels) and on
known-bad kernels. Compiles are cached (Triton's cache and a source-hash nvcc cache under build/gpu_static/).
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_static as gs  # noqa: E402

L = gs.H100


def _fits(blocks: int, regs: int, smem: int, threads: int) -> bool:
    """Whether ``blocks`` blocks of this kernel fit on one SM, straight from the per-SM limits."""
    warps = -(-threads // 32)
    reg_warp = -(-regs * 32 // 256) * 256
    return (blocks <= L["max_blocks_per_sm"] and blocks * warps * 32 <= L["max_threads_per_sm"]
            and blocks * warps * reg_warp <= L["regs_per_sm"]
            and blocks * (-(-smem // 128) * 128 + L["smem_reserved_per_block"]) <= L["smem_per_sm"])


def test_occupancy_is_the_most_blocks_that_fit():
    rnd = random.Random()
    for _ in range(2000):
        regs, threads = rnd.randint(1, 255), rnd.choice([32, 64, 96, 128, 256, 384, 512, 1024, rnd.randint(1, 1024)])
        smem = rnd.choice([0, rnd.randint(0, 48 * 1024), rnd.randint(0, 227 * 1024)])
        occ = gs.occupancy(regs, smem, threads)
        if not occ["launchable"]:
            assert not _fits(1, regs, smem, threads), (regs, smem, threads, occ)
            continue
        b = occ["blocks_per_sm"]
        assert b >= 1 and _fits(b, regs, smem, threads) and not _fits(b + 1, regs, smem, threads), (regs, smem,
                                                                                                     threads, occ)
        assert occ["occupancy"] == pytest.approx(b * -(-threads // 32) / 64, abs=1e-4)


@pytest.mark.parametrize("regs,smem,threads,needle", [
    (255, 0, 1024, "registers x 1024 threads"),  # 255 regs -> 8192 per warp x 32 warps > 64K
    (65, 0, 1024, "registers x 1024 threads"),  # 65 regs round up to 72 per thread: 73728 per block
    (32, 228 * 1024, 128, "shared memory"),
    (32, 0, 1025, "threads per block"),
    (256, 0, 32, "registers per thread"),
])
def test_unlaunchable_kernels_are_rejected(regs, smem, threads, needle):
    occ = gs.occupancy(regs, smem, threads)
    assert not occ["launchable"] and any(needle in w for w in occ["why"]), occ
    rec = dict(occ, spill_stores=0, spill_loads=0, local_bytes=0, stack_bytes=0)
    assert any(needle in p for p in gs.verdict(rec))


def test_spills_are_problems():
    ok = dict(gs.occupancy(64, 4096, 256), spill_stores=0, spill_loads=0, local_bytes=0, stack_bytes=0)
    assert gs.verdict(ok) == []
    for key in ("spill_stores", "spill_loads", "local_bytes", "stack_bytes"):
        assert "spills" in " ".join(gs.verdict(dict(ok, **{key: 8})))


def test_enumeration_covers_the_launcher():
    """Random shapes' launch configurations are among those the report compiles."""
    from klas.kernels.pairwise_kl import _launch_config
    every = {tuple(c.values()) for c in gs.triton_configs()}
    top = {(c["block_i"], c["block_j"]): c["block_c"] for c in gs.triton_configs(saturated_only=True)}
    rnd = random.Random()
    for _ in range(300):
        cfg = _launch_config(rnd.randint(1, 300), rnd.randint(1, 300), rnd.randint(1, 99), rnd.randint(1, 70000),
                             torch.device("cpu"))
        key = (cfg["block_i"], cfg["block_j"], cfg["block_c"], cfg["num_warps"])
        assert key in every and key[2] <= top[key[:2]], key


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_static") / "gpu_static.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled, not interpreted
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_static.py"), "--configs", "saturated",
                        "--dtypes", "fp32,bf16", "--out", str(out)], env=env, capture_output=True, text=True,
                       timeout=900)
    assert out.exists(), r.stdout[-2000:] + r.stderr[-4000:]
    return json.loads(out.read_text()), r


def test_sm90_binaries_exist(report):
    rep, _ = report
    assert rep["target"]["arch"] == "sm_90"
    cuda = {(r["dtype"], r["rows_per_thread"]) for r in rep["cuda"]}
    assert cuda == {(d, k) for d in ("fp32", "fp16", "bf16") for k in (1, 2)}, cuda  # every template instance
    n_cfg = len(gs.triton_configs(saturated_only=True))
    assert sum(r["spec"] == "aligned pointers" for r in rep["triton"]) == 2 * n_cfg
    assert all(r["regs"] > 0 and r["threads"] == 32 * r["num_warps"] for r in rep["triton"])


def test_every_configuration_launches_on_h100(report):
    rep, _ = report
    bad = [r for r in rep["cuda"] + rep["triton"] if not r["launchable"] or not r["blocks_per_sm"]]
    assert not bad, bad


def test_no_configuration_spills(report):
    rep, r = report
    bad = [f"{x['kernel']} {x['dtype']} {x.get('spec', '')} I,J,C,warps="
           f"{[x.get(k) for k in ('block_i', 'block_j', 'block_c', 'num_warps')]}: {x['problems']}"
           for x in rep["cuda"] + rep["triton"] if x["problems"]]
    assert not bad and r.returncode == 0, "\n".join(bad)


# --- the prepared GPU check (benchmarks/gpu_check.py): its CPU-only dry run -----------------------------------------
def _gpu_check(*argv, timeout=600):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "KLAS_GPU_CHECK_DRY")}
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), *map(str, argv)], env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_gpu_check_dry_run(tmp_path):
    results = ROOT / "benchmarks" / "results"
    before = {p.name: p.stat().st_mtime for p in results.glob("gpu_*")}
    r = _gpu_check("--dry-run", "--out", tmp_path / "out")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (summary,) = (tmp_path / "out").glob("gpu_check_*.json")
    rep = json.loads(summary.read_text())
    assert rep["dry_run"] and list(rep["steps"]) == ["build", "kernels", "bench", "stages", "nccl"]
    assert all(s["status"] == "ok" for s in rep["steps"].values()), rep["steps"]
    kern = rep["steps"]["kernels"]
    assert kern["cases"] >= 20 and all(c["ok"] for c in kern["accuracy"])
    assert {c["dtype"] for c in kern["accuracy"]} == {"float32", "float16", "bfloat16"}
    bench = json.loads(next((tmp_path / "out").glob("gpu_bench_*.json")).read_text())
    assert all(row["seconds"]["cpp"] > 0 and row["cpp_vs_read_floor_sum"] > 0 for row in bench["rows"])
    assert rep["steps"]["nccl"]["backend"] == "gloo" and rep["steps"]["nccl"]["equal"]
    assert {p.name: p.stat().st_mtime for p in results.glob("gpu_*")} == before  # nothing written there


@pytest.mark.parametrize("argv,needle", [(["--dry-run", "--steps", "build,nope"], "--steps 'build,nope'"),
                                         (["--dry-run", "--out", ROOT / "benchmarks" / "results"], "never writes")])
def test_gpu_check_bad_arguments(argv, needle):
    r = _gpu_check(*argv, timeout=120)
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr and len(
        r.stderr.strip().splitlines()) == 1, r.stderr
