// Fused temperature sampling (tensor level: it runs ATen's own softmax kernel on each row).
#pragma once

#include <ATen/core/Tensor.h>

namespace pfengine {

// Tokens [n] from logits [n, V] fp32: softmax(logits / temperature) per row, then the first index
// whose fp64 running sum of probabilities exceeds u[i] * total (clamped to V - 1) -- bit for bit
// pfengine.sampling's softmax + probs.double().cumsum(-1) + searchsorted(right=True), without the
// [n, V] temporaries.
at::Tensor temperature_sample(const at::Tensor& logits, double temperature, const at::Tensor& u);

}  // namespace pfengine
