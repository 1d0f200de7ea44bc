// Decode attention read straight from the paged KV cache, for the CPU.
//
// One query token per sequence attends over its context, which lives in the cache's blocks
// (block_tables) rather than in one tensor. Torch alone has to gather those blocks into a
// padded copy before SDPA can run (a copy of every context, every layer, every step, plus the
// padding); this kernel walks the block table and reads each block where it is.
//
// Work is split over (sequence, kv head, context partition): the query heads that share a
// K/V head are processed together, so each K/V row is read once for all of them, and a long
// context is cut into partitions so that one sequence still keeps every core busy. Each
// partition runs a two-pass softmax over its scores (they fit in cache: heads/kv_heads x
// PARTITION floats); the partitions of a sequence are then merged by their maxima and sums
// (the log-sum-exp merge of split-K attention). Accumulation is float32 whatever the cache's
// dtype.
//
// Compiled on first use by serve/kernels/__init__.py (torch.utils.cpp_extension) with -O3 and
// the CPU's vector ISA; the loops are written so the compiler vectorizes them (no intrinsics).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>
#include <immintrin.h>

#include "avx512_bf16.h"
#include "vec.h"

namespace {

constexpr int64_t PARTITION = 512;  // context tokens per work item

// e^x for x <= 0 (scores minus their maximum), in plain float arithmetic the compiler
// vectorizes: e^x = 2^n * 2^f with n = round(x log2 e), |f| <= 1/2, and 2^f by its Taylor
// series to degree 7 (relative error < 1e-8, below float32's resolution).
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);  // e^-87 ~ 1.6e-38: the smallest normal float's neighbourhood
  const float t = x * 1.44269504088896341f;
  const float n = (t + 12582912.0f) - 12582912.0f;  // round to nearest: 1.5 x 2^23 pushes the fraction out (|t| < 2^22)
  const float y = (t - n) * 0.69314718055994531f;  // f ln 2, |y| <= 0.347
  float p = 1.0f / 5040.0f;
  p = p * y + 1.0f / 720.0f;
  p = p * y + 1.0f / 120.0f;
  p = p * y + 1.0f / 24.0f;
  p = p * y + 1.0f / 6.0f;
  p = p * y + 0.5f;
  p = p * y + 1.0f;
  p = p * y + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// Layout of one layer's cache plane (K or V): (kv_heads, slots, head_dim), last dim contiguous.
struct Plane {
  int64_t head_stride, slot_stride;
};

// The two inner loops over one run of consecutive cache rows (part of a block), for `group`
// query heads at once. Generic versions the compiler vectorizes as it can; AVX2 versions below.
//   scores: s[g * n + t] = q_g . k_t          accumulate: out_g += sum_t p[g * n + t] * v_t
template <typename scalar_t>
void score_run(const float* q, const scalar_t* k, int64_t stride, int64_t count, int64_t group, int64_t head_dim, float* s, int64_t n) {
  for (int64_t t = 0; t < count; ++t, k += stride) {
    for (int64_t g = 0; g < group; ++g) {
      const float* qg = q + g * head_dim;
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < head_dim; ++d) dot += qg[d] * static_cast<float>(k[d]);
      s[g * n + t] = dot;
    }
  }
}

template <typename scalar_t>
void accumulate_run(const float* p, const scalar_t* v, int64_t stride, int64_t count, int64_t group, int64_t head_dim, float* out, int64_t n) {
  for (int64_t t = 0; t < count; ++t, v += stride) {
    for (int64_t g = 0; g < group; ++g) {
      const float w = p[g * n + t];
      float* og = out + g * head_dim;
#pragma omp simd
      for (int64_t d = 0; d < head_dim; ++d) og[d] += w * static_cast<float>(v[d]);
    }
  }
}

#if MINISTACK_AVX2
using ministack::load8;

// head_dim a multiple of 64. Scores for two query heads against four K rows at a time (the
// 2 x 4 tile of vec.h); an odd last head or a short tail of rows repeats the last one, and
// those lanes are dropped. V is accumulated 64 dims (eight registers) at a time.
template <typename scalar_t>
void score_run_avx2(const float* q, const scalar_t* k, int64_t stride, int64_t count, int64_t group, int64_t head_dim, float* s, int64_t n) {
  for (int64_t t0 = 0; t0 < count; t0 += 4) {
    const int64_t rows = std::min<int64_t>(4, count - t0);
    const scalar_t* k0 = k + t0 * stride;
    const scalar_t* k1 = k0 + std::min<int64_t>(1, rows - 1) * stride;
    const scalar_t* k2 = k0 + std::min<int64_t>(2, rows - 1) * stride;
    const scalar_t* k3 = k0 + (rows - 1) * stride;
    for (int64_t g = 0; g < group; g += 2) {
      float sums[8];  // head g's four scores, then head g + 1's
      ministack::dots_2x4(q + g * head_dim, q + std::min(g + 1, group - 1) * head_dim, k0, k1, k2, k3, head_dim, sums);
      std::copy(sums, sums + rows, s + g * n + t0);
      if (g + 1 < group) std::copy(sums + 4, sums + 4 + rows, s + (g + 1) * n + t0);
    }
  }
}

template <typename scalar_t>
void accumulate_run_avx2(const float* p, const scalar_t* v, int64_t stride, int64_t count, int64_t group, int64_t head_dim, float* out, int64_t n) {
  for (int64_t g = 0; g < group; ++g) {
    for (int64_t d0 = 0; d0 < head_dim; d0 += 64) {
      float* og = out + g * head_dim + d0;
      __m256 acc[8];
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) acc[j] = _mm256_loadu_ps(og + 8 * j);
      const scalar_t* row = v + d0;
      for (int64_t t = 0; t < count; ++t, row += stride) {
        const __m256 w = _mm256_set1_ps(p[g * n + t]);
#pragma GCC unroll 8
        for (int j = 0; j < 8; ++j) acc[j] = _mm256_fmadd_ps(w, load8(row + 8 * j), acc[j]);
      }
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) _mm256_storeu_ps(og + 8 * j, acc[j]);
    }
  }
}
constexpr bool HAVE_AVX2 = true;
#else
constexpr bool HAVE_AVX2 = false;
#endif

// AVX-512 versions, for head_dim 64 or 128, taken where the CPU has AVX-512 (they carry their
// own target attribute; the library builds with the common flags). A K or V row is widened to
// float32 once and used by every query head of the group (the AVX2 tile widens it once per pair
// of heads, and V once per head); 16 keys' dot products are finished together by one transpose-
// and-add tree instead of one horizontal sum each. In the engine (SmolLM2, bf16 cache, 16
// sequences of ~330 tokens) a layer's call went from 380-450 to 310-350 us; from 4,000 tokens
// on, both are bound by reading the scattered blocks (~7-9 GB/s on a 2-core AVX-512 EPYC).
using ministack::avx512_supported;

MINISTACK_AVX512 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
MINISTACK_AVX512 inline __m512 load16(const c10::BFloat16* p) {  // bf16 is the high half of a float
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
MINISTACK_AVX512 inline __m512 load16(const c10::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
MINISTACK_AVX512 inline __m512 load16(const int8_t* p) {  // an int8 cache's codes
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

// Lane j of the result is the sum of the lanes of v[j]: pairs of vectors folded within 128-bit
// blocks (unpack, shuffle), then the four blocks across (shuffle_f32x4).
MINISTACK_AVX512 inline __m512 sum_lanes16(const __m512 v[16]) {
  __m512 pairs[8], quads[4];
  for (int i = 0; i < 8; ++i) pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i)
    quads[i] = _mm512_add_ps(_mm512_shuffle_ps(pairs[2 * i], pairs[2 * i + 1], 0x44), _mm512_shuffle_ps(pairs[2 * i], pairs[2 * i + 1], 0xEE));
  const __m512 lo = _mm512_add_ps(_mm512_shuffle_f32x4(quads[0], quads[1], 0x44), _mm512_shuffle_f32x4(quads[0], quads[1], 0xEE));
  const __m512 hi = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2], quads[3], 0x44), _mm512_shuffle_f32x4(quads[2], quads[3], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(lo, hi, 0x88), _mm512_shuffle_f32x4(lo, hi, 0xDD));
}

// Scores of `group` query heads against a run's K rows, 16 rows at a time: the rows widened to
// float32 once (an int8 row times its scale) into an L1-resident tile that every head of the
// group then reads (a float32 cache's full tiles are read where they lie), each head's partial
// products kept as vectors and summed 16 at a time. Widening once rather than once per head,
// the scale folded in, and the vector softmax below (the scalar maximum it replaces was ~7% of
// the call): an int8 cache's decode at 16k context, 30 layers, went from 485 to 440 us a layer
// (both builds in one process, in turn; 2-core AVX-512 EPYC); bf16 and float32 unchanged.
template <typename scalar_t, int HD>
MINISTACK_AVX512 void score_run_avx512(const float* q, const scalar_t* k, const float* row_scale, int64_t stride, int64_t count, int64_t group, float* s,
                                       int64_t n) {
  constexpr int C = HD / 16;
  alignas(64) float tile[16][HD];
  __m512 partial[16];
  for (int64_t t0 = 0; t0 < count; t0 += 16) {
    const int64_t rows = std::min<int64_t>(16, count - t0);
    const float* base = tile[0];
    int64_t row_stride = HD;
    if (std::is_same_v<scalar_t, float> && rows == 16 && row_scale == nullptr) {
      base = reinterpret_cast<const float*>(k + t0 * stride);
      row_stride = stride;
    } else {
      for (int64_t j = 0; j < 16; ++j) {
        const __m512 mult = _mm512_set1_ps(j >= rows ? 0.0f : row_scale != nullptr ? row_scale[t0 + j] : 1.0f);
        const scalar_t* row = k + (t0 + std::min(j, rows - 1)) * stride;  // rows past the run: zeros
        for (int c = 0; c < C; ++c) _mm512_store_ps(tile[j] + 16 * c, _mm512_mul_ps(load16(row + 16 * c), mult));
      }
    }
    for (int64_t g = 0; g < group; ++g) {
      __m512 qv[C];
      for (int c = 0; c < C; ++c) qv[c] = _mm512_loadu_ps(q + g * HD + 16 * c);
      for (int64_t j = 0; j < 16; ++j) {
        const float* row = base + j * row_stride;
        __m512 acc = _mm512_mul_ps(qv[0], _mm512_loadu_ps(row));
        for (int c = 1; c < C; ++c) acc = _mm512_fmadd_ps(qv[c], _mm512_loadu_ps(row + 16 * c), acc);
        partial[j] = acc;
      }
      _mm512_mask_storeu_ps(s + g * n + t0, static_cast<__mmask16>((1u << rows) - 1), sum_lanes16(partial));
    }
  }
}

// out_g += sum_t p[g * n + t] * v_t for H heads (all of them in registers: H x HD / 16 <= 16),
// each V row widened once for the H heads.
template <typename scalar_t, int HD, int H>
MINISTACK_AVX512 void accumulate_heads_avx512(const float* p, const scalar_t* v, int64_t stride, int64_t count, float* out, int64_t n) {
  constexpr int C = HD / 16;
  __m512 acc[H][C];
  for (int g = 0; g < H; ++g)
    for (int c = 0; c < C; ++c) acc[g][c] = _mm512_loadu_ps(out + g * HD + 16 * c);
  for (int64_t t = 0; t < count; ++t, v += stride) {
    __m512 row[C];
    for (int c = 0; c < C; ++c) row[c] = load16(v + 16 * c);
    for (int g = 0; g < H; ++g) {
      const __m512 w = _mm512_set1_ps(p[g * n + t]);
      for (int c = 0; c < C; ++c) acc[g][c] = _mm512_fmadd_ps(w, row[c], acc[g][c]);
    }
  }
  for (int g = 0; g < H; ++g)
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(out + g * HD + 16 * c, acc[g][c]);
}

template <typename scalar_t, int HD>
MINISTACK_AVX512 void accumulate_run_avx512(const float* p, const scalar_t* v, int64_t stride, int64_t count, int64_t group, float* out, int64_t n) {
  constexpr int64_t MAX_H = 256 / HD;  // 4 heads of 64, 2 of 128
  for (int64_t g = 0; g < group; g += MAX_H) {
    const float* pg = p + g * n;
    float* og = out + g * HD;
    switch (std::min(MAX_H, group - g)) {
      case 1: accumulate_heads_avx512<scalar_t, HD, 1>(pg, v, stride, count, og, n); break;
      case 2: accumulate_heads_avx512<scalar_t, HD, 2>(pg, v, stride, count, og, n); break;
      case 3: if constexpr (MAX_H >= 3) accumulate_heads_avx512<scalar_t, HD, 3>(pg, v, stride, count, og, n); break;
      default: if constexpr (MAX_H >= 4) accumulate_heads_avx512<scalar_t, HD, 4>(pg, v, stride, count, og, n); break;
    }
  }
}

// s[i] = e^(s[i] - max) over n scores, 16 lanes at a time; returns the maximum and the sum.
MINISTACK_AVX512 void softmax_numerators_avx512(float* s, int64_t n, float& max_out, float& sum_out) {
  __m512 top = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 lanes = n - i >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n - i)) - 1);
    top = _mm512_mask_max_ps(top, lanes, top, _mm512_maskz_loadu_ps(lanes, s + i));
  }
  const float m = _mm512_reduce_max_ps(top);
  const __m512 shift = _mm512_set1_ps(m);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 lanes = n - i >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n - i)) - 1);
    const __m512 e = _mm512_maskz_mov_ps(lanes, ministack::exp16_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, s + i), shift)));
    _mm512_mask_storeu_ps(s + i, lanes, e);
    sum = _mm512_add_ps(sum, e);
  }
  max_out = m;
  sum_out = _mm512_reduce_add_ps(sum);
}

// s[g * n + t] *= scale[t] for a run's rows: an int8 row's scale, applied to what it produced.
inline void scale_run(const float* scale, float* s, int64_t count, int64_t group, int64_t n) {
  for (int64_t g = 0; g < group; ++g)
    for (int64_t t = 0; t < count; ++t) s[g * n + t] *= scale[t];
}

// One work item: the `group` query heads sharing one kv head, over context tokens
// [begin, end) of one sequence. Writes the unnormalized output (group x head_dim), and each
// query's score maximum and sum of exponentials, for the merge. An int8 cache comes with each
// row's scale (k_scale, v_scale: per slot of this head, else null): a K row's scale multiplies
// its score, a V row's its probability, so the rows are read as stored.
template <typename scalar_t>
void attend_partition(const float* q, const scalar_t* k, const scalar_t* v, const float* k_scale, const float* v_scale, Plane plane,
                      const int32_t* table, int64_t block_size, int64_t begin, int64_t end, int64_t group, int64_t head_dim,
                      float* scores, float* out, float* max_out, float* sum_out) {
  const int64_t n = end - begin;
  static const bool avx512_cpu = avx512_supported();
  const bool avx512 = avx512_cpu && (head_dim == 64 || head_dim == 128);
  const bool avx2 = HAVE_AVX2 && head_dim % 64 == 0;
  // walk [begin, end) as runs of consecutive slots (the rest of a block, at most), asking the
  // memory system for the next run while this one is computed: blocks are scattered, and a
  // hardware prefetcher does not follow a block table
  const int64_t row_bytes = head_dim * static_cast<int64_t>(sizeof(scalar_t));
  auto for_each_run = [&](const scalar_t* plane_base, auto&& body) {
    for (int64_t pos = begin; pos < end;) {
      const int64_t offset = pos % block_size, run = std::min(block_size - offset, end - pos);
      const int64_t next = pos + run;
      if (next < end) {
        const char* rows = reinterpret_cast<const char*>(plane_base + table[next / block_size] * block_size * plane.slot_stride);
        const int64_t count = std::min(block_size, end - next), stride = plane.slot_stride * sizeof(scalar_t);
        for (int64_t t = 0; t < count; ++t)
          for (int64_t b = 0; b < row_bytes; b += 64) __builtin_prefetch(rows + t * stride + b);
      }
      body((table[pos / block_size] * block_size + offset) * plane.slot_stride, pos - begin, run);
      pos = next;
    }
  };
  for_each_run(k, [&](int64_t row, int64_t i, int64_t run) {
    if (avx512) {
      const float* row_scale = k_scale != nullptr ? k_scale + row / plane.slot_stride : nullptr;
      return (head_dim == 64 ? score_run_avx512<scalar_t, 64> : score_run_avx512<scalar_t, 128>)(q, k + row, row_scale, plane.slot_stride, run, group,
                                                                                                  scores + i, n);
    }
    if (avx2) {
#if MINISTACK_AVX2
      score_run_avx2(q, k + row, plane.slot_stride, run, group, head_dim, scores + i, n);
#endif
    } else {
      score_run(q, k + row, plane.slot_stride, run, group, head_dim, scores + i, n);
    }
    if (k_scale != nullptr) scale_run(k_scale + row / plane.slot_stride, scores + i, run, group, n);
  });
  for (int64_t g = 0; g < group; ++g) {  // softmax numerators
    float* s = scores + g * n;
    if (avx512) {
      softmax_numerators_avx512(s, n, max_out[g], sum_out[g]);
      continue;
    }
    float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
    for (int64_t i = 0; i < n; ++i) m = std::max(m, s[i]);
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < n; ++i) {
      s[i] = exp_nonpositive(s[i] - m);
      sum += s[i];
    }
    max_out[g] = m;
    sum_out[g] = sum;
  }
  std::fill(out, out + group * head_dim, 0.0f);
  for_each_run(v, [&](int64_t row, int64_t i, int64_t run) {
    if (v_scale != nullptr) scale_run(v_scale + row / plane.slot_stride, scores + i, run, group, n);
    if (avx512)
      return (head_dim == 64 ? accumulate_run_avx512<scalar_t, 64> : accumulate_run_avx512<scalar_t, 128>)(scores + i, v + row, plane.slot_stride, run, group,
                                                                                                        out, n);
#if MINISTACK_AVX2
    if (avx2) return accumulate_run_avx2(scores + i, v + row, plane.slot_stride, run, group, head_dim, out, n);
#endif
    accumulate_run(scores + i, v + row, plane.slot_stride, run, group, head_dim, out, n);
  });
}

template <typename scalar_t, typename out_t>
void decode(const at::Tensor& query, const at::Tensor& kv, const c10::optional<at::Tensor>& kv_scale, const at::Tensor& tables,
            const at::Tensor& lens, int64_t block_size, double scale, int64_t window, at::Tensor& out) {
  const int64_t seqs = query.size(0), heads = query.size(1), head_dim = query.size(2);
  const int64_t kv_heads = kv.size(1), group = heads / kv_heads;
  const Plane plane{kv.stride(1), kv.stride(2)};
  const scalar_t* k_base = kv.data_ptr<scalar_t>();
  const scalar_t* v_base = k_base + kv.stride(0);
  const float* ks_base = kv_scale ? kv_scale->data_ptr<float>() : nullptr;
  const float* vs_base = kv_scale ? ks_base + kv_scale->stride(0) : nullptr;
  const int64_t scale_head_stride = kv_scale ? kv_scale->stride(1) : 0;
  const int32_t* len = lens.data_ptr<int32_t>();
  const int32_t* table_base = tables.data_ptr<int32_t>();
  const int64_t table_stride = tables.stride(0);

  // queries scaled once, in float32: (seqs, heads, head_dim), here rather than as two ATen ops
  std::vector<float> q(seqs * heads * head_dim);
  const out_t* query_base = query.data_ptr<out_t>();
  const float q_scale = static_cast<float>(scale);  // what multiplying a float32 tensor by `scale` uses
  for (int64_t s = 0; s < seqs; ++s)
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t d = 0; d < head_dim; ++d)
        q[(s * heads + h) * head_dim + d] = static_cast<float>(query_base[s * query.stride(0) + h * query.stride(1) + d * query.stride(2)]) * q_scale;
  const float* q_base = q.data();

  // work items: (sequence, kv head, partition), each with its own slot for the merge
  // each sequence attends over [first, len): its whole context, or under a sliding window its
  // last `window` tokens (the query's own included, as transformers' sliding_window)
  std::vector<int64_t> first(seqs), first_part(seqs + 1, 0);
  for (int64_t s = 0; s < seqs; ++s) {
    first[s] = window > 0 ? std::max<int64_t>(0, len[s] - window) : 0;
    first_part[s + 1] = first_part[s] + (len[s] - first[s] + PARTITION - 1) / PARTITION;
  }
  const int64_t parts = first_part[seqs];
  std::vector<int64_t> part_seq(parts);
  for (int64_t s = 0; s < seqs; ++s) std::fill(part_seq.begin() + first_part[s], part_seq.begin() + first_part[s + 1], s);
  std::vector<float> partial(parts * heads * head_dim), maxima(parts * heads), sums(parts * heads);

#pragma omp parallel
  {
    std::vector<float> scores(group * PARTITION);
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < parts * kv_heads; ++item) {
      const int64_t part = item / kv_heads, h = item % kv_heads, s = part_seq[part];
      const int64_t lo = first[s] + (part - first_part[s]) * PARTITION, hi = std::min<int64_t>(lo + PARTITION, len[s]);
      const int64_t row = part * heads + h * group;  // this item's first query head among the partials
      attend_partition<scalar_t>(q_base + (s * heads + h * group) * head_dim, k_base + h * plane.head_stride,
                                 v_base + h * plane.head_stride, ks_base ? ks_base + h * scale_head_stride : nullptr,
                                 vs_base ? vs_base + h * scale_head_stride : nullptr, plane, table_base + s * table_stride, block_size, lo,
                                 hi, group, head_dim, scores.data(), partial.data() + row * head_dim,
                                 maxima.data() + row, sums.data() + row);
    }
  }

  // merge each sequence's partitions: rescale by e^(max_i - max), normalize by the total sum
  out_t* out_base = out.data_ptr<out_t>();
  at::parallel_for(0, seqs * heads, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(head_dim);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t s = item / heads, hq = item % heads;
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t p = first_part[s]; p < first_part[s + 1]; ++p) m = std::max(m, maxima[p * heads + hq]);
      std::fill(acc.begin(), acc.end(), 0.0f);
      float total = 0.0f;
      for (int64_t p = first_part[s]; p < first_part[s + 1]; ++p) {
        const float w = exp_nonpositive(maxima[p * heads + hq] - m);
        total += w * sums[p * heads + hq];
        const float* o = partial.data() + (p * heads + hq) * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) acc[d] += w * o[d];
      }
      out_t* dst = out_base + item * head_dim;
      for (int64_t d = 0; d < head_dim; ++d) dst[d] = static_cast<out_t>(acc[d] / total);
    }
  });
}

// query (seqs, heads, head_dim); kv_cache (2, kv_heads, slots, head_dim), one layer's K and V
// planes (any strides but a contiguous last dim); block_tables (seqs, max_blocks) int32;
// context_lens (seqs,) int32, each >= 1 (the query's own K/V is already in the cache);
// window > 0: attend over the last `window` positions only (sliding-window attention);
// kv_scale (2, kv_heads, slots) float32: the scale of each int8 row (an int8 cache only).
at::Tensor paged_decode_attention(const at::Tensor& query, const at::Tensor& kv_cache, const at::Tensor& block_tables,
                                  const at::Tensor& context_lens, int64_t block_size, double scale, int64_t window,
                                  const c10::optional<at::Tensor>& kv_scale) {
  TORCH_CHECK(query.dim() == 3 && kv_cache.dim() == 4 && kv_cache.size(0) == 2, "query (seqs, heads, head_dim), kv_cache (2, kv_heads, slots, head_dim)");
  const bool int8 = kv_cache.scalar_type() == at::kChar;
  TORCH_CHECK(int8 == kv_scale.has_value(), "an int8 kv_cache comes with its kv_scale (2, kv_heads, slots) float32, and only an int8 one");
  if (int8)
    TORCH_CHECK(kv_scale->scalar_type() == at::kFloat && kv_scale->dim() == 3 && kv_scale->size(1) == kv_cache.size(1) &&
                    kv_scale->size(2) == kv_cache.size(2) && kv_scale->stride(2) == 1,
                "kv_scale must be (2, kv_heads, slots) float32 with contiguous slots");
  TORCH_CHECK(kv_cache.stride(3) == 1 && kv_cache.size(3) == query.size(2), "kv_cache head_dim must match the query's and be contiguous");
  TORCH_CHECK(query.size(1) % kv_cache.size(1) == 0, "query heads must be a multiple of kv heads");
  TORCH_CHECK(window >= 0, "window must be >= 0 (0: none)");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && context_lens.scalar_type() == at::kInt, "block_tables and context_lens must be int32");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == query.size(0) && block_tables.stride(1) == 1, "block_tables (seqs, max_blocks), rows contiguous");
  TORCH_CHECK(context_lens.dim() == 1 && context_lens.size(0) == query.size(0) && context_lens.is_contiguous(), "context_lens (seqs,)");
  const at::Tensor lens = context_lens;
  const int32_t* len = lens.data_ptr<int32_t>();
  for (int64_t s = 0; s < query.size(0); ++s)
    TORCH_CHECK(len[s] >= 1 && (len[s] + block_size - 1) / block_size <= block_tables.size(1), "context length ", len[s], " of sequence ", s, " does not fit its block table");
  at::Tensor out = at::empty(query.sizes(), query.options());
  // the cache's dtype (float32, bf16, fp16, int8) and the query's (float32, bf16, fp16) apart:
  // a 16-bit or int8 cache serves a float32 model
  auto run = [&](auto cache_zero) {
    using cache_t = decltype(cache_zero);
    AT_DISPATCH_SWITCH(query.scalar_type(), "paged_decode_attention",
                       AT_DISPATCH_CASE(at::kFloat, [&] { decode<cache_t, scalar_t>(query, kv_cache, kv_scale, block_tables, lens, block_size, scale, window, out); })
                       AT_DISPATCH_CASE(at::kBFloat16, [&] { decode<cache_t, scalar_t>(query, kv_cache, kv_scale, block_tables, lens, block_size, scale, window, out); })
                       AT_DISPATCH_CASE(at::kHalf, [&] { decode<cache_t, scalar_t>(query, kv_cache, kv_scale, block_tables, lens, block_size, scale, window, out); }));
  };
  switch (kv_cache.scalar_type()) {
    case at::kFloat: run(float{}); break;
    case at::kBFloat16: run(c10::BFloat16{}); break;
    case at::kHalf: run(c10::Half{}); break;
    case at::kChar: run(int8_t{}); break;
    default: TORCH_CHECK(false, "kv_cache dtype ", kv_cache.scalar_type(), " is not one of float32, bfloat16, float16, int8");
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ministack, m) {
  m.def("paged_decode_attention(Tensor query, Tensor kv_cache, Tensor block_tables, Tensor context_lens, int block_size, float scale, int window=0, Tensor? kv_scale=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(ministack, CPU, m) { m.impl("paged_decode_attention", &paged_decode_attention); }
