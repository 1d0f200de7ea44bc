// The decoder's small per-layer ops fused for the CPU: RMSNorm and the rotary embedding.
//
// At decode batch sizes these run on a few rows, where each ATen op they decompose into
// (pow, mean, add, rsqrt, mul; slice, mul, sub, cat) costs more in dispatch than in
// arithmetic: ~45 us per RMSNorm and ~40 us per rotary call on SmolLM2 (2-core EPYC), 5 ms of a
// 25 ms single-sequence step. One pass over the data each, float32 only (the engine falls back
// to torch for other dtypes).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

namespace {

// y = x / sqrt(mean(x^2) + eps) * weight, per row of a contiguous (rows, hidden) float32 x.
at::Tensor rms_norm(const at::Tensor& input, const at::Tensor& weight, double eps) {
  TORCH_CHECK(input.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat, "rms_norm: float32 only");
  const int64_t hidden = input.size(-1);
  TORCH_CHECK(weight.numel() == hidden, "rms_norm: weight has ", weight.numel(), " elements, rows have ", hidden);
  const at::Tensor x = input.contiguous(), w = weight.contiguous();
  at::Tensor out = at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, x.numel() / hidden, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* row = xp + r * hidden;
      float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
      for (int64_t i = 0; i < hidden; ++i) squares += row[i] * row[i];
      const float scale = 1.0f / std::sqrt(squares / hidden + static_cast<float>(eps));
      float* dst = op + r * hidden;
#pragma omp simd
      for (int64_t i = 0; i < hidden; ++i) dst[i] = row[i] * scale * wp[i];
    }
  });
  return out;
}

// x (tokens, heads, head_dim) rotated 'rotate half' style by cos/sin (tokens, 1, rot / 2):
// the first rot dims turn, the rest pass through (partial rotary). Any strides with a
// contiguous last dim (q and k arrive as views of the fused qkv projection); returns a new
// contiguous tensor.
at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat, "rotary: float32 only");
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1, "rotary: x (tokens, heads, head_dim) with a contiguous last dim");
  const int64_t tokens = x.size(0), heads = x.size(1), head_dim = x.size(2), half = cos.size(-1);
  TORCH_CHECK(cos.numel() == tokens * half && sin.numel() == tokens * half && 2 * half <= head_dim, "rotary: cos/sin must be (tokens, 1, rot / 2)");
  const at::Tensor c = cos.contiguous(), s = sin.contiguous();
  at::Tensor out = at::empty({tokens, heads, head_dim}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* cp = c.data_ptr<float>();
  const float* sp = s.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t st = x.stride(0), sh = x.stride(1);
  at::parallel_for(0, tokens, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float* ct = cp + t * half;
      const float* stt = sp + t * half;
      for (int64_t h = 0; h < heads; ++h) {
        const float* src = xp + t * st + h * sh;
        float* dst = op + (t * heads + h) * head_dim;
#pragma omp simd
        for (int64_t i = 0; i < half; ++i) {
          const float a = src[i], b = src[i + half];
          dst[i] = a * ct[i] - b * stt[i];
          dst[i + half] = b * ct[i] + a * stt[i];
        }
        for (int64_t i = 2 * half; i < head_dim; ++i) dst[i] = src[i];
      }
    }
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
