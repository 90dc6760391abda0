// The linear layer's kernel (linear_tile.h) for AVX2 + FMA: 8-float vectors, 16-column panels, tiles of
// up to 6 rows (12 accumulators, 2 weight vectors and a broadcast in the 16 ymm registers).
#include "linear_kernel.h"

#ifdef PF_X86_LINEAR
#include <immintrin.h>

PF_TARGET_BEGIN("avx2,fma")
namespace pfengine {
namespace {

struct Avx2 {
  using T = __m256;
  static constexpr int kLanes = 8, kPanel = 16, kRows = 6;
  static T zero() { return _mm256_setzero_ps(); }
  static T load(const float* p) { return _mm256_loadu_ps(p); }
  static T broadcast(float f) { return _mm256_set1_ps(f); }
  static T madd(T a, T b, T acc) { return _mm256_fmadd_ps(a, b, acc); }
  static T add(T a, T b) { return _mm256_add_ps(a, b); }
  static __m256i first(int64_t n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n < kLanes ? n : kLanes)),
                              _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static T load_first(const float* p, int64_t n) { return _mm256_maskload_ps(p, first(n)); }
  static void store_first(float* p, T v, int64_t n) { _mm256_maskstore_ps(p, first(n), v); }
};

}  // namespace
}  // namespace pfengine

#define PF_LINEAR_VEC Avx2
#define PF_LINEAR_KERNEL kLinearAvx2
#include "linear_tile.h"
PF_TARGET_END

#endif  // PF_X86_LINEAR
