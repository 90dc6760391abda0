// The linear layer's kernel (linear_tile.h) for AVX-512F: 16-float vectors, 64-column panels, tiles of
// up to 6 rows (24 accumulators and 4 weight vectors of the 32 zmm registers).
#include "linear_kernel.h"

#ifdef PF_X86_LINEAR
#include <immintrin.h>

PF_TARGET_BEGIN("avx512f")
namespace pfengine {
namespace {

struct Avx512 {
  using T = __m512;
  static constexpr int kLanes = 16, kPanel = 64, kRows = 6;
  static T zero() { return _mm512_setzero_ps(); }
  static T load(const float* p) { return _mm512_loadu_ps(p); }
  static T broadcast(float f) { return _mm512_set1_ps(f); }
  static T madd(T a, T b, T acc) { return _mm512_fmadd_ps(a, b, acc); }
  static T add(T a, T b) { return _mm512_add_ps(a, b); }
  static __mmask16 first(int64_t n) { return n >= kLanes ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1); }
  static T load_first(const float* p, int64_t n) { return _mm512_maskz_loadu_ps(first(n), p); }
  static void store_first(float* p, T v, int64_t n) { _mm512_mask_storeu_ps(p, first(n), v); }
};

}  // namespace
}  // namespace pfengine

#define PF_LINEAR_VEC Avx512
#define PF_LINEAR_KERNEL kLinearAvx512
#include "linear_tile.h"
PF_TARGET_END

#endif  // PF_X86_LINEAR
