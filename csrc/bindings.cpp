// The torch op klas::pairwise_kl_sum(Tensor a, Tensor? b, float temperature) -> Tensor (float64 [nA, nB], summed
// over samples): CPU kernel from pairwise_kl_cpu.cpp, CUDA kernel from pairwise_kl_cuda.cu when built with
// KLAS_WITH_CUDA. Its fake (meta) kernel is registered in Python, in klas/ops/native.py (named below so that torch
// can import it on demand). Input validation beyond what the kernels need lives in klas/ops.
#include <Python.h>

// NOTE: per-op headers, not <ATen/ATen.h> (every op's declaration): this file compiles in half the time
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <optional>

#include "pairwise_kl_cpu.h"

#ifdef KLAS_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "pairwise_kl_cuda.h"
#endif

namespace {

klas::ElemType elem_type(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return klas::ElemType::kFloat32;
    case at::kHalf:
      return klas::ElemType::kFloat16;
    case at::kBFloat16:
      return klas::ElemType::kBFloat16;
    default:
      TORCH_CHECK_VALUE(false, "pairwise_kl_sum: expected float32, float16 or bfloat16 logits, got ", t.scalar_type());
  }
}

// Classes must be contiguous; rows and samples may have any strides (e.g. a permuted [N, nA, C] stack).
at::Tensor classes_contiguous(const at::Tensor& t) { return t.size(2) <= 1 || t.stride(2) == 1 ? t : t.contiguous(); }

// Checks shapes and fills the kernel arguments; a_c / b_c keep any contiguous copies alive.
klas::PairwiseKLArgs make_args(const at::Tensor& a, const std::optional<at::Tensor>& b, double temperature,
                               at::Tensor& a_c, at::Tensor& b_c) {
  TORCH_CHECK_VALUE(a.dim() == 3, "pairwise_kl_sum: expected a of shape [nA, N, C], got ", a.sizes());
  TORCH_CHECK_VALUE(temperature > 0.0 && std::isfinite(temperature),
                    "pairwise_kl_sum: temperature must be a positive finite number, got ", temperature);
  a_c = classes_contiguous(a);
  klas::PairwiseKLArgs g;
  g.type = elem_type(a);
  g.a = a_c.data_ptr();
  g.n_a = a.size(0);
  g.n = a.size(1);
  g.c = a.size(2);
  g.a_stride_row = a_c.stride(0);
  g.a_stride_sample = a_c.stride(1);
  g.inv_temperature = static_cast<float>(1.0 / temperature);
  g.n_b = g.n_a;
  if (b.has_value()) {
    TORCH_CHECK_VALUE(b->dim() == 3 && b->size(1) == g.n && b->size(2) == g.c,
                      "pairwise_kl_sum: expected b of shape [nB, ", g.n, ", ", g.c, "], got ", b->sizes());
    TORCH_CHECK_VALUE(b->scalar_type() == a.scalar_type(), "pairwise_kl_sum: a and b must have the same dtype, got ",
                      a.scalar_type(), " and ", b->scalar_type());
    TORCH_CHECK_VALUE(b->device() == a.device(), "pairwise_kl_sum: a and b must be on the same device");
    b_c = classes_contiguous(*b);
    g.b = b_c.data_ptr();
    g.n_b = b->size(0);
    g.b_stride_row = b_c.stride(0);
    g.b_stride_sample = b_c.stride(1);
  }
  return g;
}

at::Tensor pairwise_kl_sum_cpu(const at::Tensor& a, const std::optional<at::Tensor>& b, double temperature) {
  TORCH_CHECK_VALUE(a.device().is_cpu(), "pairwise_kl_sum (CPU kernel): expected CPU tensors");
  at::Tensor a_c, b_c;
  const klas::PairwiseKLArgs g = make_args(a, b, temperature, a_c, b_c);
  at::Tensor out = at::empty({g.n_a, g.n_b}, a.options().dtype(at::kDouble));
  const bool finite = klas::pairwise_kl_sum_cpu(g, out.data_ptr<double>(), at::get_num_threads());
  TORCH_CHECK_VALUE(finite, "pairwise_softmax_kl: non-finite logits (inf or nan) in the input");
  return out;
}

#ifdef KLAS_WITH_CUDA
at::Tensor pairwise_kl_sum_cuda(const at::Tensor& a, const std::optional<at::Tensor>& b, double temperature) {
  TORCH_CHECK_VALUE(a.device().is_cuda(), "pairwise_kl_sum (CUDA kernel): expected CUDA tensors");
  const c10::cuda::CUDAGuard guard(a.device());
  at::Tensor a_c, b_c;
  const klas::PairwiseKLArgs g = make_args(a, b, temperature, a_c, b_c);
  if (g.n == 0 || g.c == 0 || g.n_a == 0 || g.n_b == 0) {
    return at::zeros({g.n_a, g.n_b}, a.options().dtype(at::kDouble));
  }
  const int slices = klas::pairwise_kl_cuda_slices(g, at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
  at::Tensor partial = at::empty({slices, g.n_a, g.n_b}, a.options().dtype(at::kFloat));
  const cudaError_t err = klas::pairwise_kl_partial_cuda(g, partial.data_ptr<float>(), slices,
                                                         at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "pairwise_kl_sum: CUDA launch failed: ", cudaGetErrorString(err));
  return partial.sum(0, /*keepdim=*/false, at::kDouble);
}
#endif

}  // namespace

TORCH_LIBRARY(klas, m) {
  m.set_python_module("klas.ops.native");
  m.def("pairwise_kl_sum(Tensor a, Tensor? b, float temperature) -> Tensor");
}

TORCH_LIBRARY_IMPL(klas, CPU, m) { m.impl("pairwise_kl_sum", &pairwise_kl_sum_cpu); }

#ifdef KLAS_WITH_CUDA
TORCH_LIBRARY_IMPL(klas, CUDA, m) { m.impl("pairwise_kl_sum", &pairwise_kl_sum_cuda); }
#endif

// `import klas._C` loads this library (and with it the registrations above); the module itself is empty.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "klas native ops (torch.ops.klas.pairwise_kl_sum)", -1,
                               nullptr};
  return PyModule_Create(&module);
}
