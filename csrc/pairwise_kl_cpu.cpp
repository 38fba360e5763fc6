// Fused all-pairs softmax KL on the CPU (see pairwise_kl_cpu.h for the contract).
//
// Per sample n, and per thread:
//   1. each row a[i, n, :] (and b[j, n, :]) is read once, converted to float32, and normalized into padded scratch
//      rows: la = (x - max) / T - log(sum exp((x - max) / T)) and, for the a side, p = exp(la);
//   2. every pair (i, j) is reduced from those cache-resident rows in the direct form sum_c p_ic (la_ic - lb_jc),
//      float32 within the sample, float64 across samples.
// Subtracting the row max *before* dividing by T keeps (x - max) exact for the classes that carry the mass, so the
// result stays accurate for large logits and for near-identical distributions (where KL ~ 1e-7).
// Samples are split statically over OpenMP threads; each thread sums into its own float64 buffer and the buffers
// are added in thread order, so results do not depend on scheduling.
#include "pairwise_kl_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

// NOTE: the build uses portable flags (no -march=native); GCC function multi-versioning compiles the hot loops
// for AVX-512, AVX2+FMA and baseline x86-64 and picks one at load time.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(KLAS_NO_CLONES)
#define KLAS_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define KLAS_CLONES
#endif
#define KLAS_INLINE inline __attribute__((always_inline))

namespace klas {
namespace {

constexpr int64_t kPad = 16;  // scratch rows padded to a multiple of one AVX-512 vector; padding holds p = la = 0

KLAS_INLINE float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

KLAS_INLINE uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// e^x for x <= 0: x = k ln2 + r with |r| <= ln2 / 2, e^r by its Taylor series to degree 7 (truncation error
// < 6e-9 relative, below half an ulp), 2^k built in the exponent bits. Branch-free so loops vectorize.
KLAS_INLINE float exp_nonpositive_inl(float x) {
  const float xc = std::min(std::max(x, -87.0f), 0.0f);
  const float kf = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest integer
  float r = xc - kf * 0.693145751953125f;                                   // ln2, high part (exact product)
  r = r - kf * 1.42860676533018704e-06f;                                    // ln2, low part
  float q = 1.0f / 5040.0f;
  q = q * r + 1.0f / 720.0f;
  q = q * r + 1.0f / 120.0f;
  q = q * r + 1.0f / 24.0f;
  q = q * r + 1.0f / 6.0f;
  q = q * r + 0.5f;
  q = q * r + 1.0f;
  q = q * r + 1.0f;
  const int32_t k = static_cast<int32_t>(kf);
  const float scale = bits_to_float(static_cast<uint32_t>(k + 127) << 23);
  return x < -87.0f ? 0.0f : q * scale;
}

// binary16 -> binary32 without branches: shifting the exponent+mantissa into place and scaling by 2^112 rebiases
// normals and subnormals alike; inf/nan keep their payload with an all-ones exponent.
KLAS_INLINE float half_to_float_inl(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7fffu;
  const float finite = bits_to_float(em << 13) * 0x1p112f;
  const uint32_t bits = em >= 0x7c00u ? ((em << 13) | 0x7f800000u) : float_to_bits(finite);
  return bits_to_float(bits | sign);
}

KLAS_INLINE float bfloat16_to_float_inl(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

KLAS_CLONES void convert_half_row(const uint16_t* src, float* dst, int64_t c) {
#pragma omp simd
  for (int64_t k = 0; k < c; ++k) dst[k] = half_to_float_inl(src[k]);
}

KLAS_CLONES void convert_bfloat16_row(const uint16_t* src, float* dst, int64_t c) {
#pragma omp simd
  for (int64_t k = 0; k < c; ++k) dst[k] = bfloat16_to_float_inl(src[k]);
}

// Normalizes one row of logits into la (and p when given); returns false if the row has an inf or nan.
KLAS_CLONES bool normalize_row(const float* x, int64_t c, int64_t cp, float inv_t, float* la, float* p) {
  float m = -std::numeric_limits<float>::infinity();
  float check = 0.0f;  // x * 0 is nan exactly when x is inf or nan
#pragma omp simd reduction(max : m) reduction(+ : check)
  for (int64_t k = 0; k < c; ++k) {
    m = std::max(m, x[k]);
    check += x[k] * 0.0f;
  }
  if (!(check == 0.0f)) return false;
  float* e = p != nullptr ? p : la;  // the exponentials are staged in an output row
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t k = 0; k < c; ++k) {
    const float v = exp_nonpositive_inl((x[k] - m) * inv_t);
    e[k] = v;
    s += v;
  }
  const float log_s = std::log(s);
  const float inv_s = 1.0f / s;
  if (p != nullptr) {
#pragma omp simd
    for (int64_t k = 0; k < c; ++k) {
      p[k] *= inv_s;
      la[k] = (x[k] - m) * inv_t - log_s;
    }
    for (int64_t k = c; k < cp; ++k) p[k] = 0.0f;
  } else {
#pragma omp simd
    for (int64_t k = 0; k < c; ++k) la[k] = (x[k] - m) * inv_t - log_s;
  }
  for (int64_t k = c; k < cp; ++k) la[k] = 0.0f;
  return true;
}

// acc[i, j] += sum_c pa[i, c] * (la[i, c] - lb[j, c]) over padded rows; four b rows share each load of an a row.
KLAS_CLONES void pair_block(const float* pa, const float* la, const float* lb, int64_t n_a, int64_t n_b, int64_t cp,
                            double* acc) {
  for (int64_t i = 0; i < n_a; ++i) {
    const float* p = pa + i * cp;
    const float* l = la + i * cp;
    double* row = acc + i * n_b;
    int64_t j = 0;
    for (; j + 4 <= n_b; j += 4) {
      const float* q0 = lb + j * cp;
      const float* q1 = q0 + cp;
      const float* q2 = q1 + cp;
      const float* q3 = q2 + cp;
      float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
      for (int64_t k = 0; k < cp; ++k) {
        const float pk = p[k], lk = l[k];
        s0 += pk * (lk - q0[k]);
        s1 += pk * (lk - q1[k]);
        s2 += pk * (lk - q2[k]);
        s3 += pk * (lk - q3[k]);
      }
      row[j] += s0;
      row[j + 1] += s1;
      row[j + 2] += s2;
      row[j + 3] += s3;
    }
    for (; j < n_b; ++j) {
      const float* q = lb + j * cp;
      float s = 0.0f;
#pragma omp simd reduction(+ : s)
      for (int64_t k = 0; k < cp; ++k) s += p[k] * (l[k] - q[k]);
      row[j] += s;
    }
  }
}

struct AlignedFree {
  void operator()(float* ptr) const { std::free(ptr); }
};

std::unique_ptr<float[], AlignedFree> aligned_floats(int64_t count) {
  const size_t bytes = ((static_cast<size_t>(count) * sizeof(float) + 63) / 64) * 64;
  void* ptr = std::aligned_alloc(64, std::max<size_t>(bytes, 64));
  if (ptr == nullptr) throw std::bad_alloc();
  return std::unique_ptr<float[], AlignedFree>(static_cast<float*>(ptr));
}

// One row of logits as float32: a pointer into the input for float32, else converted into buf.
const float* load_row(const PairwiseKLArgs& g, const void* base, int64_t offset, float* buf) {
  switch (g.type) {
    case ElemType::kFloat16:
      convert_half_row(static_cast<const uint16_t*>(base) + offset, buf, g.c);
      return buf;
    case ElemType::kBFloat16:
      convert_bfloat16_row(static_cast<const uint16_t*>(base) + offset, buf, g.c);
      return buf;
    case ElemType::kFloat32:
    default:
      return static_cast<const float*>(base) + offset;
  }
}

int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

int default_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace

float exp_nonpositive(float x) { return exp_nonpositive_inl(x); }
float half_to_float(uint16_t bits) { return half_to_float_inl(bits); }
float bfloat16_to_float(uint16_t bits) { return bfloat16_to_float_inl(bits); }

bool pairwise_kl_sum_cpu(const PairwiseKLArgs& g, double* out, int num_threads) {
  const int64_t n_a = g.n_a, n_b = g.n_b, n = g.n, c = g.c;
  const bool self = g.b == nullptr;
  std::fill(out, out + n_a * n_b, 0.0);
  if (n_a == 0 || n_b == 0 || n == 0 || c == 0) return true;
  const int64_t cp = (c + kPad - 1) / kPad * kPad;
  int threads = num_threads > 0 ? num_threads : default_threads();
  threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, n)));

  // Per thread: la and p for the a rows, la for the b rows (none in self mode), one conversion row.
  const int64_t per_thread = (2 * n_a + (self ? 0 : n_b) + 1) * cp;
  auto scratch = aligned_floats(per_thread * threads);
  std::vector<double> partial(static_cast<size_t>(threads) * n_a * n_b, 0.0);
  std::vector<char> bad(threads, 0);
  const void* b = self ? g.a : g.b;
  const int64_t b_row = self ? g.a_stride_row : g.b_stride_row;
  const int64_t b_sample = self ? g.a_stride_sample : g.b_stride_sample;

#pragma omp parallel num_threads(threads)
  {
    const int t = thread_id();
    float* la_a = scratch.get() + t * per_thread;
    float* p_a = la_a + n_a * cp;
    float* la_b = self ? la_a : p_a + n_a * cp;
    float* row_buf = la_a + (2 * n_a + (self ? 0 : n_b)) * cp;
    double* acc = partial.data() + static_cast<size_t>(t) * n_a * n_b;
#pragma omp for schedule(static)
    for (int64_t s = 0; s < n; ++s) {
      if (bad[t]) continue;
      bool ok = true;
      for (int64_t i = 0; i < n_a && ok; ++i) {
        const float* x = load_row(g, g.a, i * g.a_stride_row + s * g.a_stride_sample, row_buf);
        ok = normalize_row(x, c, cp, g.inv_temperature, la_a + i * cp, p_a + i * cp);
      }
      for (int64_t j = 0; j < n_b && ok && !self; ++j) {
        const float* x = load_row(g, b, j * b_row + s * b_sample, row_buf);
        ok = normalize_row(x, c, cp, g.inv_temperature, la_b + j * cp, nullptr);
      }
      if (!ok) {
        bad[t] = 1;
        continue;
      }
      pair_block(p_a, la_a, la_b, n_a, n_b, cp, acc);
    }
  }

  bool finite = true;
  for (int t = 0; t < threads; ++t) {
    finite = finite && !bad[t];
    const double* acc = partial.data() + static_cast<size_t>(t) * n_a * n_b;
    for (int64_t k = 0; k < n_a * n_b; ++k) out[k] += acc[k];
  }
  return finite;
}

}  // namespace klas
