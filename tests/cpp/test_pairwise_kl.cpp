// Standalone test of the CPU kernel library (no torch): built by CMakeLists.txt, run by ctest, which
// tests/test_ops_cpp.py invokes. Every check compares against an independent float64 computation written here, on
// fresh random inputs (the seed is printed so a failure can be replayed with KLAS_TEST_SEED=<seed>).
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "pairwise_kl_cpu.h"

namespace {

int failures = 0;

void expect(bool ok, const std::string& what) {
  if (!ok) {
    ++failures;
    std::fprintf(stderr, "FAIL: %s\n", what.c_str());
  }
}

// Logits stored as [rows, n, c] floats (or with explicit strides for the layout tests).
struct Logits {
  int64_t rows, n, c;
  int64_t stride_row, stride_sample;
  std::vector<float> data;
  float at(int64_t r, int64_t s, int64_t k) const { return data[r * stride_row + s * stride_sample + k]; }
};

Logits random_logits(std::mt19937_64& gen, int64_t rows, int64_t n, int64_t c, double scale, bool sample_major) {
  std::normal_distribution<double> normal(0.0, 1.0);
  Logits x{rows, n, c, sample_major ? c : n * c, sample_major ? rows * c : c, std::vector<float>(rows * n * c)};
  for (auto& v : x.data) v = static_cast<float>(scale * normal(gen));
  return x;
}

// mean_n KL(softmax(a_i / T) || softmax(b_j / T)) in float64, direct form, straight from the definition.
std::vector<double> reference_mean(const Logits& a, const Logits& b, double t) {
  std::vector<double> out(a.rows * b.rows, 0.0);
  std::vector<double> la(a.c), lb(a.c);
  auto log_softmax = [&](const Logits& x, int64_t r, int64_t s, std::vector<double>& l) {
    double m = -std::numeric_limits<double>::infinity();
    for (int64_t k = 0; k < x.c; ++k) m = std::max(m, static_cast<double>(x.at(r, s, k)) / t);
    double z = 0.0;
    for (int64_t k = 0; k < x.c; ++k) z += std::exp(static_cast<double>(x.at(r, s, k)) / t - m);
    for (int64_t k = 0; k < x.c; ++k) l[k] = static_cast<double>(x.at(r, s, k)) / t - m - std::log(z);
  };
  for (int64_t i = 0; i < a.rows; ++i)
    for (int64_t j = 0; j < b.rows; ++j)
      for (int64_t s = 0; s < a.n; ++s) {
        log_softmax(a, i, s, la);
        log_softmax(b, j, s, lb);
        double kl = 0.0;
        for (int64_t k = 0; k < a.c; ++k) kl += std::exp(la[k]) * (la[k] - lb[k]);
        out[i * b.rows + j] += kl / a.n;
      }
  return out;
}

klas::PairwiseKLArgs args_for(const Logits& a, const Logits* b, double t) {
  klas::PairwiseKLArgs g;
  g.a = a.data.data();
  g.b = b ? b->data.data() : nullptr;
  g.n_a = a.rows;
  g.n_b = b ? b->rows : a.rows;
  g.n = a.n;
  g.c = a.c;
  g.a_stride_row = a.stride_row;
  g.a_stride_sample = a.stride_sample;
  g.b_stride_row = b ? b->stride_row : 0;
  g.b_stride_sample = b ? b->stride_sample : 0;
  g.inv_temperature = static_cast<float>(1.0 / t);
  return g;
}

std::vector<double> run_mean(const klas::PairwiseKLArgs& g, int threads, bool* finite = nullptr) {
  std::vector<double> out(g.n_a * g.n_b);
  const bool ok = klas::pairwise_kl_sum_cpu(g, out.data(), threads);
  if (finite) *finite = ok;
  for (auto& v : out) v /= static_cast<double>(g.n);
  return out;
}

void expect_close(const std::vector<double>& got, const std::vector<double>& ref, double rtol, double atol,
                  const std::string& what) {
  double worst = 0.0;
  for (size_t k = 0; k < ref.size(); ++k) {
    const double excess = std::fabs(got[k] - ref[k]) - (atol + rtol * std::fabs(ref[k]));
    if (!(excess <= 0.0)) worst = std::max(worst, std::isnan(excess) ? 1e300 : excess);
  }
  expect(worst == 0.0, what + ": beyond tolerance by " + std::to_string(worst));
}

void test_exp(std::mt19937_64& gen) {
  std::uniform_real_distribution<double> u(-87.0, 0.0);
  double worst = 0.0;
  for (int k = 0; k < 200000; ++k) {
    const float x = static_cast<float>(k < 100000 ? u(gen) : u(gen) / 1000.0);
    const double ref = std::exp(static_cast<double>(x));
    worst = std::max(worst, std::fabs(klas::exp_nonpositive(x) - ref) / ref);
  }
  expect(worst < 3.0 * std::ldexp(1.0, -23), "exp_nonpositive relative error " + std::to_string(worst));
  expect(klas::exp_nonpositive(0.0f) == 1.0f, "exp(0) == 1");
  expect(klas::exp_nonpositive(-100.0f) == 0.0f, "exp(-100) flushes to 0");
  expect(klas::exp_nonpositive(-std::numeric_limits<float>::infinity()) == 0.0f, "exp(-inf) == 0");
}

// Decoders written from the format definitions, independently of the kernel's bit tricks.
double decode_half(uint16_t h) {
  const int sign = h >> 15, e = (h >> 10) & 31, m = h & 1023;
  double v = e == 0 ? std::ldexp(m, -24) : e == 31 ? (m ? NAN : INFINITY) : std::ldexp(1024 + m, e - 25);
  return sign ? -v : v;
}

double decode_bfloat16(uint16_t h) {
  const int sign = h >> 15, e = (h >> 7) & 255, m = h & 127;
  double v = e == 0 ? std::ldexp(m, -133) : e == 255 ? (m ? NAN : INFINITY) : std::ldexp(128 + m, e - 134);
  return sign ? -v : v;
}

bool same_value(float got, double want) {  // bit-for-bit meaning: equal with the same sign, or both nan
  return std::isnan(want) ? std::isnan(got) : got == want && std::signbit(got) == std::signbit(want);
}

void test_conversions() {
  int bad_half = 0, bad_bf16 = 0;
  for (uint32_t h = 0; h < 65536; ++h) {
    const double want_h = decode_half(static_cast<uint16_t>(h)), want_b = decode_bfloat16(static_cast<uint16_t>(h));
    const float got_h = klas::half_to_float(static_cast<uint16_t>(h));
    const float got_b = klas::bfloat16_to_float(static_cast<uint16_t>(h));
    bad_half += !same_value(got_h, want_h);
    bad_bf16 += !same_value(got_b, want_b);
  }
  expect(bad_half == 0, "half_to_float mismatches: " + std::to_string(bad_half));
  expect(bad_bf16 == 0, "bfloat16_to_float mismatches: " + std::to_string(bad_bf16));
}

void test_accuracy(std::mt19937_64& gen) {
  struct Case { int64_t na, nb, n, c; double scale, t; bool sample_major; };
  const Case cases[] = {{3, 5, 7, 13, 1.0, 1.0, false},  {1, 1, 1, 1, 1.0, 1.0, false},
                        {2, 3, 1, 5, 50.0, 1.0, true},    {4, 6, 9, 37, 0.01, 0.7, false},
                        {5, 4, 11, 100, 50.0, 2.5, true}, {6, 7, 5, 129, 1.0, 1.0, false}};
  for (const auto& k : cases) {
    const auto a = random_logits(gen, k.na, k.n, k.c, k.scale, k.sample_major);
    const auto b = random_logits(gen, k.nb, k.n, k.c, k.scale, !k.sample_major);
    const auto ref = reference_mean(a, b, k.t);
    const std::string name = "shape " + std::to_string(k.na) + "x" + std::to_string(k.nb) + "x" + std::to_string(k.n) +
                             "x" + std::to_string(k.c) + " scale " + std::to_string(k.scale);
    for (int threads : {1, 3}) {
      bool finite = false;
      const auto got = run_mean(args_for(a, &b, k.t), threads, &finite);
      expect(finite, name + ": reported non-finite");
      expect_close(got, ref, 1e-4, 1e-6, name + " threads " + std::to_string(threads));
    }
  }
}

void test_near_identical_and_self(std::mt19937_64& gen) {
  std::normal_distribution<double> normal(0.0, 1.0);
  for (double scale : {1.0, 50.0, 0.0}) {
    // b rows are a rows plus 1e-3 noise: KL ~ 5e-7, where the product form loses every digit in float32.
    // scale 0: logits 1000 + N(0, 1), a softmax-invariant offset that a careless kernel turns into rounding error.
    auto a = random_logits(gen, 4, 23, 100, scale == 0.0 ? 1.0 : scale, false);
    if (scale == 0.0)
      for (auto& v : a.data) v += 1000.0f;
    Logits b = a;
    for (auto& v : b.data) v = static_cast<float>(v + 1e-3 * normal(gen));
    for (double t : {1.0, 0.7}) {  // T != 1: the max must be subtracted before scaling, or rounding swamps the KL
      const auto ref = reference_mean(a, b, t);
      const auto got = run_mean(args_for(a, &b, t), 2);
      expect_close(got, ref, 1e-4, 1e-6, "near-identical scale " + std::to_string(scale) + " T " + std::to_string(t));
    }
    // Self mode: identical to passing the same tensor twice, with an exactly zero diagonal.
    const auto self = run_mean(args_for(a, nullptr, 1.0), 2);
    const auto twice = run_mean(args_for(a, &a, 1.0), 2);
    bool same = true, zero_diag = true;
    for (size_t k = 0; k < self.size(); ++k) same = same && self[k] == twice[k];
    for (int64_t i = 0; i < a.rows; ++i) zero_diag = zero_diag && self[i * a.rows + i] == 0.0;
    expect(same, "self mode equals a against a copy of itself");
    expect(zero_diag, "KL(P||P) is exactly 0 on the diagonal");
    expect_close(self, reference_mean(a, a, 1.0), 1e-4, 1e-6, "self mode vs reference");
  }
}

uint16_t to_half_bits(float f) {  // round-to-nearest-even to binary16 for normal-range values (test data only)
  const double m = std::fabs(f);
  int e;
  std::frexp(m, &e);  // m = f * 2^e with f in [0.5, 1)
  const double ulp = std::ldexp(1.0, std::max(e - 11, -24));
  const double q = std::nearbyint(m / ulp) * ulp;
  int eq;
  const double fq = std::frexp(q, &eq);
  uint16_t bits = 0;
  if (q != 0.0) {
    const int biased = eq - 1 + 15;
    bits = biased <= 0 ? static_cast<uint16_t>(q / std::ldexp(1.0, -24))
                       : static_cast<uint16_t>((biased << 10) | (static_cast<int>(std::ldexp(fq, 11)) & 1023));
  }
  return static_cast<uint16_t>(bits | (std::signbit(f) ? 0x8000 : 0));
}

void test_half_inputs(std::mt19937_64& gen) {
  for (auto type : {klas::ElemType::kFloat16, klas::ElemType::kBFloat16}) {
    auto a = random_logits(gen, 3, 8, 37, 4.0, false);
    auto b = random_logits(gen, 5, 8, 37, 4.0, false);
    std::vector<uint16_t> ha(a.data.size()), hb(b.data.size());
    auto encode = [&](Logits& x, std::vector<uint16_t>& h) {
      for (size_t k = 0; k < h.size(); ++k) {
        uint32_t u;
        std::memcpy(&u, &x.data[k], 4);
        h[k] = type == klas::ElemType::kFloat16 ? to_half_bits(x.data[k]) : static_cast<uint16_t>(u >> 16);
        x.data[k] = static_cast<float>(type == klas::ElemType::kFloat16 ? decode_half(h[k]) : decode_bfloat16(h[k]));
      }
    };
    encode(a, ha);
    encode(b, hb);
    auto g = args_for(a, &b, 1.0);
    g.a = ha.data();
    g.b = hb.data();
    g.type = type;
    expect_close(run_mean(g, 2), reference_mean(a, b, 1.0), 1e-4, 1e-6,
                 type == klas::ElemType::kFloat16 ? "float16 inputs" : "bfloat16 inputs");
  }
}

void test_non_finite(std::mt19937_64& gen) {
  const float specials[] = {NAN, INFINITY, -INFINITY};
  for (float v : specials)
    for (int side = 0; side < 2; ++side) {
      auto a = random_logits(gen, 3, 5, 11, 1.0, false);
      auto b = random_logits(gen, 2, 5, 11, 1.0, false);
      (side == 0 ? a : b).data[(side == 0 ? a : b).data.size() / 2] = v;
      bool finite = true;
      run_mean(args_for(a, &b, 1.0), 2, &finite);
      expect(!finite, "non-finite logit " + std::to_string(v) + " on side " + std::to_string(side) + " detected");
    }
}

}  // namespace

int main() {
  const char* env = std::getenv("KLAS_TEST_SEED");
  const uint64_t seed = env ? std::strtoull(env, nullptr, 10) : std::random_device{}();
  std::printf("seed %llu (replay with KLAS_TEST_SEED)\n", static_cast<unsigned long long>(seed));
  std::mt19937_64 gen(seed);
  test_exp(gen);
  test_conversions();
  test_accuracy(gen);
  test_near_identical_and_self(gen);
  test_half_inputs(gen);
  test_non_finite(gen);
  if (failures) {
    std::fprintf(stderr, "%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("all checks passed\n");
  return 0;
}
