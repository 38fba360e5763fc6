// Fused all-pairs softmax KL on the CPU (see pairwise_kl_cpu.h for the contract). Two kernels: an AVX2 + FMA one
// written with intrinsics (further down; used where the CPU has AVX2), and this portable one. Portable, per sample n
// and per thread:
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
#if defined(__x86_64__)
#include <immintrin.h>
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
  double s = 0.0;  // float64: a float32 sum over thousands of classes shifts log s by more than a small KL
#pragma omp simd reduction(+ : s)
  for (int64_t k = 0; k < c; ++k) {
    const float v = exp_nonpositive_inl((x[k] - m) * inv_t);
    e[k] = v;
    s += v;
  }
  const float log_s = static_cast<float>(std::log(s));
  const float inv_s = static_cast<float>(1.0 / s);
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

// Per-thread float64 sums added in thread order (results do not depend on scheduling); false if a thread saw a
// non-finite row.
bool add_partials(const std::vector<double>& partial, const std::vector<char>& bad, int threads, int64_t pairs,
                  double* out) {
  bool finite = true;
  for (int t = 0; t < threads; ++t) {
    finite = finite && !bad[t];
    const double* acc = partial.data() + static_cast<size_t>(t) * pairs;
    for (int64_t k = 0; k < pairs; ++k) out[k] += acc[k];
  }
  return finite;
}

// ---------------------------------------------------------------------------------------------------------------
// AVX2 + FMA path (x86-64 with GCC; chosen at run time when the CPU has AVX2, FMA and F16C). GCC does not vectorize
// the portable loops above (the max and exp loops compile to scalar code), so this path spells the vectors out.
// Per sample and per chunk of classes (sized so that the chunk's scratch rows stay in L2):
//   t = (x - max) / T and e = exp(t) for every row, s = sum e in float64 (max from a first, read-only pass);
//   every pair (i, j) by a 3 x 3 register tile:  acc_ij += sum_c e_ic (ta_ic - tb_jc)   (float32 in the chunk);
// and at the end of the sample  KL_ij = acc_ij / s_i - log s_i + log s_j,  exact algebra since sum_c e_ic = s_i.
// It is still the direct form: ta - tb is formed per class, so close distributions do not cancel.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(KLAS_NO_AVX2)
#define KLAS_HAVE_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

constexpr int kTileA = 3, kTileB = 3;
constexpr int64_t kChunkBytes = 256 * 1024;  // scratch rows of one chunk (all rows of a sample) fit in L2

KLAS_INLINE __m256 exp8_nonpositive(__m256 x) {  // the vector form of exp_nonpositive_inl (same steps)
  const __m256 xc = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_setzero_ps());
  const __m256 kf = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(kf, _mm256_set1_ps(0.693145751953125f), xc);
  r = _mm256_fnmadd_ps(kf, _mm256_set1_ps(1.42860676533018704e-06f), r);
  __m256 q = _mm256_set1_ps(1.0f / 5040.0f);
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(1.0f / 720.0f));
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(1.0f / 120.0f));
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(1.0f / 24.0f));
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(1.0f / 6.0f));
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(0.5f));
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(1.0f));
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(1.0f));
  const __m256i k = _mm256_cvtps_epi32(kf);
  const __m256 scale = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k, _mm256_set1_epi32(127)), 23));
  const __m256 keep = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_GE_OQ);
  return _mm256_and_ps(_mm256_mul_ps(q, scale), keep);
}

// Eight logits starting at src[k] as float32 (all eight must be in bounds).
template <ElemType T>
KLAS_INLINE __m256 load8(const void* src, int64_t k) {
  if constexpr (T == ElemType::kFloat32) {
    return _mm256_loadu_ps(static_cast<const float*>(src) + k);
  } else {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(src) + k));
    if constexpr (T == ElemType::kFloat16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
}

// The last rem < 8 logits from src[k], the other lanes set to fill.
template <ElemType T>
KLAS_INLINE __m256 load_tail(const void* src, int64_t k, int64_t rem, float fill) {
  alignas(32) float buf[8];
  for (int64_t l = 0; l < 8; ++l) {
    if (l >= rem) {
      buf[l] = fill;
    } else if constexpr (T == ElemType::kFloat32) {
      buf[l] = static_cast<const float*>(src)[k + l];
    } else if constexpr (T == ElemType::kFloat16) {
      buf[l] = half_to_float_inl(static_cast<const uint16_t*>(src)[k + l]);
    } else {
      buf[l] = bfloat16_to_float_inl(static_cast<const uint16_t*>(src)[k + l]);
    }
  }
  return _mm256_load_ps(buf);
}

KLAS_INLINE float hmax8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

KLAS_INLINE double hsum8(__m256 v) {  // in float64
  const __m256d d = _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(v)),
                                  _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
  __m128d h = _mm_add_pd(_mm256_castpd256_pd128(d), _mm256_extractf128_pd(d, 1));
  return _mm_cvtsd_f64(_mm_add_sd(h, _mm_unpackhi_pd(h, h)));
}

// Row maximum; false if the row holds an inf or nan (x * 0 is nan exactly then).
template <ElemType T>
bool row_max(const void* src, int64_t c, float* max_out) {
  __m256 m0 = _mm256_set1_ps(-std::numeric_limits<float>::infinity()), m1 = m0;
  __m256 chk = _mm256_setzero_ps();
  const __m256 zero = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= c; k += 16) {
    const __m256 x0 = load8<T>(src, k), x1 = load8<T>(src, k + 8);
    m0 = _mm256_max_ps(m0, x0);
    m1 = _mm256_max_ps(m1, x1);
    chk = _mm256_add_ps(chk, _mm256_add_ps(_mm256_mul_ps(x0, zero), _mm256_mul_ps(x1, zero)));
  }
  for (; k + 8 <= c; k += 8) {
    const __m256 x = load8<T>(src, k);
    m0 = _mm256_max_ps(m0, x);
    chk = _mm256_add_ps(chk, _mm256_mul_ps(x, zero));
  }
  if (k < c) {
    m0 = _mm256_max_ps(m0, load_tail<T>(src, k, c - k, -std::numeric_limits<float>::infinity()));
    chk = _mm256_add_ps(chk, _mm256_mul_ps(load_tail<T>(src, k, c - k, 0.0f), zero));
  }
  *max_out = hmax8(_mm256_max_ps(m0, m1));
  return hsum8(chk) == 0.0;
}

// t = (x - m) / T (and e = exp(t) when e != nullptr) for classes [c0, c0 + w) into padded rows; returns sum e.
template <ElemType T>
double row_chunk(const void* src, int64_t c0, int64_t w, int64_t wp, float m, float inv_t, float* t, float* e) {
  const __m256 vm = _mm256_set1_ps(m), vt = _mm256_set1_ps(inv_t);
  __m256d sd0 = _mm256_setzero_pd(), sd1 = _mm256_setzero_pd();
  __m256 sf = _mm256_setzero_ps();
  int64_t k = 0, blocks = 0;
  for (; k + 8 <= w; k += 8) {
    const __m256 tv = _mm256_mul_ps(_mm256_sub_ps(load8<T>(src, c0 + k), vm), vt);
    const __m256 ev = exp8_nonpositive(tv);
    _mm256_store_ps(t + k, tv);
    if (e != nullptr) _mm256_store_ps(e + k, ev);
    sf = _mm256_add_ps(sf, ev);
    if (++blocks == 16) {  // float32 over 128 classes, float64 beyond: sums over 32k+ classes stay exact enough
      sd0 = _mm256_add_pd(sd0, _mm256_cvtps_pd(_mm256_castps256_ps128(sf)));
      sd1 = _mm256_add_pd(sd1, _mm256_cvtps_pd(_mm256_extractf128_ps(sf, 1)));
      sf = _mm256_setzero_ps();
      blocks = 0;
    }
  }
  if (k < w) {  // lanes past the row: t = 0 and e = 0, so they add nothing to any pair
    const __m256 tv = _mm256_mul_ps(_mm256_sub_ps(load_tail<T>(src, c0 + k, w - k, m), vm), vt);
    const __m256 live = _mm256_cmp_ps(_mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7),
                                      _mm256_set1_ps(static_cast<float>(w - k)), _CMP_LT_OQ);
    const __m256 ev = _mm256_and_ps(exp8_nonpositive(tv), live);
    _mm256_store_ps(t + k, tv);
    if (e != nullptr) _mm256_store_ps(e + k, ev);
    sf = _mm256_add_ps(sf, ev);
    k += 8;
  }
  for (; k < wp; k += 8) {
    _mm256_store_ps(t + k, _mm256_setzero_ps());
    if (e != nullptr) _mm256_store_ps(e + k, _mm256_setzero_ps());
  }
  sd0 = _mm256_add_pd(_mm256_add_pd(sd0, sd1), _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(sf)),
                                                            _mm256_cvtps_pd(_mm256_extractf128_ps(sf, 1))));
  __m128d h = _mm_add_pd(_mm256_castpd256_pd128(sd0), _mm256_extractf128_pd(sd0, 1));
  return _mm_cvtsd_f64(_mm_add_sd(h, _mm_unpackhi_pd(h, h)));
}

// acc[i, j] += sum_k e[i, k] (ta[i, k] - tb[j, k]) for an RA x RB tile; rows are ld floats apart, wp % 8 == 0.
template <int RA, int RB>
KLAS_INLINE void pair_tile(const float* ta, const float* ea, const float* tb, int64_t ld, int64_t wp, double* acc,
                           int64_t acc_ld) {
  __m256 s[RA][RB];
#pragma GCC unroll 4
  for (int i = 0; i < RA; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < RB; ++j) s[i][j] = _mm256_setzero_ps();
  for (int64_t k = 0; k < wp; k += 8) {
    __m256 q[RB];
#pragma GCC unroll 4
    for (int j = 0; j < RB; ++j) q[j] = _mm256_load_ps(tb + j * ld + k);
#pragma GCC unroll 4
    for (int i = 0; i < RA; ++i) {
      const __m256 l = _mm256_load_ps(ta + i * ld + k), p = _mm256_load_ps(ea + i * ld + k);
#pragma GCC unroll 4
      for (int j = 0; j < RB; ++j) s[i][j] = _mm256_fmadd_ps(p, _mm256_sub_ps(l, q[j]), s[i][j]);
    }
  }
#pragma GCC unroll 4
  for (int i = 0; i < RA; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < RB; ++j) acc[i * acc_ld + j] += hsum8(s[i][j]);
}

template <int RA>
void pair_row_tiles(const float* ta, const float* ea, const float* tb, int64_t n_b, int64_t ld, int64_t wp,
                    double* acc) {
  int64_t j = 0;
  for (; j + kTileB <= n_b; j += kTileB) pair_tile<RA, kTileB>(ta, ea, tb + j * ld, ld, wp, acc + j, n_b);
  if (n_b - j == 2) pair_tile<RA, 2>(ta, ea, tb + j * ld, ld, wp, acc + j, n_b);
  if (n_b - j == 1) pair_tile<RA, 1>(ta, ea, tb + j * ld, ld, wp, acc + j, n_b);
}

void pair_chunk(const float* ta, const float* ea, const float* tb, int64_t n_a, int64_t n_b, int64_t ld, int64_t wp,
                double* acc) {
  int64_t i = 0;
  for (; i + kTileA <= n_a; i += kTileA) {
    pair_row_tiles<kTileA>(ta + i * ld, ea + i * ld, tb, n_b, ld, wp, acc + i * n_b);
  }
  if (n_a - i == 2) pair_row_tiles<2>(ta + i * ld, ea + i * ld, tb, n_b, ld, wp, acc + i * n_b);
  if (n_a - i == 1) pair_row_tiles<1>(ta + i * ld, ea + i * ld, tb, n_b, ld, wp, acc + i * n_b);
}

template <ElemType T>
bool pairwise_kl_avx2_typed(const PairwiseKLArgs& g, double* out, int threads) {
  const int64_t n_a = g.n_a, n_b = g.n_b, n = g.n, c = g.c;
  const bool self = g.b == nullptr;
  const int64_t rows = 2 * n_a + (self ? 0 : n_b);
  const int64_t c8 = (c + 7) / 8 * 8;
  const int64_t budget = std::max<int64_t>(256, kChunkBytes / (4 * rows) / 8 * 8);
  const int64_t chunks = (c8 + budget - 1) / budget;
  const int64_t wp_max = ((c8 + chunks - 1) / chunks + 7) / 8 * 8;  // equal chunks: no short last one
  const int64_t ld = wp_max + (wp_max % 128 == 0 ? 8 : 0);           // rows 2^k floats apart alias in L1
  const int64_t per_thread = rows * ld;  // a multiple of 8 floats: every row stays 32-byte aligned
  auto scratch = aligned_floats(per_thread * threads);
  std::vector<double> partial(static_cast<size_t>(threads) * n_a * n_b, 0.0);
  std::vector<char> bad(threads, 0);
  const void* b = self ? g.a : g.b;
  const int64_t b_row = self ? g.a_stride_row : g.b_stride_row;
  const int64_t b_sample = self ? g.a_stride_sample : g.b_stride_sample;
  const int64_t esize = T == ElemType::kFloat32 ? 4 : 2;
  auto at = [esize](const void* base, int64_t offset) {
    return static_cast<const void*>(static_cast<const char*>(base) + offset * esize);
  };

#pragma omp parallel num_threads(threads)
  {
    const int tid = thread_id();
    float* ta = scratch.get() + tid * per_thread;
    float* ea = ta + n_a * ld;
    float* tb = self ? ta : ea + n_a * ld;
    std::vector<float> max_a(n_a), max_b(n_b);
    std::vector<double> s_a(n_a), s_b(n_b), kl(n_a * n_b);
    double* total = partial.data() + static_cast<size_t>(tid) * n_a * n_b;
#pragma omp for schedule(static)
    for (int64_t s = 0; s < n; ++s) {
      if (bad[tid]) continue;
      bool ok = true;
      for (int64_t i = 0; i < n_a && ok; ++i) {
        ok = row_max<T>(at(g.a, i * g.a_stride_row + s * g.a_stride_sample), c, &max_a[i]);
      }
      for (int64_t j = 0; j < n_b && ok && !self; ++j) ok = row_max<T>(at(b, j * b_row + s * b_sample), c, &max_b[j]);
      if (!ok) {
        bad[tid] = 1;
        continue;
      }
      std::fill(s_a.begin(), s_a.end(), 0.0);
      std::fill(s_b.begin(), s_b.end(), 0.0);
      std::fill(kl.begin(), kl.end(), 0.0);
      for (int64_t c0 = 0; c0 < c; c0 += wp_max) {
        const int64_t w = std::min(wp_max, c - c0), wp = (w + 7) / 8 * 8;
        for (int64_t i = 0; i < n_a; ++i)
          s_a[i] += row_chunk<T>(at(g.a, i * g.a_stride_row + s * g.a_stride_sample), c0, w, wp, max_a[i],
                                 g.inv_temperature, ta + i * ld, ea + i * ld);
        for (int64_t j = 0; j < n_b && !self; ++j)
          s_b[j] += row_chunk<T>(at(b, j * b_row + s * b_sample), c0, w, wp, max_b[j], g.inv_temperature,
                                 tb + j * ld, nullptr);
        pair_chunk(ta, ea, tb, n_a, n_b, ld, wp, kl.data());
      }
      const std::vector<double>& sb = self ? s_a : s_b;
      for (int64_t i = 0; i < n_a; ++i) {
        const double inv = 1.0 / s_a[i], log_a = std::log(s_a[i]);
        for (int64_t j = 0; j < n_b; ++j) total[i * n_b + j] += kl[i * n_b + j] * inv - (log_a - std::log(sb[j]));
      }
    }
  }
  return add_partials(partial, bad, threads, n_a * n_b, out);
}

bool pairwise_kl_sum_avx2(const PairwiseKLArgs& g, double* out, int num_threads) {
  std::fill(out, out + g.n_a * g.n_b, 0.0);
  if (g.n_a == 0 || g.n_b == 0 || g.n == 0 || g.c == 0) return true;
  int threads = num_threads > 0 ? num_threads : default_threads();
  threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, g.n)));
  switch (g.type) {
    case ElemType::kFloat16:
      return pairwise_kl_avx2_typed<ElemType::kFloat16>(g, out, threads);
    case ElemType::kBFloat16:
      return pairwise_kl_avx2_typed<ElemType::kBFloat16>(g, out, threads);
    case ElemType::kFloat32:
    default:
      return pairwise_kl_avx2_typed<ElemType::kFloat32>(g, out, threads);
  }
}

#pragma GCC pop_options

bool avx2_available() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
#else
bool pairwise_kl_sum_avx2(const PairwiseKLArgs&, double*, int) { return false; }
bool avx2_available() { return false; }
#endif

}  // namespace

float exp_nonpositive(float x) { return exp_nonpositive_inl(x); }
float half_to_float(uint16_t bits) { return half_to_float_inl(bits); }
float bfloat16_to_float(uint16_t bits) { return bfloat16_to_float_inl(bits); }

bool pairwise_kl_sum_cpu_portable(const PairwiseKLArgs& g, double* out, int num_threads) {
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

  return add_partials(partial, bad, threads, n_a * n_b, out);
}

bool pairwise_kl_sum_cpu(const PairwiseKLArgs& g, double* out, int num_threads) {
  const char* env = std::getenv("KLAS_KL_CPU_PORTABLE");  // tests compare the two paths on the same inputs
  const bool portable = env != nullptr && env[0] == '1';
  if (!portable && avx2_available()) return pairwise_kl_sum_avx2(g, out, num_threads);
  return pairwise_kl_sum_cpu_portable(g, out, num_threads);
}

const char* pairwise_kl_cpu_path() {
  const char* env = std::getenv("KLAS_KL_CPU_PORTABLE");
  return (env == nullptr || env[0] != '1') && avx2_available() ? "avx2" : "portable";
}

}  // namespace klas
