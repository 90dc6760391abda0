// Row-invariant fp32 linear layer on CPU: y[m, n] = sum_k x[m, k] * w[n, k] (+ b[n]).
//
// Why not BLAS: for the few rows of a decode step MKL runs skinny-GEMM code far below memory
// bandwidth, and it rounds differently for different row counts, so a particle's logits would
// depend on how many other particles share the batch. Here every output element is one multiply-add
// chain over k in increasing order, whatever the number of rows or the row's place in a tile: a row's
// result depends only on that row, the weights and the instruction set.
//
// The weight is packed once into panels of `panel` output columns, [ceil(N / panel), K, panel]
// (zero-padded), so a panel is read contiguously. A task is a range of panels (at::parallel_for); for
// each panel the rows go through in register tiles, each keeping rows x panel accumulators while k
// runs (csrc/linear_tile.h). Small batches stream each weight once from memory.
//
// Three kernels, chosen per call by the caller: AVX-512F (64-column panels), AVX2 + FMA (16), and a
// portable one (16; vector extensions the compiler maps to the baseline ISA's registers).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>

#include "linear_kernel.h"

namespace pfengine {
namespace {

// GCC / Clang vector extensions: SSE2 registers on x86-64, NEON on ARM, scalar code elsewhere.
struct Portable {
  using T = float __attribute__((vector_size(16)));
  static constexpr int kLanes = 4, kPanel = 16, kRows = 2;
  static T zero() { return T{}; }
  static T load(const float* p) {
    T t;
    std::memcpy(&t, p, sizeof t);
    return t;
  }
  static T broadcast(float f) { return T{f, f, f, f}; }
  static T madd(T a, T b, T acc) { return acc + a * b; }
  static T add(T a, T b) { return a + b; }
  static T load_first(const float* p, int64_t n) {
    T t{};
    for (int l = 0; l < kLanes && l < n; ++l) t[l] = p[l];
    return t;
  }
  static void store_first(float* p, T v, int64_t n) {
    for (int l = 0; l < kLanes && l < n; ++l) p[l] = v[l];
  }
};

}  // namespace
}  // namespace pfengine

#define PF_LINEAR_VEC Portable
#define PF_LINEAR_KERNEL kLinearPortable
#include "linear_tile.h"

namespace pfengine {
namespace {

const LinearKernel& kernel(Isa isa) {
  TORCH_CHECK(cpu_supports(isa), "linear: this CPU cannot run the requested instruction set");
  switch (isa) {
#ifdef PF_X86_LINEAR
    case Isa::avx512: return kLinearAvx512;
    case Isa::avx2: return kLinearAvx2;
#endif
    default: return kLinearPortable;
  }
}

// Threading: a task gets at least this many multiply-adds (~10 us of one core), so that tiny layers
// (a single decode row through a small projection) run on one thread instead of paying a fork/join.
constexpr int64_t kTaskMacs = int64_t{1} << 20;

}  // namespace

int64_t linear_panel_width(Isa isa) { return kernel(isa).panel; }

void packed_linear(const LinearArgs& a, Isa isa) {
  const LinearKernel& kern = kernel(isa);
  const int64_t panels = (a.n + kern.panel - 1) / kern.panel;
  const int64_t grain = std::max<int64_t>(1, kTaskMacs / (a.m * a.k * kern.panel));
  at::parallel_for(0, panels, grain, [&](int64_t p0, int64_t p1) { kern.panels(a, p0, p1); });
}

void pack_linear_weight(const float* w, int64_t n, int64_t k, int64_t panel, float* packed) {
  const int64_t panels = (n + panel - 1) / panel;
  std::memset(packed, 0, sizeof(float) * panels * k * panel);
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      for (int64_t c = 0; c < panel && p * panel + c < n; ++c) {
        const float* row = w + (p * panel + c) * k;
        float* dst = packed + p * k * panel + c;
        for (int64_t i = 0; i < k; ++i) dst[i * panel] = row[i];
      }
    }
  });
}

}  // namespace pfengine
