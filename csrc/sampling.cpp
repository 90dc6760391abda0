// Temperature sampling by inverse CDF, fused per row. The reference (pfengine/kernels/sampling.py)
// materialises four [n, V] tensors (scaled logits, probabilities, their fp64 copy, its cumsum): at
// n = 64, V = 16384 that is 20 MB of fresh allocations per decode step, and page-faulting them in
// costs more than the arithmetic. Here rows are scaled into a small per-thread buffer, go through
// ATen's softmax kernel a chunk at a time (the very code the reference runs, so the probabilities
// are identical), and each is scanned once: the fp64 running sum in index order reproduces the
// reference's cumsum exactly, and the search is over those same sums.
#include "sampling.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace pfengine {

at::Tensor temperature_sample(const at::Tensor& logits, double temperature, const at::Tensor& u) {
  TORCH_CHECK(logits.device().is_cpu() && u.device().is_cpu(), "temperature_sample: CPU tensors only");
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat, "temperature_sample: logits must be [n, V] fp32");
  TORCH_CHECK(temperature > 0, "temperature_sample: temperature must be positive");
  const int64_t n = logits.size(0), vocab = logits.size(1);
  TORCH_CHECK(u.numel() == n, "temperature_sample: one uniform per row");
  TORCH_CHECK(vocab > 0, "temperature_sample: empty vocabulary");
  at::Tensor out = at::empty({n}, logits.options().dtype(at::kLong));
  if (n == 0) return out;
  const at::Tensor lg = logits.stride(1) == 1 ? logits : logits.contiguous();
  const at::Tensor uu = u.to(at::kDouble).contiguous();
  const float t = static_cast<float>(temperature);  // torch divides fp32 by the scalar cast to fp32
  const float* src = lg.data_ptr<float>();
  const int64_t row_stride = lg.stride(0);
  const double* up = uu.data_ptr<double>();
  int64_t* op = out.data_ptr<int64_t>();
  // Rows go through the softmax a chunk at a time (one ATen call per chunk, each row computed as it
  // would be alone), the buffers bounded at 256K floats per thread.
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(64, (int64_t{1} << 18) / vocab));
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    at::Tensor scaled = at::empty({chunk, vocab}, lg.options());
    at::Tensor probs = at::empty({chunk, vocab}, lg.options());
    std::vector<double> cdf(static_cast<size_t>(vocab));
    for (int64_t c0 = begin; c0 < end; c0 += chunk) {
      const int64_t rows = std::min(chunk, end - c0);
      at::Tensor s_rows = scaled.narrow(0, 0, rows), p_rows = probs.narrow(0, 0, rows);
      float* s = s_rows.data_ptr<float>();
      for (int64_t r = 0; r < rows; ++r) {
        const float* row = src + (c0 + r) * row_stride;
        for (int64_t j = 0; j < vocab; ++j) s[r * vocab + j] = row[j] / t;
      }
      at::_softmax_out(p_rows, s_rows, -1, false);
      const float* p = p_rows.data_ptr<float>();
      for (int64_t r = 0; r < rows; ++r) {
        double run = 0.0;
        for (int64_t j = 0; j < vocab; ++j) cdf[j] = run += static_cast<double>(p[r * vocab + j]);
        const double threshold = up[c0 + r] * cdf[vocab - 1];
        const int64_t k = std::upper_bound(cdf.begin(), cdf.end(), threshold) - cdf.begin();
        op[c0 + r] = std::min(k, vocab - 1);
      }
    }
  });
  return out;
}

}  // namespace pfengine
