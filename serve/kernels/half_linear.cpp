// A float32 linear layer whose weight is stored in float16, for the CPU.
//
// Decoding multiplies a few rows by every weight matrix, so a decode step's time is mostly
// the weights streaming in from memory. Stored in half precision they are half the bytes; each
// eight weights are widened to float32 in registers (F16C) and multiplied there, so activations,
// accumulation and outputs stay float32. Faster than oneDNN's float32 matmul on prepacked
// weights from 1 row (~1.6x) to ~256 rows on a 2-core AVX2 EPYC (SmolLM2's shapes).
//
// Tiling: four weight rows (outputs) by two input rows at a time (vec.h's 2 x 4 tile), the
// weight rows' K values read once from memory and reused from L1 for every pair of input rows.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#include "vec.h"

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

#if MINISTACK_AVX2
// K a multiple of 8; outputs [n0, n1) in tiles of four weight rows by two input rows (the
// 2 x 4 tile of vec.h; a short last tile repeats its last row, whose lanes are dropped, and
// an odd last input row likewise).
void rows_avx2(const float* x, const at::Half* w, float* y, int64_t M, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; n += 4) {
    const int64_t outs = std::min<int64_t>(4, n1 - n);
    const at::Half* w0 = w + n * K;
    const at::Half* w1 = w + (n + std::min<int64_t>(1, outs - 1)) * K;
    const at::Half* w2 = w + (n + std::min<int64_t>(2, outs - 1)) * K;
    const at::Half* w3 = w + (n + outs - 1) * K;
    for (int64_t m = 0; m < M; m += 2) {
      float sums[8];  // row m's four outputs, then row m + 1's
      ministack::dots_2x4(x + m * K, x + std::min(m + 1, M - 1) * K, w0, w1, w2, w3, K, sums);
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
#if MINISTACK_AVX2
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
