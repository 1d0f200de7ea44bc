// The decoder's small per-layer ops fused for the CPU: RMSNorm and the rotary embedding.
//
// At decode batch sizes these run on a few rows, where each ATen op they decompose into
// (pow, mean, add, rsqrt, mul; slice, mul, sub, cat) costs more in dispatch than in
// arithmetic: ~45 us per RMSNorm and ~40 us per rotary call on SmolLM2 (2-core EPYC), 5 ms of a
// 25 ms single-sequence step. One pass over the data each, for float32, bfloat16 and float16.
// In a 16-bit dtype the arithmetic is float32 and every intermediate the torch expression
// rounds is rounded at the same place (transformers' RMSNorm rounds the normalized row before
// the weight multiplies it; RoPE's products and sums are each 16-bit ops), so the kernels give
// the fallback's bits exactly.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

namespace {

// Rounds a float to scalar_t and back: where the torch expression has a 16-bit intermediate.
template <typename scalar_t>
inline float round_to(float v) { return static_cast<float>(static_cast<scalar_t>(v)); }

// y = x / sqrt(mean(x^2) + eps) * weight, per row of a contiguous (rows, hidden) x.
template <typename scalar_t>
void rms_norm_rows(const scalar_t* xp, const scalar_t* wp, scalar_t* op, int64_t rows, int64_t hidden, float eps) {
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* row = xp + r * hidden;
      float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
      for (int64_t i = 0; i < hidden; ++i) squares += static_cast<float>(row[i]) * static_cast<float>(row[i]);
      const float scale = 1.0f / std::sqrt(squares / hidden + eps);
      scalar_t* dst = op + r * hidden;
#pragma omp simd
      for (int64_t i = 0; i < hidden; ++i) dst[i] = static_cast<scalar_t>(round_to<scalar_t>(static_cast<float>(row[i]) * scale) * static_cast<float>(wp[i]));
    }
  });
}

at::Tensor rms_norm(const at::Tensor& input, const at::Tensor& weight, double eps) {
  TORCH_CHECK(at::isReducedFloatingType(input.scalar_type()) || input.scalar_type() == at::kFloat, "rms_norm: float32, bfloat16 or float16, not ", input.scalar_type());
  TORCH_CHECK(weight.scalar_type() == input.scalar_type(), "rms_norm: weight dtype ", weight.scalar_type(), " differs from input's ", input.scalar_type());
  const int64_t hidden = input.size(-1);
  TORCH_CHECK(weight.numel() == hidden, "rms_norm: weight has ", weight.numel(), " elements, rows have ", hidden);
  const at::Tensor x = input.contiguous(), w = weight.contiguous();
  at::Tensor out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    rms_norm_rows<scalar_t>(x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), x.numel() / hidden, hidden, static_cast<float>(eps));
  });
  return out;
}

// x (tokens, heads, head_dim) rotated 'rotate half' style by cos/sin (tokens, 1, rot / 2):
// the first rot dims turn, the rest pass through (partial rotary). Any strides with a
// contiguous last dim (q and k arrive as views of the fused qkv projection); returns a new
// contiguous tensor.
template <typename scalar_t>
void rotary_rows(const at::Tensor& x, const scalar_t* cp, const scalar_t* sp, scalar_t* op, int64_t half) {
  const int64_t tokens = x.size(0), heads = x.size(1), head_dim = x.size(2), st = x.stride(0), sh = x.stride(1);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  at::parallel_for(0, tokens, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const scalar_t* ct = cp + t * half;
      const scalar_t* stt = sp + t * half;
      for (int64_t h = 0; h < heads; ++h) {
        const scalar_t* src = xp + t * st + h * sh;
        scalar_t* dst = op + (t * heads + h) * head_dim;
#pragma omp simd
        for (int64_t i = 0; i < half; ++i) {
          const float a = src[i], b = src[i + half], c = ct[i], s = stt[i];
          dst[i] = static_cast<scalar_t>(round_to<scalar_t>(a * c) - round_to<scalar_t>(b * s));
          dst[i + half] = static_cast<scalar_t>(round_to<scalar_t>(b * c) + round_to<scalar_t>(a * s));
        }
        for (int64_t i = 2 * half; i < head_dim; ++i) dst[i] = src[i];
      }
    }
  });
}

at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(at::isReducedFloatingType(x.scalar_type()) || x.scalar_type() == at::kFloat, "rotary: float32, bfloat16 or float16, not ", x.scalar_type());
  TORCH_CHECK(cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type(), "rotary: cos/sin must have x's dtype");
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1, "rotary: x (tokens, heads, head_dim) with a contiguous last dim");
  const int64_t tokens = x.size(0), half = cos.size(-1);
  TORCH_CHECK(cos.numel() == tokens * half && sin.numel() == tokens * half && 2 * half <= x.size(2), "rotary: cos/sin must be (tokens, 1, rot / 2)");
  const at::Tensor c = cos.contiguous(), s = sin.contiguous();
  at::Tensor out = at::empty({tokens, x.size(1), x.size(2)}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rotary", [&] {
    rotary_rows<scalar_t>(x, c.data_ptr<scalar_t>(), s.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), half);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ministack, m) {
  m.def("rms_norm(Tensor input, Tensor weight, float eps) -> Tensor");
  m.def("rotary(Tensor x, Tensor cos, Tensor sin) -> Tensor");
}

TORCH_LIBRARY_IMPL(ministack, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("rotary", &rotary);
}
