// All-pairs softmax KL on CUDA devices, with no dependency on torch (csrc/bindings.cpp wraps it as the CUDA kernel
// of the torch op klas::pairwise_kl_sum). Same contract as pairwise_kl_cpu.h, except that the launcher writes
// float32 partial sums, one [n_a, n_b] slice per group of samples, which the caller adds up in float64.
#pragma once

#include <cuda_runtime.h>

#include "pairwise_kl_cpu.h"

namespace klas {

// How many [n_a, n_b] partial slices pairwise_kl_partial_cuda writes for these arguments on a device with
// sm_count multiprocessors (the caller allocates slices * n_a * n_b floats).
int pairwise_kl_cuda_slices(const PairwiseKLArgs& args, int sm_count);

// partial[s, i, j] = sum over the samples of slice s of KL(softmax(a[i, n] / T) || softmax(b[j, n] / T)).
// Non-finite logits make the affected entries inf or nan (the caller checks). Asynchronous on `stream`.
cudaError_t pairwise_kl_partial_cuda(const PairwiseKLArgs& args, float* partial, int slices, cudaStream_t stream);

}  // namespace klas
