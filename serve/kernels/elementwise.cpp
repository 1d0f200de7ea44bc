// The decoder's small per-layer ops fused for the CPU: RMSNorm (alone, or after the residual
// stream's add), the rotary embedding and the MLP's SiLU-and-multiply; and the greedy sampler's argmax over each row of logits.
//
// At decode batch sizes these run on a few rows, where each ATen op they decompose into
// (pow, mean, add, rsqrt, mul; slice, mul, sub, cat) costs more in dispatch than in
// arithmetic: ~45 us per RMSNorm and ~40 us per rotary call on SmolLM2 (2-core EPYC), 5 ms of a
// 25 ms single-sequence step. One pass over the data each, for float32, bfloat16 and float16.
// In a 16-bit dtype the arithmetic is float32 and every intermediate the torch expression
// rounds is rounded at the same place (transformers' RMSNorm rounds the normalized row before
// the weight multiplies it; RoPE's products and sums are each 16-bit ops), so the kernels give
// the fallback's bits exactly (SiLU's exponential to float32's last bit or so, so its 16-bit
// results may differ from torch's by one unit in the last place). Written with AVX2 intrinsics
// where the build has them: the compiler does not vectorize the 16-bit conversions on its own
// (a bfloat16 RMSNorm of 512 x 576: 340 -> ~40 us).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#include "vec.h"

namespace {

// float32, bfloat16 and float16: the dtypes the engine runs (each op checks first)
#define DISPATCH_MODEL_DTYPES(TYPE, NAME, ...)                             \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

// Rounds a float to scalar_t and back: where the torch expression has a 16-bit intermediate.
template <typename scalar_t>
inline float round_to(float v) { return static_cast<float>(static_cast<scalar_t>(v)); }

// y = x / sqrt(mean(x^2) + eps) * weight, per row of a contiguous (rows, hidden) x.
template <typename scalar_t>
void rms_norm_rows(const scalar_t* xp, const scalar_t* wp, scalar_t* op, int64_t rows, int64_t hidden, float eps) {
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* row = xp + r * hidden;
      scalar_t* dst = op + r * hidden;
      int64_t i = 0;
      float squares = 0.0f;
#if MINISTACK_AVX2
      const int64_t vec_end = hidden - hidden % 8;
      __m256 acc = _mm256_setzero_ps();
      for (; i < vec_end; i += 8) {
        const __m256 v = ministack::load8(row + i);
        acc = _mm256_fmadd_ps(v, v, acc);
      }
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, acc);
      for (const float lane : lanes) squares += lane;
#endif
      for (int64_t j = i; j < hidden; ++j) squares += static_cast<float>(row[j]) * static_cast<float>(row[j]);
      const float scale = 1.0f / std::sqrt(squares / hidden + eps);
#if MINISTACK_AVX2
      const __m256 vscale = _mm256_set1_ps(scale);
      for (i = 0; i < vec_end; i += 8) {
        const __m256 normed = ministack::round8<scalar_t>(_mm256_mul_ps(ministack::load8(row + i), vscale));
        ministack::store8(dst + i, _mm256_mul_ps(normed, ministack::load8(wp + i)));
      }
#endif
      for (; i < hidden; ++i) dst[i] = static_cast<scalar_t>(round_to<scalar_t>(static_cast<float>(row[i]) * scale) * static_cast<float>(wp[i]));
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
  DISPATCH_MODEL_DTYPES(x.scalar_type(), "rms_norm", [&] {
    rms_norm_rows<scalar_t>(x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), x.numel() / hidden, hidden, static_cast<float>(eps));
  });
  return out;
}

// residual + x, rounded to the dtype as the torch expression `residual + x` rounds it, then
// its RMSNorm: the residual stream's add fused into the norm that reads it next (vLLM's
// fused_add_rms_norm). Returns (normalized, the new residual); one pass over the rows.
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& input, const at::Tensor& residual, const at::Tensor& weight, double eps) {
  TORCH_CHECK(input.sizes() == residual.sizes() && input.scalar_type() == residual.scalar_type(), "add_rms_norm: input and residual alike");
  TORCH_CHECK(at::isReducedFloatingType(input.scalar_type()) || input.scalar_type() == at::kFloat, "add_rms_norm: float32, bfloat16 or float16, not ", input.scalar_type());
  TORCH_CHECK(weight.scalar_type() == input.scalar_type() && weight.numel() == input.size(-1), "add_rms_norm: weight (hidden,) in the input's dtype");
  const at::Tensor x = input.contiguous(), r = residual.contiguous(), w = weight.contiguous();
  at::Tensor sum = at::empty_like(x);
  at::Tensor out = at::empty_like(x);
  const int64_t hidden = x.size(-1), rows = x.numel() / hidden;
  DISPATCH_MODEL_DTYPES(x.scalar_type(), "add_rms_norm", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* rp = r.data_ptr<scalar_t>();
    scalar_t* sp = sum.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t row = r0; row < r1; ++row) {
        int64_t i = row * hidden;
        const int64_t end = i + hidden;
#if MINISTACK_AVX2
        for (; i + 8 <= end; i += 8) ministack::store8(sp + i, _mm256_add_ps(ministack::load8(rp + i), ministack::load8(xp + i)));
#endif
        for (; i < end; ++i) sp[i] = static_cast<scalar_t>(static_cast<float>(rp[i]) + static_cast<float>(xp[i]));
      }
    });
    rms_norm_rows<scalar_t>(sp, w.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), rows, hidden, static_cast<float>(eps));
  });
  return {out, sum};
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
        int64_t i = 0;
#if MINISTACK_AVX2
        using ministack::load8;
        using ministack::round8;
        for (; i + 8 <= half; i += 8) {
          const __m256 a = load8(src + i), b = load8(src + i + half), c = load8(ct + i), s = load8(stt + i);
          ministack::store8(dst + i, _mm256_sub_ps(round8<scalar_t>(_mm256_mul_ps(a, c)), round8<scalar_t>(_mm256_mul_ps(b, s))));
          ministack::store8(dst + i + half, _mm256_add_ps(round8<scalar_t>(_mm256_mul_ps(b, c)), round8<scalar_t>(_mm256_mul_ps(a, s))));
        }
#endif
        for (; i < half; ++i) {
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
  DISPATCH_MODEL_DTYPES(x.scalar_type(), "rotary", [&] {
    rotary_rows<scalar_t>(x, c.data_ptr<scalar_t>(), s.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), half);
  });
  return out;
}

// out = silu(x[:, :n]) * x[:, n:] per row of a contiguous (rows, 2n) x (the MLP's stacked
// gate/up projection), rounding silu's result to the dtype before the product as the torch
// expression `F.silu(gate) * up` does.
template <typename scalar_t>
void silu_and_mul_rows(const scalar_t* xp, scalar_t* op, int64_t rows, int64_t n) {
  at::parallel_for(0, rows * n, 4096, [&](int64_t e0, int64_t e1) {
    for (int64_t e = e0; e < e1;) {
      const int64_t r = e / n, c0 = e % n, c1 = std::min(n, c0 + (e1 - e));
      const scalar_t* gate = xp + r * 2 * n;
      const scalar_t* up = gate + n;
      scalar_t* dst = op + r * n;
      int64_t c = c0;
#if MINISTACK_AVX2
      const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
      for (; c + 8 <= c1; c += 8) {
        const __m256 g = ministack::load8(gate + c);
        const __m256 ex = ministack::exp8_nonpositive(_mm256_sub_ps(zero, _mm256_andnot_ps(_mm256_set1_ps(-0.0f), g)));  // e^-|g|
        const __m256 sig = _mm256_div_ps(_mm256_blendv_ps(one, ex, _mm256_cmp_ps(g, zero, _CMP_LT_OQ)), _mm256_add_ps(one, ex));
        ministack::store8(dst + c, _mm256_mul_ps(ministack::round8<scalar_t>(_mm256_mul_ps(g, sig)), ministack::load8(up + c)));
      }
#endif
      for (; c < c1; ++c) {
        const float g = gate[c];
        dst[c] = static_cast<scalar_t>(round_to<scalar_t>(g / (1.0f + std::exp(-g))) * static_cast<float>(up[c]));
      }
      e += c1 - c0;
    }
  });
}

at::Tensor silu_and_mul(const at::Tensor& input) {
  TORCH_CHECK(at::isReducedFloatingType(input.scalar_type()) || input.scalar_type() == at::kFloat, "silu_and_mul: float32, bfloat16 or float16, not ", input.scalar_type());
  TORCH_CHECK(input.size(-1) % 2 == 0, "silu_and_mul: the last dim (", input.size(-1), ") must be even: gate then up");
  const at::Tensor x = input.contiguous();
  const int64_t n = x.size(-1) / 2;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  at::Tensor out = at::empty(shape, x.options());
  DISPATCH_MODEL_DTYPES(x.scalar_type(), "silu_and_mul", [&] {
    silu_and_mul_rows<scalar_t>(x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), x.numel() / (2 * n), n);
  });
  return out;
}

// The index of each row's largest value in a contiguous (rows, n) float32 tensor, as
// torch.argmax picks it: the first index holding the maximum, a NaN counting as the maximum
// (the first NaN). torch's CPU argmax over SmolLM2's 49,152-entry rows takes ~650 us for 16 rows
// on a 2-core EPYC, 2% of a decode step; this is one vector pass for the maximum and one scan
// for its first index.
int64_t argmax_row(const float* row, int64_t n) {
  float top = -std::numeric_limits<float>::infinity();
  bool nan = false;
  int64_t i = 0;
#if MINISTACK_AVX2
  __m256 acc[4], unordered = _mm256_setzero_ps();
  for (auto& a : acc) a = _mm256_set1_ps(top);
  for (; i + 32 <= n; i += 32)  // four independent maxima: one would wait on its own latency
    for (int a = 0; a < 4; ++a) {
      const __m256 v = _mm256_loadu_ps(row + i + 8 * a);
      acc[a] = _mm256_max_ps(acc[a], v);
      unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, _mm256_max_ps(_mm256_max_ps(acc[0], acc[1]), _mm256_max_ps(acc[2], acc[3])));
  for (const float lane : lanes) top = std::max(top, lane);
  nan = _mm256_movemask_ps(unordered) != 0;
#endif
  for (; i < n; ++i) {
    nan = nan || std::isnan(row[i]);
    top = std::max(top, row[i]);
  }
  int64_t j = 0;
#if MINISTACK_AVX2
  if (!nan) {
    const __m256 target = _mm256_set1_ps(top);
    for (; j + 8 <= n; j += 8)
      if (const int hit = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(row + j), target, _CMP_EQ_OQ))) return j + __builtin_ctz(hit);
  }
#endif
  for (; j < n; ++j)
    if (nan ? std::isnan(row[j]) : row[j] == top) return j;
  return 0;  // n == 0 is refused by the caller
}

at::Tensor argmax_rows(const at::Tensor& logits) {
  TORCH_CHECK(logits.scalar_type() == at::kFloat && logits.dim() == 2 && logits.size(1) > 0, "argmax_rows: (rows, n > 0) float32 logits");
  const at::Tensor x = logits.contiguous();
  const int64_t rows = x.size(0), n = x.size(1);
  at::Tensor out = at::empty({rows}, x.options().dtype(at::kLong));
  const float* xp = x.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) op[r] = argmax_row(xp + r * n, n);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ministack, m) {
  m.def("argmax_rows(Tensor logits) -> Tensor");
  m.def("rms_norm(Tensor input, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor input, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("rotary(Tensor x, Tensor cos, Tensor sin) -> Tensor");
  m.def("silu_and_mul(Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(ministack, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("rotary", &rotary);
  m.impl("silu_and_mul", &silu_and_mul);
  m.impl("argmax_rows", &argmax_rows);
}
