"""The standalone C++ library (CMakeLists.txt) and its own C++ test (tests/cpp/), built and run through ctest.

This is how CI runs the C++ test. A machine without cmake or a C++ compiler cannot build it: there, unless
KLAS_REQUIRE_EXT=1 demands the native build, the test checks the path such a machine runs instead -- the dispatcher
falling back to the PyTorch reference -- rather than skipping.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from klas.ops import dispatch, native, pairwise_softmax_kl
from test_ops_common import HALF_RTOL, assert_kl_close, kl_reference, logits

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], cwd: Path | None = None) -> None:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"


def test_cpp_library_and_ctest(tmp_path, rng, monkeypatch):
    cmake, ctest = shutil.which("cmake"), shutil.which("ctest")
    compiler = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if not (cmake and ctest and compiler):
        assert os.environ.get("KLAS_REQUIRE_EXT") != "1", "KLAS_REQUIRE_EXT=1 but cmake/ctest/a C++ compiler is missing"
        # No toolchain: what runs here is the reference, through the dispatcher's fallback.
        monkeypatch.setitem(sys.modules, "klas._C", None)
        monkeypatch.setattr(native, "_state", {"tried": False, "error": None})
        a, b = logits(rng, 3, 7, 13), logits(rng, 4, 7, 13)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert dispatch.resolve_impl(None, a.device, a.dtype) == "reference"
            assert_kl_close(pairwise_softmax_kl(a, b), kl_reference(a, b))
        return
    build = tmp_path / "build"
    _run([cmake, "-S", str(ROOT), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release"])
    _run([cmake, "--build", str(build), "-j", str(max(1, min(2, os.cpu_count() or 1)))])
    _run([ctest, "--output-on-failure"], cwd=build)


# The C++ op runs its AVX2 + FMA kernel where the CPU has one and the portable kernel otherwise
# (KLAS_KL_CPU_PORTABLE=1 forces the latter): both against the float64 reference on the same inputs. The shapes
# include 12 x 12 rows with C = 4001 (several class chunks with a ragged tail), C = 1 and C not a multiple of 8.
PATH_CASES = [((12, 12, 3, 4001), 3.0, 0.0), ((4, 5, 7, 13), 50.0, 1000.0), ((1, 3, 2, 1), 1.0, 0.0),
              ((7, 2, 5, 129), 0.01, 0.0)]


@pytest.mark.parametrize("portable", ["0", "1"])
@pytest.mark.parametrize("shape,scale,offset", PATH_CASES, ids=["12x12x3x4001", "x50+1000", "C=1", "x0.01"])
@pytest.mark.filterwarnings("ignore:klas. pairwise_softmax_kl impl")
def test_both_cpu_kernels_match_float64(rng, monkeypatch, portable, shape, scale, offset):
    # Without the extension "cpp" falls back to the reference (a warning), which must pass the same checks.
    monkeypatch.setenv("KLAS_KL_CPU_PORTABLE", portable)
    n_a, n_b, n, c = shape
    a = logits(rng, n_a, n, c, scale) + offset
    b = torch.cat([a[: min(n_a, n_b)] + 1e-3 * torch.randn((min(n_a, n_b), n, c), generator=rng),
                   logits(rng, max(0, n_b - n_a), n, c, scale) + offset])  # near-identical pairs and distant ones
    for t in (1.0, 0.7):
        assert_kl_close(pairwise_softmax_kl(a, b, t, impl="cpp"), kl_reference(a, b, t))
    assert_kl_close(pairwise_softmax_kl(a, None, impl="cpp"), kl_reference(a, None))
    for dtype in (torch.float16, torch.bfloat16):
        ah, bh = a.to(dtype), b.to(dtype)
        assert_kl_close(pairwise_softmax_kl(ah, bh, impl="cpp"), kl_reference(ah, bh), rtol=HALF_RTOL)
    same = pairwise_softmax_kl(a, a.clone(), impl="cpp")
    assert torch.all(torch.diagonal(same) == 0) or not native.load()  # direct form: identical rows give exactly 0


def test_cpu_kernels_flag_non_finite_logits(rng, monkeypatch):
    for portable in ("0", "1"):
        monkeypatch.setenv("KLAS_KL_CPU_PORTABLE", portable)
        for bad in (float("inf"), float("nan")):
            a = logits(rng, 3, 4, 21)
            a[1, 2, 20] = bad  # in the ragged tail of the row
            with pytest.raises(ValueError, match="non-finite"):
                pairwise_softmax_kl(a, logits(rng, 2, 4, 21), impl="cpp")
