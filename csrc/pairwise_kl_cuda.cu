// CUDA kernel for the all-pairs softmax KL (contract in pairwise_kl_cuda.h). Built only where torch has CUDA and
// nvcc exists; on the GPU the Triton kernel (kernels/pairwise_kl.py) is the default and this is the fallback.
//
// Grid: x = groups of samples (grid-stride), y = tiles of TILE x TILE (a row, b row) pairs. Block: 256 threads as a
// 16 x 16 grid, each owning R x R pairs in registers for the whole run. Per sample:
//   1. row statistics: one warp per row, online max / sum of exp over the classes, merged with shuffles;
//   2. classes in tiles of TC: the block loads TILE a rows and TILE b rows once from global memory, writes
//      la = (x - max) / T - log(sum) (and p = e^la for a rows) to shared memory, then every thread updates its pairs
//      in the direct form sum_c p_ic (la_ic - lb_jc) -- no tensor-core product form: it cancels for close rows.
// Built without --use_fast_math: expf/logf must be accurate to an ulp or two for KL values of 1e-7.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>

#include "pairwise_kl_cuda.h"

namespace klas {
namespace {

constexpr int kThreads = 256;
constexpr int kTileClasses = 32;

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

// Merge two (max, sum of exp((x - max) / T)) summaries; an empty summary has max = -inf and sum = 0.
__device__ __forceinline__ void merge_stats(float& m, float& z, float om, float oz, float inv_t) {
  const float nm = fmaxf(m, om);
  const float a = m == -INFINITY ? 0.0f : expf((m - nm) * inv_t);
  const float b = om == -INFINITY ? 0.0f : expf((om - nm) * inv_t);
  z = z * a + oz * b;
  m = nm;
}

template <typename T, int R>
__global__ void __launch_bounds__(kThreads) pairwise_kl_kernel(const T* __restrict__ a, const T* __restrict__ b,
                                                                PairwiseKLArgs g, float* __restrict__ partial) {
  constexpr int kTile = 16 * R;
  constexpr int kLd = kTileClasses + 1;  // padded rows: no shared-memory bank conflicts
  __shared__ float s_p[kTile][kLd], s_la[kTile][kLd], s_lb[kTile][kLd];
  __shared__ float s_max[2 * kTile], s_log_sum[2 * kTile], s_inv_sum[2 * kTile];

  const int tiles_j = static_cast<int>((g.n_b + kTile - 1) / kTile);
  const int64_t row0_a = static_cast<int64_t>(blockIdx.y / tiles_j) * kTile;
  const int64_t row0_b = static_cast<int64_t>(blockIdx.y % tiles_j) * kTile;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const float inv_t = g.inv_temperature;

  float acc[R][R];
#pragma unroll
  for (int ii = 0; ii < R; ++ii)
#pragma unroll
    for (int jj = 0; jj < R; ++jj) acc[ii][jj] = 0.0f;

  for (int64_t s = blockIdx.x; s < g.n; s += gridDim.x) {
    for (int r = warp; r < 2 * kTile; r += kThreads / 32) {
      const bool is_a = r < kTile;
      const int64_t row = (is_a ? row0_a : row0_b) + r % kTile;
      float m = -INFINITY, z = 0.0f;
      if (row < (is_a ? g.n_a : g.n_b)) {
        const T* x = is_a ? a + row * g.a_stride_row + s * g.a_stride_sample
                          : b + row * g.b_stride_row + s * g.b_stride_sample;
        for (int64_t k = lane; k < g.c; k += 32) {  // online: one expf per element
          const float v = to_float(x[k]);
          if (v > m) {
            z = z * expf((m - v) * inv_t) + 1.0f;
            m = v;
          } else {
            z += expf((v - m) * inv_t);
          }
        }
      }
#pragma unroll
      for (int off = 16; off > 0; off /= 2) {
        const float om = __shfl_xor_sync(0xffffffffu, m, off), oz = __shfl_xor_sync(0xffffffffu, z, off);
        merge_stats(m, z, om, oz, inv_t);
      }
      if (lane == 0) {
        s_max[r] = m;
        s_log_sum[r] = logf(z);
        s_inv_sum[r] = 1.0f / z;
      }
    }
    __syncthreads();

    for (int64_t c0 = 0; c0 < g.c; c0 += kTileClasses) {
      for (int e = threadIdx.x; e < 2 * kTile * kTileClasses; e += kThreads) {
        const int r = e / kTileClasses, k = e % kTileClasses;
        const bool is_a = r < kTile;
        const int64_t row = (is_a ? row0_a : row0_b) + r % kTile;
        float la = 0.0f, p = 0.0f;  // padding (missing rows or classes) contributes exactly 0
        if (row < (is_a ? g.n_a : g.n_b) && c0 + k < g.c) {
          const float v = is_a ? to_float(a[row * g.a_stride_row + s * g.a_stride_sample + c0 + k])
                               : to_float(b[row * g.b_stride_row + s * g.b_stride_sample + c0 + k]);
          const float y = (v - s_max[r]) * inv_t;
          la = y - s_log_sum[r];
          if (is_a) p = expf(y) * s_inv_sum[r];
        }
        if (is_a) {
          s_la[r][k] = la;
          s_p[r][k] = p;
        } else {
          s_lb[r - kTile][k] = la;
        }
      }
      __syncthreads();
#pragma unroll 8
      for (int k = 0; k < kTileClasses; ++k) {
        float pa[R], la[R], lb[R];
#pragma unroll
        for (int ii = 0; ii < R; ++ii) {
          pa[ii] = s_p[ty * R + ii][k];
          la[ii] = s_la[ty * R + ii][k];
        }
#pragma unroll
        for (int jj = 0; jj < R; ++jj) lb[jj] = s_lb[tx * R + jj][k];
#pragma unroll
        for (int ii = 0; ii < R; ++ii)
#pragma unroll
          for (int jj = 0; jj < R; ++jj) acc[ii][jj] = fmaf(pa[ii], la[ii] - lb[jj], acc[ii][jj]);
      }
      __syncthreads();
    }
  }

#pragma unroll
  for (int ii = 0; ii < R; ++ii)
#pragma unroll
    for (int jj = 0; jj < R; ++jj) {
      const int64_t i = row0_a + ty * R + ii, j = row0_b + tx * R + jj;
      if (i < g.n_a && j < g.n_b) partial[(blockIdx.x * g.n_a + i) * g.n_b + j] = acc[ii][jj];
    }
}

int tile_rows(const PairwiseKLArgs& g) { return std::max(g.n_a, g.n_b) > 16 ? 32 : 16; }

int pair_tiles(const PairwiseKLArgs& g) {
  const int64_t t = tile_rows(g);
  return static_cast<int>(((g.n_a + t - 1) / t) * ((g.n_b + t - 1) / t));
}

template <typename T>
cudaError_t launch(const PairwiseKLArgs& g, float* partial, int slices, cudaStream_t stream) {
  const T* a = static_cast<const T*>(g.a);
  const T* b = static_cast<const T*>(g.b != nullptr ? g.b : g.a);
  PairwiseKLArgs args = g;
  if (g.b == nullptr) {  // self mode: b is a, with a's strides
    args.b_stride_row = g.a_stride_row;
    args.b_stride_sample = g.a_stride_sample;
  }
  const dim3 grid(slices, pair_tiles(g));
  if (tile_rows(g) == 32)
    pairwise_kl_kernel<T, 2><<<grid, kThreads, 0, stream>>>(a, b, args, partial);
  else
    pairwise_kl_kernel<T, 1><<<grid, kThreads, 0, stream>>>(a, b, args, partial);
  return cudaGetLastError();
}

}  // namespace

int pairwise_kl_cuda_slices(const PairwiseKLArgs& g, int sm_count) {
  // About 8 blocks per SM in total; never more slices than samples (or than gridDim.x allows).
  const int64_t want = (8LL * std::max(sm_count, 1) + pair_tiles(g) - 1) / pair_tiles(g);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({want, g.n, 65535})));
}

cudaError_t pairwise_kl_partial_cuda(const PairwiseKLArgs& g, float* partial, int slices, cudaStream_t stream) {
  if (g.n_a == 0 || g.n_b == 0) return cudaSuccess;
  switch (g.type) {
    case ElemType::kFloat16:
      return launch<__half>(g, partial, slices, stream);
    case ElemType::kBFloat16:
      return launch<__nv_bfloat16>(g, partial, slices, stream);
    case ElemType::kFloat32:
    default:
      return launch<float>(g, partial, slices, stream);
  }
}

}  // namespace klas
