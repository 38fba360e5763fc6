"""Build entry point. The C++ (CPU) extension is optional: without a compiler klas installs and uses its PyTorch
reference ops. The CUDA extension is built only where torch has CUDA and nvcc is present (as pytorch/extension-cpp).
"""
import os
import shutil
import sys

from setuptools import find_packages, setup

ext_modules, cmdclass = [], {}


def _extensions():
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        return [], {}
    if os.environ.get("KLAS_NO_EXT") == "1" or shutil.which(os.environ.get("CXX", "g++")) is None:
        print("klas: no C++ compiler (or KLAS_NO_EXT=1): skipping the extension; the PyTorch ops will be used",
              file=sys.stderr)
        return [], {}
    here = os.path.dirname(os.path.abspath(__file__))
    cpp = [os.path.join("csrc", f) for f in sorted(os.listdir(os.path.join(here, "csrc"))) if f.endswith(".cpp")]
    if not cpp:
        return [], {}
    depends = [os.path.join("csrc", f) for f in sorted(os.listdir(os.path.join(here, "csrc"))) if f.endswith(".h")]
    # torch >= 2.10 headers need C++20; -g0 overrides the -g of Python's own CFLAGS (debug info for all of the torch
    # headers doubled the build time of the setup)
    extra = {"cxx": ["-O3", "-g0", "-fopenmp", "-std=c++20"]}
    use_cuda = torch.cuda.is_available() and CUDA_HOME is not None and os.environ.get("KLAS_NO_CUDA") != "1"
    if use_cuda:
        cu = [os.path.join("csrc", f) for f in sorted(os.listdir(os.path.join(here, "csrc"))) if f.endswith(".cu")]
        # NOTE: no --use_fast_math: the KL kernels need accurate expf/logf (KL values of 1e-7 are meaningful).
        extra["nvcc"] = ["-O3"]
        ext = CUDAExtension("klas._C", cpp + cu, extra_compile_args=extra, extra_link_args=["-fopenmp"],
                            define_macros=[("KLAS_WITH_CUDA", "1")], depends=depends)
    else:
        ext = CppExtension("klas._C", cpp, extra_compile_args=extra, extra_link_args=["-fopenmp"], depends=depends)
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="klas",
    version="0.1.0",
    description="KL-divergence based Anchor Stitching: stitched model zoos exported to ONNX with a budget manifest",
    # kernels/: the Triton kernels, kept in the top-level folder but installed as the subpackage klas.kernels
    # (imported lazily by klas.ops, for GPU tensors or under TRITON_INTERPRET=1); no top-level `kernels` module.
    packages=find_packages(include=["klas", "klas.*"]) + ["klas.kernels"],
    package_dir={"klas.kernels": "kernels"},
    package_data={"klas": ["families/weights/*.safetensors", "families/weights/*.json", "configs/*.toml"]},
    python_requires=">=3.10",
    # klas-runtime: the torch-free manifest / pick / predict / profile / verify package in runtime/ (pip install
    # ./runtime first when installing from the repository; scripts/setup.sh does).
    install_requires=["klas-runtime==0.1.0", "torch>=2.4", "torchvision", "timm>=1.0,<1.1", "transformers>=5.0",
                      "tokenizers", "rouge-score", "onnx", "onnxruntime",
                      "numpy", "safetensors", "tqdm", "matplotlib"],
    extras_require={"gpu": ["onnxruntime-gpu", "triton>=3.0"], "test": ["pytest", "pytest-benchmark"],
                    "triton": ["triton>=3.0"]},
    entry_points={"console_scripts": ["klas=klas.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
