// AVX-512 BF16 building blocks of the bf16 prefill attention: vdpbf16ps multiplies bf16 pairs
// and adds both products into a float32 lane, 32 multiply-adds per instruction, with no
// conversion of the bf16 operands. Every function carries its own target attribute, so the
// library is built with the common flags and a caller takes these paths only where
// `avx512_bf16_supported()` says the CPU has the instructions.
#pragma once

#include <immintrin.h>

#include <cstdint>

#define MINISTACK_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
// the same without the BF16 products: what the paged decode attention needs
#define MINISTACK_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))

namespace ministack {

inline bool avx512_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512dq");
}

inline bool avx512_bf16_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
}

// e^x for x <= 0 in 16 lanes: 2^n * 2^f, 2^f by its degree-7 Taylor series (vec.h's
// exp8_nonpositive, sixteen lanes wide). Plain AVX-512F: the decode attention's softmax uses it too.
MINISTACK_AVX512 inline __m512 exp16_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 y = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.69314718055994531f));
  __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
  for (const float c : {1.0f / 720.0f, 1.0f / 120.0f, 1.0f / 24.0f, 1.0f / 6.0f, 0.5f, 1.0f, 1.0f}) p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(c));
  const __m512i scale = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(scale));
}

}  // namespace ministack
