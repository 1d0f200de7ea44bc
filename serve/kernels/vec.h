// AVX2 building blocks shared by the kernels: loading eight floats from any stored dtype and
// storing them back (rounded as torch rounds), and
// the 2 x 4 dot-product tile both the decode attention's scores (two query heads x four K
// rows) and the half-weight linear (two input rows x four weight rows) are made of.
#pragma once

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define MINISTACK_AVX2 1
#include <immintrin.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace ministack {

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {  // bf16 is the high half of a float
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}
inline __m256 load8(const c10::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline __m256 load8(const int8_t* p) {  // an int8 KV cache's codes (its scales are applied by the caller)
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// The float's bits rounded to the nearest even bfloat16 in their high half (NaN stays NaN), as
// c10::BFloat16's conversion rounds.
inline __m256i bf16_rne_bits(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
  return _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC00000), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
}

inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store8(c10::Half* p, __m256 v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT)); }
inline void store8(c10::BFloat16* p, __m256 v) {
  const __m256i high = _mm256_srli_epi32(bf16_rne_bits(v), 16);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm_packus_epi32(_mm256_castsi256_si128(high), _mm256_extracti128_si256(high, 1)));
}

// v rounded to T's precision and widened back: where a torch expression in T rounds an intermediate.
template <typename T>
inline __m256 round8(__m256 v);
template <>
inline __m256 round8<float>(__m256 v) { return v; }
template <>
inline __m256 round8<c10::Half>(__m256 v) { return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT)); }
template <>
inline __m256 round8<c10::BFloat16>(__m256 v) {
  return _mm256_castsi256_ps(_mm256_and_si256(bf16_rne_bits(v), _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

// e^x for x <= 0, to float32's resolution: 2^n * 2^f with n = round(x log2 e) and 2^f by its
// degree-7 Taylor series (the vector twin of paged_attention.cpp's exp_nonpositive).
inline __m256 exp8_nonpositive(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 t = _mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f));
  const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 y = _mm256_mul_ps(_mm256_sub_ps(t, n), _mm256_set1_ps(0.69314718055994531f));
  __m256 p = _mm256_set1_ps(1.0f / 5040.0f);
  for (const float c : {1.0f / 720.0f, 1.0f / 120.0f, 1.0f / 24.0f, 1.0f / 6.0f, 0.5f, 1.0f, 1.0f}) p = _mm256_fmadd_ps(p, y, _mm256_set1_ps(c));
  const __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(scale));
}

// Lane j of the result is the sum of the lanes of v[j]: eight dot products finished at once.
inline __m256 sum_lanes8(const __m256 v[8]) {
  const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));  // v0..v3, halves apart
  const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));  // v4..v7
  return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

// The eight dot products of float vectors a, b with rows r0..r3 (length `len`, a multiple of
// 8), stored to out as a.r0 a.r1 a.r2 a.r3 b.r0 b.r1 b.r2 b.r3. Eight accumulators and six
// loads per eight FMAs: the best tile AVX2's sixteen registers allow.
template <typename T>
inline void dots_2x4(const float* a, const float* b, const T* r0, const T* r1, const T* r2, const T* r3, int64_t len, float out[8]) {
  __m256 acc[8];
  for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
  for (int64_t i = 0; i < len; i += 8) {
    const __m256 va = _mm256_loadu_ps(a + i), vb = _mm256_loadu_ps(b + i);
    const __m256 x0 = load8(r0 + i), x1 = load8(r1 + i), x2 = load8(r2 + i), x3 = load8(r3 + i);
    acc[0] = _mm256_fmadd_ps(va, x0, acc[0]);
    acc[1] = _mm256_fmadd_ps(va, x1, acc[1]);
    acc[2] = _mm256_fmadd_ps(va, x2, acc[2]);
    acc[3] = _mm256_fmadd_ps(va, x3, acc[3]);
    acc[4] = _mm256_fmadd_ps(vb, x0, acc[4]);
    acc[5] = _mm256_fmadd_ps(vb, x1, acc[5]);
    acc[6] = _mm256_fmadd_ps(vb, x2, acc[6]);
    acc[7] = _mm256_fmadd_ps(vb, x3, acc[7]);
  }
  _mm256_storeu_ps(out, sum_lanes8(acc));
}

}  // namespace ministack

#endif
