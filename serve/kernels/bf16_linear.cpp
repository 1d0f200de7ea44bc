// A bfloat16 linear layer on AVX-512 BF16 instructions, for the CPU.
//
// A decode step multiplies a few rows by every weight matrix, so its time is the weights
// streaming in from memory: SmolLM2-135M's 268 MB of bf16 weights take ~9 ms at this 2-core
// EPYC's ~30 GB/s, and oneDNN's bf16 matmul (prepacked) reaches ~13 GB/s at 1 row and ~10 GB/s
// at 16. Here the weight is laid out once, at load, so that one vdpbf16ps (two bf16 products
// summed into each of 16 float32 lanes) consumes 64 contiguous bytes of it:
//
//   packed[b][p][j] = (w[16b + j][2p], w[16b + j][2p + 1])     one uint32 per (output, input pair)
//
// and each input row's (2p, 2p + 1) pair is broadcast against it. A tile is up to ROWS input rows
// by GROUP blocks of 16 outputs (24 accumulators in registers), so rows 1..8 cost one pass over
// the weights; 9..16 rows run one block at a time (up to 16 accumulators), again one pass; more
// rows go by the weights in L1-sized chunks, each used by every tile of rows. Outputs are summed
// in float32 in input order (the same order for every row, whatever the batch: batch-invariant),
// the bias (bf16) added in float32, and rounded to bf16 to nearest even (vcvtneps2bf16).
//
// The functions carry their own target attribute, so the library builds with the common flags;
// the engine takes this path only where `bf16_linear_supported()` says the CPU has AVX-512 BF16.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#include "avx512_bf16.h"

namespace {

constexpr int64_t LANES = 16;  // outputs per block: one zmm of float32 accumulators
constexpr int64_t GROUP = 3;   // blocks per tile (the packed weight is padded to whole groups)
constexpr int64_t ROWS = 8;    // input rows per tile: 8 x 3 accumulators + 3 weight registers
constexpr int64_t AHEAD = 32;  // pairs the weight streams are prefetched ahead
constexpr int64_t CHUNK = 96;  // input pairs per pass when rows need several tiles: 3 x 96 x 64 B of weights

// Rows [0, MT) of x (pairs of bf16 as uint32, `x_stride` pairs apart) times one group of the
// packed weight (its GROUP blocks of `pairs` x 16 lanes each, back to back), over input pairs
// [p0, p1). The sums so far come from `partial` (MT x 48 float32) unless `first`; they go back
// there unless `last`, when the bias is added and outputs [n0, n0 + 48) of each row, those
// below N, are stored rounded to bf16.
template <int MT>
MINISTACK_AVX512BF16 void tile(const uint32_t* x, int64_t x_stride, const uint32_t* w, int64_t pairs, int64_t p0, int64_t p1, float* partial,
                               bool first, bool last, const uint16_t* bias, uint16_t* y, int64_t y_stride, int64_t n0, int64_t N) {
  __m512 acc[MT][GROUP];
  for (int r = 0; r < MT; ++r)
    for (int g = 0; g < GROUP; ++g) acc[r][g] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(partial + (r * GROUP + g) * LANES);
  const uint32_t* w0 = w;
  const uint32_t* w1 = w + pairs * LANES;
  const uint32_t* w2 = w + 2 * pairs * LANES;
  for (int64_t p = p0; p < p1; ++p) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(w0 + p * LANES);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(w1 + p * LANES);
    const __m512bh b2 = (__m512bh)_mm512_loadu_si512(w2 + p * LANES);
    _mm_prefetch(reinterpret_cast<const char*>(w0 + (p + AHEAD) * LANES), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w1 + (p + AHEAD) * LANES), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w2 + (p + AHEAD) * LANES), _MM_HINT_T0);
    for (int r = 0; r < MT; ++r) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(x[r * x_stride + p]));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, b0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, b1);
      acc[r][2] = _mm512_dpbf16_ps(acc[r][2], a, b2);
    }
  }
  if (!last) {
    for (int r = 0; r < MT; ++r)
      for (int g = 0; g < GROUP; ++g) _mm512_storeu_ps(partial + (r * GROUP + g) * LANES, acc[r][g]);
    return;
  }
  for (int g = 0; g < GROUP; ++g) {
    const int64_t col = n0 + g * LANES;
    if (col >= N) break;
    const __mmask16 keep = N - col >= LANES ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (N - col)) - 1);
    const __m512 b = bias != nullptr ? _mm512_cvtpbh_ps((__m256bh)_mm256_maskz_loadu_epi16(keep, bias + col)) : _mm512_setzero_ps();
    for (int r = 0; r < MT; ++r)
      _mm256_mask_storeu_epi16(y + r * y_stride + col, keep, (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(acc[r][g], b)));
  }
}

using TileFn = void (*)(const uint32_t*, int64_t, const uint32_t*, int64_t, int64_t, int64_t, float*, bool, bool, const uint16_t*, uint16_t*, int64_t,
                        int64_t, int64_t);
constexpr TileFn TILES[ROWS] = {tile<1>, tile<2>, tile<3>, tile<4>, tile<5>, tile<6>, tile<7>, tile<8>};

// Rows [0, MT) for 8 < MT <= 16, one block of 16 outputs at a time: MT accumulators, one weight
// register, so every row is served by a single pass over the weights (rows in L1 throughout).
template <int MT>
MINISTACK_AVX512BF16 void wide_tile(const uint32_t* x, int64_t x_stride, const uint32_t* w, int64_t pairs, const uint16_t* bias, uint16_t* y,
                                    int64_t y_stride, int64_t n0, int64_t N) {
  for (int g = 0; g < GROUP; ++g) {
    const int64_t col = n0 + g * LANES;
    if (col >= N) break;
    const uint32_t* wb = w + g * pairs * LANES;
    __m512 acc[MT];
    for (int r = 0; r < MT; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t p = 0; p < pairs; ++p) {
      const __m512bh b = (__m512bh)_mm512_loadu_si512(wb + p * LANES);
      _mm_prefetch(reinterpret_cast<const char*>(wb + (p + AHEAD) * LANES), _MM_HINT_T0);
      for (int r = 0; r < MT; ++r) acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_set1_epi32(static_cast<int>(x[r * x_stride + p])), b);
    }
    const __mmask16 keep = N - col >= LANES ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (N - col)) - 1);
    const __m512 bv = bias != nullptr ? _mm512_cvtpbh_ps((__m256bh)_mm256_maskz_loadu_epi16(keep, bias + col)) : _mm512_setzero_ps();
    for (int r = 0; r < MT; ++r) _mm256_mask_storeu_epi16(y + r * y_stride + col, keep, (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(acc[r], bv)));
  }
}

using WideFn = void (*)(const uint32_t*, int64_t, const uint32_t*, int64_t, const uint16_t*, uint16_t*, int64_t, int64_t, int64_t);
constexpr WideFn WIDE_TILES[8] = {wide_tile<9>, wide_tile<10>, wide_tile<11>, wide_tile<12>, wide_tile<13>, wide_tile<14>, wide_tile<15>, wide_tile<16>};

bool supported() { return ministack::avx512_bf16_supported(); }

// x (..., K) bfloat16 with K even; packed (groups * GROUP, K / 2, 16) int32 from
// serve.layers.linear.pack_pairs (N outputs padded to whole groups with zeros); bias (N,)
// bfloat16 or None -> (..., N) bfloat16.
at::Tensor linear_bf16(const at::Tensor& input, const at::Tensor& packed, int64_t out_features, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(supported(), "linear_bf16 needs AVX-512 BF16, which this CPU lacks");
  TORCH_CHECK(input.scalar_type() == at::kBFloat16, "linear_bf16: input must be bfloat16");
  TORCH_CHECK(packed.scalar_type() == at::kInt && packed.dim() == 3 && packed.size(2) == LANES && packed.size(0) % GROUP == 0 && packed.is_contiguous(),
              "linear_bf16: packed must be the contiguous (blocks, K / 2, 16) int32 layout of pack_pairs");
  const int64_t K = input.size(-1), pairs = packed.size(1), N = out_features;
  TORCH_CHECK(K == 2 * pairs, "linear_bf16: input has ", K, " features, the packed weight takes ", 2 * pairs);
  TORCH_CHECK(N > 0 && N <= packed.size(0) * LANES, "linear_bf16: ", N, " outputs do not fit the packed weight's ", packed.size(0) * LANES);
  const uint16_t* bias_ptr = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kBFloat16 && bias->numel() == N && bias->is_contiguous(), "linear_bf16: bias must be (", N, ",) bfloat16");
    bias_ptr = reinterpret_cast<const uint16_t*>(bias->data_ptr<at::BFloat16>());
  }
  const at::Tensor x = input.reshape({-1, K}).contiguous();
  const int64_t M = x.size(0), groups = packed.size(0) / GROUP;
  std::vector<int64_t> shape(input.sizes().begin(), input.sizes().end());
  shape.back() = N;
  at::Tensor y = at::empty({M, N}, input.options());
  const auto* xp = reinterpret_cast<const uint32_t*>(x.data_ptr<at::BFloat16>());
  const auto* wp = reinterpret_cast<const uint32_t*>(packed.data_ptr<int32_t>());
  auto* yp = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  // Groups of 48 outputs split across threads. More rows than one tile: the group's weights go
  // by in chunks of CHUNK pairs (~18 KB, L1-sized), each chunk used by every tile of rows while
  // it is in L1, the running sums parked in `partial`; every output still sums its pairs in order.
  const int64_t chunk = M <= ROWS ? pairs : CHUNK;
  if (M > ROWS && M <= 2 * ROWS) {
    at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
      for (int64_t g = g0; g < g1; ++g) WIDE_TILES[M - ROWS - 1](xp, pairs, wp + g * GROUP * pairs * LANES, pairs, bias_ptr, yp, N, g * GROUP * LANES, N);
    });
    return y.view(shape);
  }
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    std::vector<float> partial(M <= ROWS ? 0 : ((M + ROWS - 1) / ROWS) * ROWS * GROUP * LANES);
    for (int64_t g = g0; g < g1; ++g) {
      const uint32_t* wg = wp + g * GROUP * pairs * LANES;
      for (int64_t p0 = 0; p0 < pairs; p0 += chunk) {
        const int64_t p1 = std::min(pairs, p0 + chunk);
        for (int64_t m = 0; m < M; m += ROWS) {
          const int64_t rows = std::min(ROWS, M - m);
          TILES[rows - 1](xp + m * pairs, pairs, wg, pairs, p0, p1, partial.data() + m * GROUP * LANES, p0 == 0, p1 == pairs, bias_ptr, yp + m * N, N,
                          g * GROUP * LANES, N);
        }
      }
    }
  });
  return y.view(shape);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ministack, m) {
  m.def("linear_bf16(Tensor input, Tensor packed, int out_features, Tensor? bias) -> Tensor");
  m.def("bf16_linear_supported() -> bool", &supported);
}

TORCH_LIBRARY_IMPL(ministack, CPU, m) { m.impl("linear_bf16", &linear_bf16); }
