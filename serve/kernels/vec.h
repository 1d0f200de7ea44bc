// AVX2 building blocks shared by the kernels: loading eight floats from any stored dtype, and
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
