// Causal attention of a prefill chunk over its cached past and its own keys, bfloat16, for
// CPUs with AVX-512 BF16.
//
// torch's CPU flash attention runs SmolLM2's 512-token prefill at ~60 GFLOP/s (4.9 ms a layer
// on a 2-core EPYC whose bf16 matmul peak is 440 GFLOP/s): its blocks are small GEMM calls with
// the softmax between them. Here the two products run on vdpbf16ps (two bf16 products summed
// into a float32 lane per instruction) straight from registers:
//
//   scores  s[r][j] = q_r . k_j         q_r's (d, d+1) pair broadcast, against K repacked so
//                                       that lane j holds key j's (d, d+1) pair;
//   output  o[r][:] += p[r][j] v_j      p_r's (j, j+1) pair broadcast, against V repacked so
//                                       that lane c holds (v_j[c], v_{j+1}[c]).
//
// Each work item is one K/V head and a tile of ROWS consecutive query positions of one of the
// query heads sharing it (grouped-query attention reads K/V once per head, repacked once). Keys
// come in softmax blocks of 64 (four sub-blocks of 16 lanes): the tile's scores for a block are
// computed with each broadcast query pair meeting all four key vectors, then each row takes one
// maximum, one exponential pass and one rescale of its accumulators per block (online softmax:
// running maximum and sum per row, float32); the diagonal block masks the keys after each row's
// position. Probabilities are rounded to bf16 for the second product, as torch's flash
// attention does for bf16 inputs; scores, softmax and the output accumulate in float32.
// 16-key blocks with a softmax step each ran at 160-185 GFLOP/s (512 queries, no past / 3,584
// past, SmolLM2's 9 heads over 3); 64-key blocks at 233-286.
//
// The functions carry their own target attribute, so the library builds with the common flags
// and this path is taken only where the CPU reports AVX-512 BF16 (`prefill_attention_supported`);
// elsewhere the engine keeps torch's SDPA.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "avx512_bf16.h"

namespace {

constexpr int64_t KEYS = 16;              // keys per sub-block: one zmm of float32 scores
constexpr int64_t SUBS = 4;               // sub-blocks per softmax block
constexpr int64_t BLOCK = KEYS * SUBS;    // keys per online-softmax step: one max, sum and rescale per 64 keys
constexpr int64_t ROWS = 4;               // query rows per tile: four independent accumulator chains

// K of one head, keys [0, n) padded to whole softmax blocks with zeros, as pairs: sub-block b,
// pair p (dims 2p, 2p+1) is 16 uint32 lanes, lane j = key (16b + j)'s pair. Layout [b][p][j].
void repack_k(const uint16_t* k, int64_t key_stride, int64_t n, int64_t dim, uint32_t* out) {
  const int64_t pairs = dim / 2, subs = (n + BLOCK - 1) / BLOCK * SUBS;
  std::memset(out, 0, sizeof(uint32_t) * subs * pairs * KEYS);
  for (int64_t key = 0; key < n; ++key) {
    const uint32_t* row = reinterpret_cast<const uint32_t*>(k + key * key_stride);
    uint32_t* dst = out + (key / KEYS) * pairs * KEYS + key % KEYS;
    for (int64_t p = 0; p < pairs; ++p) dst[p * KEYS] = row[p];
  }
}

// V of one head as key pairs: pair j (keys 2j, 2j+1), dim c is one uint32 holding
// (v[2j][c], v[2j+1][c]); layout [j][c], keys padded with zeros to whole softmax blocks.
void repack_v(const uint16_t* v, int64_t key_stride, int64_t n, int64_t dim, uint32_t* out) {
  const int64_t padded = (n + BLOCK - 1) / BLOCK * BLOCK;
  for (int64_t j = 0; j < padded / 2; ++j) {
    for (int64_t c = 0; c < dim; ++c) {
      const uint32_t lo = 2 * j < n ? v[2 * j * key_stride + c] : 0, hi = 2 * j + 1 < n ? v[(2 * j + 1) * key_stride + c] : 0;
      out[j * dim + c] = lo | (hi << 16);
    }
  }
}

// Lanes of a 16-key sub-block starting at key0 that a row at position `pos` sees (keys <= pos).
inline __mmask16 visible_mask(int64_t pos, int64_t key0) {
  const int64_t visible = pos - key0 + 1;
  return visible >= KEYS ? static_cast<__mmask16>(0xFFFF) : visible <= 0 ? static_cast<__mmask16>(0) : static_cast<__mmask16>((1u << visible) - 1);
}

// Scores of the tile's ROWS query rows against the first S sub-blocks of one softmax block of
// repacked keys `kb`: s[r][sb] lane j = q_r . k_(16 sb + j). Each broadcast query pair meets S
// key vectors, so S products share one broadcast.
template <int64_t PAIRS, int S>
MINISTACK_AVX512BF16 inline void block_scores(const uint32_t* kb, const uint32_t (*qpairs)[PAIRS], __m512 (&s)[ROWS][SUBS]) {
  for (int64_t r = 0; r < ROWS; ++r)
    for (int sb = 0; sb < S; ++sb) s[r][sb] = _mm512_setzero_ps();
  for (int64_t p = 0; p < PAIRS; ++p) {
    __m512bh kv[S];
    for (int sb = 0; sb < S; ++sb) kv[sb] = (__m512bh)_mm512_loadu_si512(kb + (sb * PAIRS + p) * KEYS);
    for (int64_t r = 0; r < ROWS; ++r) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(qpairs[r][p]));
      for (int sb = 0; sb < S; ++sb) s[r][sb] = _mm512_dpbf16_ps(s[r][sb], a, kv[sb]);
    }
  }
}

// One tile: query rows [r0, r0 + rows) of one query head, row r at position past + r, causal
// over the repacked keys (key j at position j). q rows are bf16 with `q_stride` between them;
// out rows likewise. Keys go by in softmax blocks of 64: the tile's scores for a block are
// computed sub-block by sub-block into a small buffer, then each row takes one maximum, one
// exponential pass and one rescale of its accumulators for the whole block.
template <int64_t DIM>
MINISTACK_AVX512BF16 void attend_tile(const uint16_t* q, int64_t q_stride, const uint32_t* kp, const uint32_t* vp, int64_t past, int64_t r0,
                                      int64_t rows, float scale, uint16_t* out, int64_t out_stride) {
  constexpr int64_t PAIRS = DIM / 2, CHUNKS = DIM / 16;
  __m512 acc[ROWS][CHUNKS];
  float m[ROWS], l[ROWS];
  uint32_t qpairs[ROWS][PAIRS];
  for (int64_t r = 0; r < ROWS; ++r) {
    for (int64_t c = 0; c < CHUNKS; ++c) acc[r][c] = _mm512_setzero_ps();
    m[r] = -std::numeric_limits<float>::infinity();
    l[r] = 0.0f;
    std::memcpy(qpairs[r], q + std::min(r, rows - 1) * q_stride, sizeof(uint32_t) * PAIRS);
  }
  alignas(64) float scores[ROWS][BLOCK];
  alignas(64) uint32_t probs[ROWS][BLOCK / 2];
  const __m512 vscale = _mm512_set1_ps(scale), minus_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  const int64_t first = past + r0, last = first + rows - 1;  // the tile's positions: keys after `last` are never needed
  for (int64_t b = 0; b * BLOCK <= last; ++b) {
    const int64_t key0 = b * BLOCK, subs = std::min(SUBS, (last - key0) / KEYS + 1);  // sub-blocks holding a key <= last
    const uint32_t* kb = kp + b * SUBS * PAIRS * KEYS;
    __m512 s[ROWS][SUBS];
    switch (subs) {  // only the sub-blocks the tile can see (the diagonal block may hold fewer)
      case 1: block_scores<PAIRS, 1>(kb, qpairs, s); break;
      case 2: block_scores<PAIRS, 2>(kb, qpairs, s); break;
      case 3: block_scores<PAIRS, 3>(kb, qpairs, s); break;
      default: block_scores<PAIRS, 4>(kb, qpairs, s); break;
    }
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t sb = 0; sb < subs; ++sb)
        _mm512_store_ps(scores[r] + sb * KEYS, _mm512_mask_mov_ps(minus_inf, visible_mask(first + r, key0 + sb * KEYS), _mm512_mul_ps(s[r][sb], vscale)));
    for (int64_t r = 0; r < rows; ++r) {
      if (first + r < key0) {  // a block past this row's position (the tile's later rows reach it)
        std::fill(probs[r], probs[r] + subs * KEYS / 2, 0u);
        continue;
      }
      __m512 top = _mm512_load_ps(scores[r]);
      for (int64_t sb = 1; sb < subs; ++sb) top = _mm512_max_ps(top, _mm512_load_ps(scores[r] + sb * KEYS));
      const float new_max = std::max(m[r], _mm512_reduce_max_ps(top));
      const __m512 shift = _mm512_set1_ps(new_max);
      __m512 sum = _mm512_setzero_ps();
      for (int64_t sb = 0; sb < subs; ++sb) {
        const __mmask16 keep = visible_mask(first + r, key0 + sb * KEYS);
        const __m512 e = _mm512_maskz_mov_ps(keep, ministack::exp16_nonpositive(_mm512_sub_ps(_mm512_load_ps(scores[r] + sb * KEYS), shift)));
        sum = _mm512_add_ps(sum, e);
        _mm256_store_si256(reinterpret_cast<__m256i*>(probs[r] + sb * KEYS / 2), (__m256i)_mm512_cvtneps_pbh(e));
      }
      if (new_max > m[r]) {  // rescale what was summed under the old maximum (0 on the first block: m = -inf)
        const float rescale = std::exp(m[r] - new_max);
        l[r] *= rescale;
        for (int64_t c = 0; c < CHUNKS; ++c) acc[r][c] = _mm512_mul_ps(acc[r][c], _mm512_set1_ps(rescale));
        m[r] = new_max;
      }
      l[r] += _mm512_reduce_add_ps(sum);
    }
    const uint32_t* vb = vp + b * (BLOCK / 2) * DIM;
    for (int64_t j = 0; j < subs * KEYS / 2; ++j) {
      for (int64_t c = 0; c < CHUNKS; ++c) {
        const __m512bh vv = (__m512bh)_mm512_loadu_si512(vb + j * DIM + 16 * c);
        for (int64_t r = 0; r < rows; ++r) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], (__m512bh)_mm512_set1_epi32(static_cast<int>(probs[r][j])), vv);
      }
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const __m512 inv = _mm512_set1_ps(1.0f / l[r]);
    for (int64_t c = 0; c < CHUNKS; ++c)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + r * out_stride + 16 * c), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[r][c], inv)));
  }
}

template <int64_t DIM>
MINISTACK_AVX512BF16 void prefill(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale, at::Tensor& out) {
  const int64_t n = q.size(0), n_keys = k.size(0), past = n_keys - n, heads = q.size(1), kv_heads = k.size(1), group = heads / kv_heads;
  const int64_t blocks = (n_keys + BLOCK - 1) / BLOCK, k_size = blocks * SUBS * (DIM / 2) * KEYS, v_size = blocks * (BLOCK / 2) * DIM;
  std::vector<uint32_t> kp(kv_heads * k_size), vp(kv_heads * v_size);
  const auto* q_base = reinterpret_cast<const uint16_t*>(q.data_ptr<at::BFloat16>());
  const auto* k_base = reinterpret_cast<const uint16_t*>(k.data_ptr<at::BFloat16>());
  const auto* v_base = reinterpret_cast<const uint16_t*>(v.data_ptr<at::BFloat16>());
  auto* o_base = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  at::parallel_for(0, kv_heads, 1, [&](int64_t h0, int64_t h1) {
    for (int64_t h = h0; h < h1; ++h) {
      repack_k(k_base + h * k.stride(1), k.stride(0), n_keys, DIM, kp.data() + h * k_size);
      repack_v(v_base + h * v.stride(1), v.stride(0), n_keys, DIM, vp.data() + h * v_size);
    }
  });
  // work items: (tile, query head), the last tiles (which see the most keys) first, handed out
  // one at a time: a causal split into equal ranges would give one thread three quarters of it
  const int64_t tiles = (n + ROWS - 1) / ROWS, items = tiles * heads;
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t item = 0; item < items; ++item) {
    const int64_t t = tiles - 1 - item / heads, hq = item % heads, h = hq / group, r0 = t * ROWS, rows = std::min(ROWS, n - r0);
    attend_tile<DIM>(q_base + r0 * q.stride(0) + hq * q.stride(1), q.stride(0), kp.data() + h * k_size, vp.data() + h * v_size, past, r0, rows,
                     static_cast<float>(scale), o_base + r0 * out.stride(0) + hq * out.stride(1), out.stride(0));
  }
}

bool supported() { return ministack::avx512_bf16_supported(); }

// q (n, heads, head_dim), k and v (n_keys, kv_heads, head_dim) with n_keys >= n: the chunk's
// cached past then its own keys; bfloat16, each row's last dim contiguous (views of the fused
// qkv projection are fine); head_dim 64 or 128. Query i sits at position n_keys - n + i and
// attends to keys 0..n_keys - n + i. Returns (n, heads, head_dim) bfloat16.
at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  TORCH_CHECK(supported(), "prefill_attention needs AVX-512 BF16, which this CPU lacks");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 && v.scalar_type() == at::kBFloat16, "prefill_attention: bfloat16 only");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3 && k.sizes() == v.sizes() && q.size(0) <= k.size(0) && q.size(2) == k.size(2),
              "prefill_attention: q (n, heads, head_dim), k and v (n_keys >= n, kv_heads, head_dim)");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1, "prefill_attention: the head_dim must be contiguous");
  TORCH_CHECK(q.size(1) % k.size(1) == 0, "prefill_attention: query heads must be a multiple of kv heads");
  at::Tensor out = at::empty(q.sizes(), q.options());
  if (q.size(2) == 64) {
    prefill<64>(q, k, v, scale, out);
  } else {
    TORCH_CHECK(q.size(2) == 128, "prefill_attention: head_dim 64 or 128, not ", q.size(2));
    prefill<128>(q, k, v, scale, out);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ministack, m) {
  m.def("prefill_attention(Tensor q, Tensor k, Tensor v, float scale) -> Tensor");
  m.def("prefill_attention_supported() -> bool", &supported);
}

TORCH_LIBRARY_IMPL(ministack, CPU, m) { m.impl("prefill_attention", &prefill_attention); }
