// A step's new K and V written into the paged cache at their slots, in the cache's dtype, for
// the CPU.
//
// Every layer of every step stores its K and V. In torch that is, per plane, a transpose, a
// dtype conversion and an index_copy_ (~14 us each at 16 decode rows on a 2-core EPYC: ~1 ms of
// a 16-sequence decode step over 30 layers), and for an int8 cache about ten more ops (absolute
// value, maximum, clamp, division, rounding, two scale writes). Here it is one pass, in the same
// arithmetic: a float or 16-bit cache gets each value converted as torch's `.to()` converts it
// (round to nearest even), an int8 cache the codes round(x / s) with s = max|x| / 127 per token
// and head (the maximum clamped to 1e-30), computed in float32 as the torch expression computes
// them, so both paths write the same bytes.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace {

// Rows of x (tokens, heads, head_dim; any strides, contiguous last dim) into plane (heads,
// slots, head_dim) at slots[t], converted to cache_t.
template <typename x_t, typename cache_t>
void store_plane(const at::Tensor& x, at::Tensor plane, const int64_t* slots) {
  const int64_t tokens = x.size(0), heads = x.size(1), dim = x.size(2);
  const x_t* src = x.data_ptr<x_t>();
  cache_t* dst = plane.data_ptr<cache_t>();
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t h = 0; h < heads; ++h) {
      const x_t* row = src + t * x.stride(0) + h * x.stride(1);
      cache_t* out = dst + h * plane.stride(0) + slots[t] * plane.stride(1);
      if constexpr (std::is_same_v<x_t, cache_t>) {
        std::memcpy(out, row, sizeof(cache_t) * dim);  // the model's own dtype: a copy
      } else {
        for (int64_t d = 0; d < dim; ++d) out[d] = static_cast<cache_t>(static_cast<float>(row[d]));
      }
    }
}

// The same into an int8 plane and its scales (heads, slots) float32.
template <typename x_t>
void store_plane_int8(const at::Tensor& x, at::Tensor plane, at::Tensor scale, const int64_t* slots) {
  const int64_t tokens = x.size(0), heads = x.size(1), dim = x.size(2);
  const x_t* src = x.data_ptr<x_t>();
  int8_t* dst = plane.data_ptr<int8_t>();
  float* scales = scale.data_ptr<float>();
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t h = 0; h < heads; ++h) {
      const x_t* row = src + t * x.stride(0) + h * x.stride(1);
      float top = 0.0f;
      for (int64_t d = 0; d < dim; ++d) top = std::max(top, std::fabs(static_cast<float>(row[d])));
      const float s = std::max(top, 1e-30f) / 127.0f;
      int8_t* out = dst + h * plane.stride(0) + slots[t] * plane.stride(1);
      for (int64_t d = 0; d < dim; ++d) out[d] = static_cast<int8_t>(std::nearbyint(static_cast<float>(row[d]) / s));
      scales[h * scale.stride(0) + slots[t] * scale.stride(1)] = s;
    }
}

// k, v (tokens, kv_heads, head_dim) float32/bfloat16/float16 with a contiguous last dim (views of
// the fused qkv projection are fine); kv_cache (2, kv_heads, slots, head_dim) float32, bfloat16,
// float16 or int8 (then kv_scale (2, kv_heads, slots) float32); slots (tokens,) int64, distinct.
void store_kv(const at::Tensor& k, const at::Tensor& v, at::Tensor kv_cache, const c10::optional<at::Tensor>& kv_scale, const at::Tensor& slots) {
  TORCH_CHECK(k.dim() == 3 && k.sizes() == v.sizes() && k.scalar_type() == v.scalar_type(), "store_kv: k and v (tokens, kv_heads, head_dim), alike");
  TORCH_CHECK(k.stride(2) == 1 && v.stride(2) == 1, "store_kv: the head_dim must be contiguous");
  TORCH_CHECK(kv_cache.dim() == 4 && kv_cache.size(0) == 2 && kv_cache.size(1) == k.size(1) && kv_cache.size(3) == k.size(2) && kv_cache.stride(3) == 1,
              "store_kv: kv_cache must be (2, kv_heads, slots, head_dim) for these k and v");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.dim() == 1 && slots.size(0) == k.size(0) && slots.is_contiguous(), "store_kv: slots (tokens,) int64");
  const int64_t* slot = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < slots.size(0); ++t)
    TORCH_CHECK(slot[t] >= 0 && slot[t] < kv_cache.size(2), "store_kv: slot ", slot[t], " is outside the cache's ", kv_cache.size(2));
  const bool int8 = kv_cache.scalar_type() == at::kChar;
  TORCH_CHECK(int8 == (kv_scale.has_value() && kv_scale->defined()), "store_kv: an int8 cache takes kv_scale, and only an int8 cache");
  if (int8)
    TORCH_CHECK(kv_scale->scalar_type() == at::kFloat && kv_scale->dim() == 3 && kv_scale->size(0) == 2 && kv_scale->size(1) == k.size(1) &&
                    kv_scale->size(2) == kv_cache.size(2),
                "store_kv: kv_scale must be (2, kv_heads, slots) float32");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, k.scalar_type(), "store_kv", [&] {
    using x_t = scalar_t;
    for (int64_t p = 0; p < 2; ++p) {
      const at::Tensor& x = p == 0 ? k : v;
      at::Tensor plane = kv_cache.select(0, p);
      switch (kv_cache.scalar_type()) {
        case at::kFloat: store_plane<x_t, float>(x, plane, slot); break;
        case at::kBFloat16: store_plane<x_t, c10::BFloat16>(x, plane, slot); break;
        case at::kHalf: store_plane<x_t, c10::Half>(x, plane, slot); break;
        case at::kChar: store_plane_int8<x_t>(x, plane, kv_scale->select(0, p), slot); break;
        default: TORCH_CHECK(false, "store_kv: a float32, bfloat16, float16 or int8 cache, not ", kv_cache.scalar_type());
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ministack, m) { m.def("store_kv(Tensor k, Tensor v, Tensor(a!) kv_cache, Tensor(b!)? kv_scale, Tensor slots) -> ()"); }

TORCH_LIBRARY_IMPL(ministack, CPU, m) { m.impl("store_kv", &store_kv); }
