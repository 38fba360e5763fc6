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

from klas.ops import dispatch, native, pairwise_softmax_kl
from test_ops_common import assert_kl_close, kl_reference, logits

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
