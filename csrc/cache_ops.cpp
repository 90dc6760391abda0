// KV store, COW block copy, resampling and the resampling fork of the block tables, on CPU.
// Each equals its torch reference in pfengine/kernels/ exactly (same ints, same doubles).
#include "kernels.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstring>
#include <utility>
#include <vector>

namespace pfengine {

void store_kv(const StoreArgs& k, const StoreArgs& v, const int64_t* slots, int64_t t, int64_t hkv,
              int64_t row_bytes, int64_t block_size) {
  // Tokens are independent (distinct slots); only big prefills are worth a second thread.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(1, 2 * hkv * row_bytes));
  at::parallel_for(0, t, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t slot = slots[i];
      if (slot < 0) continue;
      const int64_t blk = slot / block_size, off = slot % block_size;
      for (const StoreArgs* a : {&k, &v}) {
        char* dst = a->dst + blk * a->dst_stride[0] + off * a->dst_stride[1];
        const char* src = a->src + i * a->src_stride[0];
        if (a->src_stride[1] == row_bytes && a->dst_stride[2] == row_bytes) {
          std::memcpy(dst, src, static_cast<size_t>(hkv * row_bytes));
        } else {
          for (int64_t h = 0; h < hkv; ++h)
            std::memcpy(dst + h * a->dst_stride[2], src + h * a->src_stride[1], static_cast<size_t>(row_bytes));
        }
      }
    }
  });
}

void copy_blocks(char* cache, int64_t planes, int64_t num_blocks, int64_t block_bytes, const int64_t* src,
                 const int64_t* dst, int64_t p) {
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(1, block_bytes));
  at::parallel_for(0, planes * p, grain, [&](int64_t begin, int64_t end) {
    for (int64_t job = begin; job < end; ++job) {
      const int64_t plane = job / p, j = job % p;
      if (src[j] < 0 || dst[j] < 0 || src[j] == dst[j]) continue;
      char* base = cache + plane * num_blocks * block_bytes;
      std::memcpy(base + dst[j] * block_bytes, base + src[j] * block_bytes, static_cast<size_t>(block_bytes));
    }
  });
}

void resample(const double* weights, const int64_t* seg_starts, int64_t num_segments, const double* uniforms,
              int method, const bool* active, int64_t* out) {
  std::vector<double> cdf;
  for (int64_t r = 0; r < num_segments; ++r) {
    const int64_t lo = seg_starts[r], hi = seg_starts[r + 1], n = hi - lo;
    for (int64_t i = lo; i < hi; ++i) out[i] = i;
    if (n == 0 || (active != nullptr && !active[r])) continue;
    // cumsum in fp64, left to right (as torch.cumsum on CPU), then normalised by the last entry.
    cdf.resize(static_cast<size_t>(n));
    double run = 0.0;
    for (int64_t i = 0; i < n; ++i) cdf[i] = run += weights[lo + i];
    const double total = cdf[n - 1];
    for (int64_t i = 0; i < n; ++i) cdf[i] = cdf[i] / total;
    const double nd = static_cast<double>(n);
    for (int64_t i = 0; i < n; ++i) {
      double point;
      if (method == 0) {
        point = (static_cast<double>(i) + uniforms[lo]) / nd;
      } else if (method == 1) {
        point = (static_cast<double>(i) + uniforms[lo + i]) / nd;
      } else {
        point = uniforms[lo + i];
      }
      // searchsorted(cdf, point, right=True), clamped to n - 1.
      const int64_t k = std::upper_bound(cdf.begin(), cdf.end(), point) - cdf.begin();
      out[lo + i] = lo + std::min(k, n - 1);
    }
  }
}

int64_t fork(const ForkState& s, const int64_t* rows, const int64_t* ancestors, const bool* writes, int64_t m,
             int64_t block_size, int64_t* pairs, int64_t* missing) {
  const int64_t W = s.width, B = block_size;
  auto table = [&](int64_t row, int64_t col) -> int32_t& {
    return s.tables[row * s.table_stride[0] + col * s.table_stride[1]];
  };
  auto len = [&](int64_t row) -> int64_t& { return s.lens[row * s.lens_stride]; };
  *missing = 0;

  // Every block named by the forked rows (the ancestors are among them) must exist: checked before
  // anything changes.
  for (int64_t i = 0; i < m; ++i)
    for (int64_t c = 0; c < W; ++c)
      TORCH_CHECK(table(rows[i], c) < s.num_blocks, "fork: block ", table(rows[i], c), " out of range [0, ",
                  s.num_blocks, ")");

  // The fork: gather the ancestors' tables, add their references, drop the children's old ones.
  std::vector<int32_t> new_tables(static_cast<size_t>(m * W));
  std::vector<int64_t> new_lens(static_cast<size_t>(m));
  for (int64_t i = 0; i < m; ++i) {
    const int64_t src = rows[ancestors[i]];
    for (int64_t c = 0; c < W; ++c) new_tables[i * W + c] = table(src, c);
    new_lens[i] = len(src);
  }
  for (const int32_t b : new_tables)
    if (b >= 0) ++s.ref_counts[b];
  std::vector<int32_t> old;
  old.reserve(static_cast<size_t>(m * W));
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t c = 0; c < W; ++c) {
      const int32_t b = table(rows[i], c);
      if (b >= 0) {
        --s.ref_counts[b];
        old.push_back(b);
      }
    }
  }
  // Blocks nobody references any more go on the free stack in ascending order.
  std::sort(old.begin(), old.end());
  old.erase(std::unique(old.begin(), old.end()), old.end());
  int64_t nf = *s.num_free;
  for (const int32_t b : old) {
    if (s.ref_counts[b] != 0) continue;
    TORCH_CHECK(nf < s.num_blocks, "fork: free stack overflow (refcounts inconsistent with the tables)");
    s.free_stack[nf++] = b;
  }
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t c = 0; c < W; ++c) table(rows[i], c) = new_tables[i * W + c];
    len(rows[i]) = new_lens[i];
  }

  // Copy-on-write of the shared, partially filled last blocks of writing children. A block whose
  // every holder writes now stays in place with its lowest-index writer.
  std::vector<int64_t> blk(static_cast<size_t>(m), -1);
  std::vector<std::pair<int64_t, int64_t>> cand;  // (block, child)
  for (int64_t i = 0; i < m; ++i) {
    if (!writes[i] || new_lens[i] % B == 0) continue;
    const int32_t b = new_tables[i * W + std::min(new_lens[i] / B, W - 1)];
    if (b >= 0 && s.ref_counts[b] > 1) {
      blk[i] = b;
      cand.emplace_back(b, i);
    }
  }
  std::sort(cand.begin(), cand.end());
  std::vector<char> cow(static_cast<size_t>(m), 0);
  int64_t n = 0;
  for (size_t lo = 0; lo < cand.size();) {
    size_t hi = lo;
    while (hi < cand.size() && cand[hi].first == cand[lo].first) ++hi;
    const bool keeper = s.ref_counts[cand[lo].first] == static_cast<int64_t>(hi - lo);
    for (size_t k = keeper ? lo + 1 : lo; k < hi; ++k) {
      cow[cand[k].second] = 1;
      ++n;
    }
    lo = hi;
  }
  if (n > nf) {
    *missing = n - nf;
    *s.num_free = nf;
    return 0;
  }
  int64_t k = 0;
  for (int64_t i = 0; i < m; ++i) {
    if (!cow[i]) continue;
    const int32_t dst = s.free_stack[nf - 1 - k];
    table(rows[i], new_lens[i] / B) = dst;
    --s.ref_counts[blk[i]];
    s.ref_counts[dst] = 1;
    pairs[k] = blk[i];
    pairs[m + k] = dst;
    ++k;
  }
  *s.num_free = nf - n;
  return n;
}

}  // namespace pfengine
