// Paged decode attention on CPU: one query token per particle against its KV blocks, read in place
// through the block table (no gather copy). A task is one particle -- or a range of its kv heads
// when there are too few particles to keep every thread busy -- and walks its blocks in table order,
// each block's [B, Hkv, D] rows in memory order, prefetching the next block's rows as it goes. GQA:
// each kv head serves its whole group of query heads, so each K/V row is loaded once per group.
// Softmax is online (per block: block max, rescale, exp, accumulate P V) with fp32 accumulation for
// fp32, bf16 and fp16 cache storage. Tasks run on torch's intra-op threads (at::parallel_for).
//
// Two code paths: AVX2 + FMA + F16C intrinsics (compiled with a function-level target attribute, so the
// extension still loads on CPUs without AVX2) when the caller's instruction set is avx2 or avx512 and
// the head dim is a multiple of 8, and portable scalar C++ otherwise.
#include "kernels.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#define PF_X86 1
#define PF_AVX2 __attribute__((target("avx2,fma,f16c")))
#endif

namespace pfengine {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

template <KvType KT>
struct Storage;
template <>
struct Storage<KvType::f32> { using T = float; };
template <>
struct Storage<KvType::bf16> { using T = c10::BFloat16; };
template <>
struct Storage<KvType::f16> { using T = c10::Half; };

// Per-thread scratch for a task of up to H kv heads (H * G query heads): scaled queries and
// accumulators [H * G, D], one kv head's block scores / probabilities [G, B], running max and sum.
struct Scratch {
  std::vector<float> buf;
  float *q, *acc, *s, *m, *l;
  Scratch(int64_t heads, int64_t g, int64_t d, int64_t b)
      : buf(static_cast<size_t>(2 * heads * g * d + g * b + 2 * heads * g)) {
    q = buf.data();
    acc = q + heads * g * d;
    s = acc + heads * g * d;
    m = s + g * b;
    l = m + heads * g;
  }
};

// Per-task set-up for query heads [q0, q0 + nq): scaled queries, zero accumulators, empty softmax.
inline void start_task(const AttentionArgs& a, int64_t n, int64_t q0, int64_t nq, Scratch& w) {
  const int64_t d = a.d;
  const float* q = a.q + (n * a.hq + q0) * d;
  for (int64_t i = 0; i < nq * d; ++i) w.q[i] = q[i] * a.scale;
  std::fill(w.acc, w.acc + nq * d, 0.0f);
  std::fill(w.m, w.m + nq, kNegInf);
  std::fill(w.l, w.l + nq, 0.0f);
}

inline void finish_task(const AttentionArgs& a, int64_t n, int64_t q0, int64_t nq, const Scratch& w) {
  const int64_t d = a.d;
  float* o = a.out + (n * a.hq + q0) * d;
  for (int64_t g = 0; g < nq; ++g) {
    const float inv = 1.0f / w.l[g];  // a zero-length context gives NaN, as the reference does
    for (int64_t i = 0; i < d; ++i) o[g * d + i] = w.acc[g * d + i] * inv;
  }
}

// The state of one kv head's G query heads within a task, and the block it reads.
template <typename T>
struct HeadBlock {
  const T* k;    // first key row of the block for this kv head
  const T* v;
  const T* next_k;  // the same rows of the next block (prefetched while this one runs), or null
  const T* next_v;
  int64_t s_kt;  // token strides
  int64_t s_vt;
  int64_t nt;    // valid tokens in the block
  const float* q;  // [G, D] scaled
  float* acc;      // [G, D]
  float* m;        // [G]
  float* l;        // [G]
  float* s;        // [G, B] scratch
};

// ------------------------------------------------------------------------------------------------
// Portable path.

template <typename T>
void block_generic(const HeadBlock<T>& hb, int64_t G, int64_t D, int64_t B) {
  for (int64_t t = 0; t < hb.nt; ++t) {
    const T* kr = hb.k + t * hb.s_kt;
    for (int64_t g = 0; g < G; ++g) {
      const float* q = hb.q + g * D;
      float dot = 0.0f;
      for (int64_t i = 0; i < D; ++i) dot += q[i] * static_cast<float>(kr[i]);
      hb.s[g * B + t] = dot;
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    float* s = hb.s + g * B;
    float mx = kNegInf;
    for (int64_t t = 0; t < hb.nt; ++t) mx = std::max(mx, s[t]);
    const float m_new = std::max(hb.m[g], mx);
    const float alpha = hb.m[g] == kNegInf ? 0.0f : std::exp(hb.m[g] - m_new);
    float sum = 0.0f;
    for (int64_t t = 0; t < hb.nt; ++t) {
      s[t] = std::exp(s[t] - m_new);
      sum += s[t];
    }
    hb.l[g] = hb.l[g] * alpha + sum;
    hb.m[g] = m_new;
    if (alpha != 1.0f) {
      float* acc = hb.acc + g * D;
      for (int64_t i = 0; i < D; ++i) acc[i] *= alpha;
    }
  }
  for (int64_t t = 0; t < hb.nt; ++t) {
    const T* vr = hb.v + t * hb.s_vt;
    for (int64_t g = 0; g < G; ++g) {
      const float p = hb.s[g * B + t];
      float* acc = hb.acc + g * D;
      for (int64_t i = 0; i < D; ++i) acc[i] += p * static_cast<float>(vr[i]);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// AVX2 + FMA + F16C path (head dim a multiple of 8).

#ifdef PF_X86

template <KvType KT>
PF_AVX2 inline __m256 load8(const void* base, int64_t i) {
  if constexpr (KT == KvType::f32) {
    return _mm256_loadu_ps(static_cast<const float*>(base) + i);
  } else if constexpr (KT == KvType::bf16) {
    const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(x), 16));
  } else {
    const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + i));
    return _mm256_cvtph_ps(x);
  }
}

PF_AVX2 inline float hsum(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}

PF_AVX2 inline float hmax(__m256 v) {
  __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_max_ps(x, _mm_movehl_ps(x, x));
  x = _mm_max_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}

// exp for x <= 0 (Cephes expf: Cody-Waite reduction by ln 2, degree-5 polynomial, ~1 ulp);
// x < -88 gives 0, NaN stays NaN.
PF_AVX2 inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(-88.0f), x);
  __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  __m256 r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

// Prefetch one row of `bytes` (a K or V row of the next block) into L1, a line at a time.
inline void prefetch_row(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < bytes; off += 64) _mm_prefetch(c + off, _MM_HINT_T0);
}

// Scores of NG query heads (rows of q, stride D) against the block's nt keys: s[g * B + t]. The
// prefetches of the next block's keys (`next`, or null) are spread over this block's rows: a burst
// of them would fill the line-fill buffers and stall the loads the arithmetic waits for.
template <KvType KT, int NG>
PF_AVX2 void qk_group(const float* q, int64_t D, const void* kp, int64_t s_kt, int64_t nt, float* s, int64_t B,
                      const void* next) {
  using T = typename Storage<KT>::T;
  const T* k = static_cast<const T*>(kp);
  const T* nk = static_cast<const T*>(next);
  const int64_t row_bytes = D * int64_t(sizeof(T));
  int64_t t = 0;
  for (; t + 2 <= nt; t += 2) {
    const T* k0 = k + t * s_kt;
    const T* k1 = k0 + s_kt;
    if (nk != nullptr) {
      prefetch_row(nk + t * s_kt, row_bytes);
      prefetch_row(nk + (t + 1) * s_kt, row_bytes);
    }
    __m256 a0[NG], a1[NG];
    for (int g = 0; g < NG; ++g) a0[g] = a1[g] = _mm256_setzero_ps();
    for (int64_t c = 0; c < D; c += 8) {
      const __m256 x0 = load8<KT>(k0, c), x1 = load8<KT>(k1, c);
      for (int g = 0; g < NG; ++g) {
        const __m256 qg = _mm256_loadu_ps(q + g * D + c);
        a0[g] = _mm256_fmadd_ps(qg, x0, a0[g]);
        a1[g] = _mm256_fmadd_ps(qg, x1, a1[g]);
      }
    }
    for (int g = 0; g < NG; ++g) {
      s[g * B + t] = hsum(a0[g]);
      s[g * B + t + 1] = hsum(a1[g]);
    }
  }
  for (int64_t r = t; nk != nullptr && r < B; ++r) prefetch_row(nk + r * s_kt, row_bytes);
  if (t < nt) {
    const T* k0 = k + t * s_kt;
    __m256 a0[NG];
    for (int g = 0; g < NG; ++g) a0[g] = _mm256_setzero_ps();
    for (int64_t c = 0; c < D; c += 8) {
      const __m256 x0 = load8<KT>(k0, c);
      for (int g = 0; g < NG; ++g) a0[g] = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * D + c), x0, a0[g]);
    }
    for (int g = 0; g < NG; ++g) s[g * B + t] = hsum(a0[g]);
  }
}

// acc[g] += sum_t p[g * B + t] * v[t] for NG heads; each V chunk is loaded once for the group, and
// the next block's value rows are prefetched along the way.
template <KvType KT, int NG>
PF_AVX2 void pv_group(const float* p, int64_t B, const void* vp, int64_t s_vt, int64_t nt, float* acc, int64_t D,
                      const void* next) {
  using T = typename Storage<KT>::T;
  const T* v = static_cast<const T*>(vp);
  const T* nv = static_cast<const T*>(next);
  const int64_t row_bytes = D * int64_t(sizeof(T));
  int64_t c = 0;
  for (; c + 16 <= D; c += 16) {
    __m256 a0[NG], a1[NG];
    for (int g = 0; g < NG; ++g) {
      a0[g] = _mm256_loadu_ps(acc + g * D + c);
      a1[g] = _mm256_loadu_ps(acc + g * D + c + 8);
    }
    for (int64_t t = 0; t < nt; ++t) {
      const T* vr = v + t * s_vt;
      if (c == 0 && nv != nullptr) prefetch_row(nv + t * s_vt, row_bytes);
      const __m256 x0 = load8<KT>(vr, c), x1 = load8<KT>(vr, c + 8);
      for (int g = 0; g < NG; ++g) {
        const __m256 pb = _mm256_broadcast_ss(p + g * B + t);
        a0[g] = _mm256_fmadd_ps(pb, x0, a0[g]);
        a1[g] = _mm256_fmadd_ps(pb, x1, a1[g]);
      }
    }
    for (int g = 0; g < NG; ++g) {
      _mm256_storeu_ps(acc + g * D + c, a0[g]);
      _mm256_storeu_ps(acc + g * D + c + 8, a1[g]);
    }
  }
  for (int64_t r = nt; nv != nullptr && r < B; ++r) prefetch_row(nv + r * s_vt, row_bytes);
  for (; c < D; c += 8) {
    __m256 a0[NG];
    for (int g = 0; g < NG; ++g) a0[g] = _mm256_loadu_ps(acc + g * D + c);
    for (int64_t t = 0; t < nt; ++t) {
      if (c == 0 && D < 16 && nv != nullptr) prefetch_row(nv + t * s_vt, row_bytes);
      const __m256 x0 = load8<KT>(v + t * s_vt, c);
      for (int g = 0; g < NG; ++g) a0[g] = _mm256_fmadd_ps(_mm256_broadcast_ss(p + g * B + t), x0, a0[g]);
    }
    for (int g = 0; g < NG; ++g) _mm256_storeu_ps(acc + g * D + c, a0[g]);
  }
}

// Turn one head's block scores into probabilities against the new running max; rescale its state.
// The block max in vector lanes (max is exact, so the order does not matter; a NaN score is skipped
// as the scalar loop skips it), and no exp when the running max did not move (alpha = exp(0) = 1).
PF_AVX2 void softmax_update(float* s, int64_t nt, float* m, float* l, float* acc, int64_t D) {
  __m256 mx8 = _mm256_set1_ps(kNegInf);
  int64_t t = 0;
  for (; t + 8 <= nt; t += 8) mx8 = _mm256_max_ps(_mm256_loadu_ps(s + t), mx8);
  float mx = hmax(mx8);
  for (; t < nt; ++t) mx = s[t] > mx ? s[t] : mx;
  const float m_new = *m > mx ? *m : mx;
  const float alpha = *m == kNegInf ? 0.0f : *m == m_new ? 1.0f : std::exp(*m - m_new);
  const __m256 mv = _mm256_set1_ps(m_new);
  __m256 sum8 = _mm256_setzero_ps();
  t = 0;
  for (; t + 8 <= nt; t += 8) {
    const __m256 p = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + t), mv));
    _mm256_storeu_ps(s + t, p);
    sum8 = _mm256_add_ps(sum8, p);
  }
  float sum = hsum(sum8);
  for (; t < nt; ++t) {
    s[t] = std::exp(s[t] - m_new);
    sum += s[t];
  }
  *l = *l * alpha + sum;
  *m = m_new;
  if (alpha != 1.0f) {
    const __m256 av = _mm256_set1_ps(alpha);
    for (int64_t i = 0; i < D; i += 8) _mm256_storeu_ps(acc + i, _mm256_mul_ps(_mm256_loadu_ps(acc + i), av));
  }
}

// Calls f(std::integral_constant<int, NG>{}, g, next) for query heads [g, g + NG): groups of 4, then
// one of the 3, 2 or 1 left over. Only the first group gets `next` (the next block's rows to prefetch).
template <typename F>
PF_AVX2 inline void head_groups(int64_t G, const void* next, F&& f) {
  int64_t g = 0;
  for (; g + 4 <= G; g += 4, next = nullptr) f(std::integral_constant<int, 4>{}, g, next);
  switch (G - g) {
    case 3: f(std::integral_constant<int, 3>{}, g, next); break;
    case 2: f(std::integral_constant<int, 2>{}, g, next); break;
    case 1: f(std::integral_constant<int, 1>{}, g, next); break;
    default: break;
  }
}

template <KvType KT>
PF_AVX2 void block_avx2(const HeadBlock<typename Storage<KT>::T>& hb, int64_t G, int64_t D, int64_t B) {
  head_groups(G, hb.next_k, [&](auto ng, int64_t g, const void* next) PF_AVX2 {
    qk_group<KT, decltype(ng)::value>(hb.q + g * D, D, hb.k, hb.s_kt, hb.nt, hb.s + g * B, B, next);
  });
  for (int64_t g = 0; g < G; ++g) softmax_update(hb.s + g * B, hb.nt, hb.m + g, hb.l + g, hb.acc + g * D, D);
  head_groups(G, hb.next_v, [&](auto ng, int64_t g, const void* next) PF_AVX2 {
    pv_group<KT, decltype(ng)::value>(hb.s + g * B, B, hb.v, hb.s_vt, hb.nt, hb.acc + g * D, D, next);
  });
}

#endif  // PF_X86

// Kv heads [h0, h1) of particle n: for each block of its context, each kv head in turn.
template <KvType KT, bool VEC>
void attend_task(const AttentionArgs& a, int64_t n, int64_t h0, int64_t h1, Scratch& w) {
  using T = typename Storage<KT>::T;
  const int64_t G = a.hq / a.hkv, D = a.d, B = a.block_size;
  const int64_t nq = (h1 - h0) * G;
  start_task(a, n, h0 * G, nq, w);
  const int64_t ctx = a.context_lens[n];
  const int64_t nb = (ctx + B - 1) / B;
  const int32_t* row = a.tables + n * a.table_stride[0];
  const T* kc = static_cast<const T*>(a.k_cache);
  const T* vc = static_cast<const T*>(a.v_cache);
  HeadBlock<T> hb{};
  hb.s_kt = a.k_stride[1];
  hb.s_vt = a.v_stride[1];
  hb.s = w.s;
  for (int64_t j = 0; j < nb; ++j) {
    const int64_t blk = row[j * a.table_stride[1]];
    hb.nt = std::min(B, ctx - j * B);
    const int64_t next = j + 1 < nb ? row[(j + 1) * a.table_stride[1]] : -1;  // prefetched meanwhile
    for (int64_t h = h0; h < h1; ++h) {
      const int64_t hg = (h - h0) * G;  // this kv head's first query head within the task
      hb.k = kc + blk * a.k_stride[0] + h * a.k_stride[2];
      hb.v = vc + blk * a.v_stride[0] + h * a.v_stride[2];
      hb.next_k = next < 0 ? nullptr : kc + next * a.k_stride[0] + h * a.k_stride[2];
      hb.next_v = next < 0 ? nullptr : vc + next * a.v_stride[0] + h * a.v_stride[2];
      hb.q = w.q + hg * D;
      hb.acc = w.acc + hg * D;
      hb.m = w.m + hg;
      hb.l = w.l + hg;
#ifdef PF_X86
      if constexpr (VEC) {
        block_avx2<KT>(hb, G, D, B);
        continue;
      }
#endif
      block_generic(hb, G, D, B);
    }
  }
  finish_task(a, n, h0 * G, nq, w);
}

template <KvType KT, bool VEC>
void run_tasks(const AttentionArgs& a) {
  const int64_t G = a.hq / a.hkv;
  // Whole particles per task when there are enough of them for every thread; else split the kv heads.
  const int64_t threads = at::get_num_threads();
  int64_t per = a.hkv;
  while (per > 1 && a.n * (a.hkv / per) < 4 * threads) per = (per + 1) / 2;
  const int64_t chunks = (a.hkv + per - 1) / per;
  at::parallel_for(0, a.n * chunks, 1, [&](int64_t begin, int64_t end) {
    Scratch w(per, G, a.d, a.block_size);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / chunks, h0 = (task % chunks) * per;
      attend_task<KT, VEC>(a, n, h0, std::min(a.hkv, h0 + per), w);
    }
  });
}

template <KvType KT>
void run(const AttentionArgs& a) {
  if (a.isa >= Isa::avx2 && a.d % 8 == 0) {
#ifdef PF_X86
    run_tasks<KT, true>(a);
    return;
#endif
  }
  run_tasks<KT, false>(a);
}

}  // namespace

void paged_decode_attention(const AttentionArgs& a) {
  switch (a.kv_type) {
    case KvType::f32: run<KvType::f32>(a); break;
    case KvType::bf16: run<KvType::bf16>(a); break;
    case KvType::f16: run<KvType::f16>(a); break;
  }
}

}  // namespace pfengine
