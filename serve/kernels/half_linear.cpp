// A float32 linear layer whose weight is stored in float16, for the CPU.
//
// Decoding multiplies a few rows by every weight matrix, so a decode step's time is mostly
// the weights streaming in from memory. Stored in half precision they are half the bytes; each
// eight weights are widened to float32 in registers (F16C) and multiplied there, so activations,
// accumulation and outputs stay float32. Faster than oneDNN's float32 matmul on prepacked
// weights from 1 row (~1.6x) to ~256 rows on a 2-core AVX2 EPYC (SmolLM2's shapes).
//
// Tiling: four weight rows (outputs) by two input rows at a time, eight accumulators, the
// weight rows' K values read once from memory and reused from L1 for every pair of input rows.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

// y[m, n] = x[m] . w[n] for outputs [n0, n1): any shapes, plain loops.
void rows_generic(const float* x, const at::Half* w, float* y, int64_t M, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const at::Half* wn = w + n * K;
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * K;
      float dot = 0.0f;
      for (int64_t k = 0; k < K; ++k) dot += xm[k] * static_cast<float>(wn[k]);
      y[m * N + n] = dot;
    }
  }
}

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
inline __m256 widen8(const at::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

// Lane j of the result is the sum of the lanes of v[j].
inline __m256 sum_lanes8(const __m256 v[8]) {
  const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

// K a multiple of 8; outputs [n0, n1) in tiles of four (a short last tile repeats its last
// row, whose lanes are dropped), input rows in pairs (an odd last row likewise).
void rows_avx2(const float* x, const at::Half* w, float* y, int64_t M, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; n += 4) {
    const int64_t outs = std::min<int64_t>(4, n1 - n);
    const at::Half* w0 = w + n * K;
    const at::Half* w1 = w + (n + std::min<int64_t>(1, outs - 1)) * K;
    const at::Half* w2 = w + (n + std::min<int64_t>(2, outs - 1)) * K;
    const at::Half* w3 = w + (n + outs - 1) * K;
    for (int64_t m = 0; m < M; m += 2) {
      const float* xa = x + m * K;
      const float* xb = x + std::min(m + 1, M - 1) * K;
      __m256 acc[8];
      for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
      for (int64_t k = 0; k < K; k += 8) {
        const __m256 a = _mm256_loadu_ps(xa + k), b = _mm256_loadu_ps(xb + k);
        const __m256 v0 = widen8(w0 + k), v1 = widen8(w1 + k), v2 = widen8(w2 + k), v3 = widen8(w3 + k);
        acc[0] = _mm256_fmadd_ps(a, v0, acc[0]);
        acc[1] = _mm256_fmadd_ps(a, v1, acc[1]);
        acc[2] = _mm256_fmadd_ps(a, v2, acc[2]);
        acc[3] = _mm256_fmadd_ps(a, v3, acc[3]);
        acc[4] = _mm256_fmadd_ps(b, v0, acc[4]);
        acc[5] = _mm256_fmadd_ps(b, v1, acc[5]);
        acc[6] = _mm256_fmadd_ps(b, v2, acc[6]);
        acc[7] = _mm256_fmadd_ps(b, v3, acc[7]);
      }
      float sums[8];  // row m's four outputs, then row m + 1's
      _mm256_storeu_ps(sums, sum_lanes8(acc));
      std::copy(sums, sums + outs, y + m * N + n);
      if (m + 1 < M) std::copy(sums + 4, sums + 4 + outs, y + (m + 1) * N + n);
    }
  }
}
#endif

// x (..., K) float32; weight (N, K) float16, contiguous; bias (N,) float32 or None -> (..., N) float32.
at::Tensor linear_half_weight(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(input.scalar_type() == at::kFloat, "input must be float32");
  TORCH_CHECK(weight.scalar_type() == at::kHalf && weight.dim() == 2 && weight.is_contiguous(), "weight must be a contiguous (out, in) float16 matrix");
  TORCH_CHECK(input.size(-1) == weight.size(1), "input has ", input.size(-1), " features, weight takes ", weight.size(1));
  const int64_t K = weight.size(1), N = weight.size(0);
  const at::Tensor x = input.reshape({-1, K}).contiguous();
  const int64_t M = x.size(0);
  std::vector<int64_t> shape(input.sizes().begin(), input.sizes().end());
  shape.back() = N;
  at::Tensor y = at::empty({M, N}, input.options());
  const float* xp = x.data_ptr<float>();
  const at::Half* wp = weight.data_ptr<at::Half>();
  float* yp = y.data_ptr<float>();
  // outputs split across threads in tiles of four; 16 tiles at least per task
  at::parallel_for(0, (N + 3) / 4, 16, [&](int64_t t0, int64_t t1) {
    const int64_t n0 = t0 * 4, n1 = std::min(t1 * 4, N);
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
    if (K % 8 == 0) return rows_avx2(xp, wp, yp, M, K, N, n0, n1);
#endif
    rows_generic(xp, wp, yp, M, K, N, n0, n1);
  });
  if (bias.has_value() && bias->defined()) y.add_(*bias);
  return y.view(shape);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ministack, m) { m.def("linear_half_weight(Tensor input, Tensor weight, Tensor? bias) -> Tensor"); }

TORCH_LIBRARY_IMPL(ministack, CPU, m) { m.impl("linear_half_weight", &linear_half_weight); }
