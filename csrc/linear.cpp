// Row-invariant fp32 linear layer on CPU: y[m, n] = sum_k x[m, k] * w[n, k] (+ b[n]).
//
// Why not BLAS: for the few rows of a decode step MKL runs skinny-GEMM code far below memory
// bandwidth, and it rounds differently for different row counts, so a particle's logits would
// depend on how many other particles share the batch. Here every output element is one FMA chain
// over k in increasing order, whatever the number of rows or the row's place in a tile: a row's
// result depends only on that row and the weights.
//
// The weight is packed once into panels of kPanel output columns, [ceil(N / kPanel), K, kPanel]
// (zero-padded), so a panel is read contiguously. A task is a range of panels (at::parallel_for);
// for each panel the rows go through in tiles of up to kTile, each tile keeping kTile x kPanel
// accumulators in registers while k runs: the panel's weight vectors loaded and one x value
// broadcast per row and k. Small batches stream each weight once from memory.
//
// One code path: AVX-512F, compiled per function and picked at run time; without it the caller
// (pfengine/kernels/linear.py) keeps the torch path.
#include "kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <utility>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define PF_AVX512 __attribute__((target("avx512f")))
#endif

namespace pfengine {

#ifdef PF_AVX512
namespace {

constexpr int64_t kTile = 6;  // rows per register tile: kTile * kVec accumulators + kVec weight vectors
constexpr int kVec = kPanel / 16;

inline __mmask16 lanes(int64_t cols, int j) {
  const int64_t c = cols - 16 * j;
  return c >= 16 ? 0xFFFF : c <= 0 ? 0 : static_cast<__mmask16>((1u << c) - 1);
}

template <int R>
PF_AVX512 void tile(const float* x, int64_t ldx, const float* panel, int64_t k, const float* bias, float* y,
                    int64_t ldy, int64_t cols) {
  __m512 acc[R][kVec];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < kVec; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t i = 0; i < k; ++i) {
    __m512 w[kVec];
    for (int j = 0; j < kVec; ++j) w[j] = _mm512_loadu_ps(panel + i * kPanel + 16 * j);
    for (int r = 0; r < R; ++r) {
      const __m512 xv = _mm512_set1_ps(x[r * ldx + i]);
      for (int j = 0; j < kVec; ++j) acc[r][j] = _mm512_fmadd_ps(xv, w[j], acc[r][j]);
    }
  }
  for (int j = 0; j < kVec; ++j) {
    const __mmask16 m = lanes(cols, j);
    const __m512 b = bias ? _mm512_maskz_loadu_ps(m, bias + 16 * j) : _mm512_setzero_ps();
    for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(y + r * ldy + 16 * j, m, _mm512_add_ps(acc[r][j], b));
  }
}

using TileFn = void (*)(const float*, int64_t, const float*, int64_t, const float*, float*, int64_t, int64_t);

template <int... R>
constexpr auto tile_table(std::integer_sequence<int, R...>) {
  return std::array<TileFn, sizeof...(R)>{&tile<R + 1>...};
}

constexpr auto kTiles = tile_table(std::make_integer_sequence<int, kTile>{});

}  // namespace

bool cpu_has_avx512() {
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f");
  }();
  return ok;
}

void packed_linear(const LinearArgs& a) {
  const int64_t panels = (a.n + kPanel - 1) / kPanel;
  // Large batches go through in row blocks of ~256 KB of x, which stay in L2 while the thread's
  // panels stream past; one block holds a whole decode batch.
  const int64_t block = std::max(kTile, (int64_t{1} << 16) / a.k / kTile * kTile);
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t m0 = 0; m0 < a.m; m0 += block) {
      const int64_t m1 = std::min(a.m, m0 + block);
      for (int64_t p = p0; p < p1; ++p) {
        const float* panel = a.packed + p * a.k * kPanel;
        const int64_t col = p * kPanel, cols = std::min(kPanel, a.n - col);
        const float* bias = a.bias ? a.bias + col : nullptr;
        for (int64_t m = m0; m < m1; m += kTile) {
          const int64_t rows = std::min(kTile, m1 - m);
          kTiles[rows - 1](a.x + m * a.ldx, a.ldx, panel, a.k, bias, a.y + m * a.n + col, a.n, cols);
        }
      }
    }
  });
}

#else

bool cpu_has_avx512() { return false; }

void packed_linear(const LinearArgs&) {}  // unreachable: the binding checks cpu_has_avx512() first

#endif  // PF_AVX512

void pack_linear_weight(const float* w, int64_t n, int64_t k, float* packed) {
  const int64_t panels = (n + kPanel - 1) / kPanel;
  std::memset(packed, 0, sizeof(float) * panels * k * kPanel);
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      for (int64_t c = 0; c < kPanel && p * kPanel + c < n; ++c) {
        const float* row = w + (p * kPanel + c) * k;
        float* dst = packed + p * k * kPanel + c;
        for (int64_t i = 0; i < k; ++i) dst[i * kPanel] = row[i];
      }
    }
  });
}

}  // namespace pfengine
