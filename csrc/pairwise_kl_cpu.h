// All-pairs softmax KL divergence on the CPU, with no dependency on torch: the same source is built into the Python
// extension `klas._C` (setup.py, through csrc/bindings.cpp) and into a standalone library by CMakeLists.txt.
//
//   out[i, j] = sum_n KL(softmax(a[i, n] / T) || softmax(b[j, n] / T))      (float64, summed over samples n)
//
// Fused: each sample's nA + nB rows are normalized once (max, sum of exp, log-probabilities) while they sit in
// cache, then every pair is reduced in the direct form  sum_c p_ic * (log p_ic - log q_jc). The matrix-product form
// (sum p log p - p @ log q^T) is not used: in float32 it cancels catastrophically when P and Q are close.
#pragma once

#include <cstdint>

namespace klas {

enum class ElemType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct PairwiseKLArgs {
  const void* a = nullptr;  // [n_a, n, c] logits; classes contiguous, rows and samples strided
  const void* b = nullptr;  // [n_b, n, c] logits, or nullptr: a against itself (each row normalized once)
  int64_t n_a = 0, n_b = 0, n = 0, c = 0;
  int64_t a_stride_row = 0, a_stride_sample = 0;  // in elements
  int64_t b_stride_row = 0, b_stride_sample = 0;
  float inv_temperature = 1.0f;
  ElemType type = ElemType::kFloat32;
};

// Writes out[i * n_b + j] (float64, overwritten). Returns false when a logit is inf or nan (out is then
// unspecified). num_threads <= 0 lets OpenMP choose. Deterministic for a given thread count.
// Runs the AVX2 + FMA kernel where the CPU has it (x86-64, GCC builds), else the portable one; the environment
// variable KLAS_KL_CPU_PORTABLE=1 forces the portable one (tests compare the two).
bool pairwise_kl_sum_cpu(const PairwiseKLArgs& args, double* out, int num_threads);
bool pairwise_kl_sum_cpu_portable(const PairwiseKLArgs& args, double* out, int num_threads);
const char* pairwise_kl_cpu_path();  // "avx2" or "portable": what pairwise_kl_sum_cpu runs here, now

// Building blocks, exposed for the C++ test.
float exp_nonpositive(float x);       // e^x for x <= 0 (0 below -87), ~1 ulp; the kernel's vectorizable exp
float half_to_float(uint16_t bits);   // IEEE binary16 -> float32, exact (subnormals, inf, nan included)
float bfloat16_to_float(uint16_t bits);

}  // namespace klas
