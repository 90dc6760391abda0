// The register-tiled kernel of the row-invariant linear layer, written once over a vector type V and
// compiled once per instruction set: linear_avx512.cpp and linear_avx2.cpp include this file inside a
// target region (PF_TARGET_BEGIN), linear.cpp outside any (portable). No include guard, and no
// library calls: everything instantiated here must be compiled for the including file's target only
// (an inline library function emitted with AVX-512 code here could be the copy the linker keeps for
// the whole module), and templates live in an anonymous namespace, one copy per translation unit.
// The including file defines PF_LINEAR_VEC (its V) and PF_LINEAR_KERNEL (the LinearKernel to define).
//
// V provides T (a vector of kLanes floats); kPanel, the output columns of a packed panel (a multiple
// of kLanes); kRows, the most rows of a register tile (kRows * kPanel / kLanes accumulators plus
// kPanel / kLanes weight vectors must fit the register file); zero(), load(p), broadcast(f),
// madd(a, b, acc) = acc + a * b, add(a, b), and load_first(p, n) / store_first(p, v, n), which touch
// only lanes [0, n) (n may exceed kLanes).
//
// Row invariance: every output element is acc = madd(x[m, i], w[i, col], acc) for i = 0 .. k-1 in
// order, plus the bias, whatever the tile, block or thread its row lands in.
namespace pfengine {
namespace {

// Tile t of a panel's `tiles` prefetches (into L2) rows [t * k / tiles, ...) of the next panel, one k-row
// every `tiles` steps: spread evenly over the panel's tiles, the next panel streams in from memory while
// this one is computed. (Left to the hardware prefetcher, a decode batch of 8 rows in two tiles waited
// on memory in the first tile and computed from cache in the second: 2x slower with cold weights.)
struct Prefetch {
  const char* next;  // the next panel, or nullptr
  int64_t tiles, t;
};

template <class V, int R>
void tile(const float* x, int64_t ldx, const float* panel, int64_t k, const float* bias, float* y, int64_t ldy,
          int64_t cols, Prefetch pf) {
  constexpr int kVec = V::kPanel / V::kLanes;
  constexpr int64_t kRowBytes = V::kPanel * sizeof(float);
  using T = typename V::T;
  T acc[R][kVec];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < kVec; ++j) acc[r][j] = V::zero();
  const char* ahead = pf.next ? pf.next + pf.t * k / pf.tiles * kRowBytes : nullptr;
  int64_t wait = 1;
  for (int64_t i = 0; i < k; ++i) {
    if (ahead && --wait == 0) {
      for (int64_t b = 0; b < kRowBytes; b += 64) __builtin_prefetch(ahead + b, 0, 2);
      ahead += kRowBytes;
      wait = pf.tiles;
    }
    T w[kVec];
    for (int j = 0; j < kVec; ++j) w[j] = V::load(panel + i * V::kPanel + j * V::kLanes);
    for (int r = 0; r < R; ++r) {
      const T xv = V::broadcast(x[r * ldx + i]);
      for (int j = 0; j < kVec; ++j) acc[r][j] = V::madd(xv, w[j], acc[r][j]);
    }
  }
  for (int j = 0; j < kVec && j * V::kLanes < cols; ++j) {
    const int64_t n = cols - j * V::kLanes;
    const T b = bias ? V::load_first(bias + j * V::kLanes, n) : V::zero();
    for (int r = 0; r < R; ++r) V::store_first(y + r * ldy + j * V::kLanes, V::add(acc[r][j], b), n);
  }
}

// tile<V, rows> for 1 <= rows <= R.
template <class V, int R = V::kRows>
void tile_of(int64_t rows, const float* x, int64_t ldx, const float* panel, int64_t k, const float* bias, float* y,
             int64_t ldy, int64_t cols, Prefetch pf) {
  if constexpr (R > 1) {
    if (rows < R) return tile_of<V, R - 1>(rows, x, ldx, panel, k, bias, y, ldy, cols, pf);
  }
  tile<V, R>(x, ldx, panel, k, bias, y, ldy, cols, pf);
}

// n items in `parts` near-equal parts: the size of part i.
inline int64_t part(int64_t n, int64_t parts, int64_t i) { return n / parts + (i < n % parts ? 1 : 0); }

// Panels [p0, p1) for all rows. The rows go in near-equal blocks of at most ~256 KB of x, which stay
// in L2 while the panels stream past (one block holds a whole decode batch); within a block, in
// near-equal tiles of at most V::kRows (8 rows: two tiles of 4, not 6 + 2, so both keep enough
// independent accumulators to hide the FMA latency).
template <class V>
void linear_panels(const LinearArgs& a, int64_t p0, int64_t p1) {
  const int64_t most = (int64_t{1} << 16) / a.k > V::kRows ? (int64_t{1} << 16) / a.k : V::kRows;
  const int64_t blocks = (a.m + most - 1) / most;
  for (int64_t b = 0, m0 = 0; b < blocks; m0 += part(a.m, blocks, b), ++b) {
    const int64_t rows = part(a.m, blocks, b);
    const int64_t tiles = (rows + V::kRows - 1) / V::kRows;
    for (int64_t p = p0; p < p1; ++p) {
      const float* panel = a.packed + p * a.k * V::kPanel;
      const int64_t col = p * V::kPanel;
      const int64_t cols = a.n - col < V::kPanel ? a.n - col : V::kPanel;
      const float* bias = a.bias ? a.bias + col : nullptr;
      const char* next = p + 1 < p1 ? reinterpret_cast<const char*>(panel + a.k * V::kPanel) : nullptr;
      for (int64_t t = 0, m = m0; t < tiles; m += part(rows, tiles, t), ++t)
        tile_of<V>(part(rows, tiles, t), a.x + m * a.ldx, a.ldx, panel, a.k, bias, a.y + m * a.n + col, a.n, cols,
                   Prefetch{next, tiles, t});
    }
  }
}

}  // namespace

const LinearKernel PF_LINEAR_KERNEL{PF_LINEAR_VEC::kPanel, &linear_panels<PF_LINEAR_VEC>};

}  // namespace pfengine
