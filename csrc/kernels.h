// Raw-pointer CPU kernels behind pfengine._cpp (bindings.cpp validates tensors and calls these).
//
// The code is written in C++17; it is compiled with the standard torch.utils.cpp_extension picks
// (C++20 for torch 2.13), because the binding unit includes torch's headers.
#pragma once

#include <cstdint>

namespace pfengine {

enum class KvType : int { f32 = 0, bf16 = 1, f16 = 2 };

// The instruction sets the kernels have code for, in increasing order (csrc/cpu_isa.cpp). avx2 means
// AVX2 + FMA + F16C; avx512 means AVX-512F on top of that. Which one runs is the caller's choice
// (pfengine.kernels.cpu_isa: the best this CPU has, or PFENGINE_CPU_ISA), passed with every call.
enum class Isa : int { portable = 0, avx2 = 1, avx512 = 2 };

// Whether this CPU can run the code for `isa` (portable: always).
bool cpu_supports(Isa isa);

struct AttentionArgs {
  const float* q;               // [n, hq, d] fp32, contiguous
  const void* k_cache;          // [num_blocks, B, hkv, d], stride(3) == 1
  const void* v_cache;
  KvType kv_type;
  int64_t k_stride[3];          // block, token, head strides of k_cache (elements)
  int64_t v_stride[3];
  const int32_t* tables;        // [n, width]
  int64_t table_stride[2];
  const int64_t* context_lens;  // [n] contiguous, validated against the tables
  float* out;                   // [n, hq, d] fp32, contiguous
  int64_t n, hq, hkv, d, block_size;
  float scale;
  Isa isa;                      // avx2 / avx512: the AVX2 + FMA + F16C code where d % 8 == 0
};

// Online-softmax paged decode attention, one task per (particle, kv head), run with at::parallel_for.
void paged_decode_attention(const AttentionArgs& a);

// KV store: row t of k/v (hkv rows of row_bytes each) goes to slot slots[t] (-1 skips).
struct StoreArgs {
  const char* src;
  int64_t src_stride[2];        // token, head strides (bytes)
  char* dst;
  int64_t dst_stride[3];        // block, token, head strides (bytes)
};
void store_kv(const StoreArgs& k, const StoreArgs& v, const int64_t* slots, int64_t t, int64_t hkv,
              int64_t row_bytes, int64_t block_size);

// COW copy: for every plane (K/V x layer) copy block src -> dst for each pair with both >= 0.
void copy_blocks(char* cache, int64_t planes, int64_t num_blocks, int64_t block_bytes, const int64_t* src,
                 const int64_t* dst, int64_t p);

// Resampling (method 0 systematic, 1 stratified, 2 multinomial); out [m] global ancestor indices.
void resample(const double* weights, const int64_t* seg_starts, int64_t num_segments, const double* uniforms,
              int method, const bool* active, int64_t* out);

struct ForkState {
  int32_t* tables;              // [rows, width]
  int64_t table_stride[2];
  int64_t num_rows, width;
  int64_t* lens;                // [rows]
  int64_t lens_stride;
  int32_t* ref_counts;          // [num_blocks] contiguous
  int64_t num_blocks;
  int32_t* free_stack;          // [num_blocks] contiguous
  int64_t* num_free;            // [1]
};

// The fork of pfengine.kernels.fork.fork_ref. pairs [2, m] is pre-filled with -1 (row stride m).
// Returns the copies done; *missing gets the blocks the copies lacked (nothing copied then).
int64_t fork(const ForkState& s, const int64_t* rows, const int64_t* ancestors, const bool* writes, int64_t m,
             int64_t block_size, int64_t* pairs, int64_t* missing);

// Row-invariant linear layer (csrc/linear.cpp): y[m, n] = x[m, :] . w[n, :] (+ bias[n]), fp32, with w
// packed by pack_linear_weight into [ceil(n / panel), k, panel], panel = linear_panel_width(isa).
struct LinearArgs {
  const float* x;               // [m, k], row stride ldx, unit column stride
  int64_t ldx;
  const float* packed;
  const float* bias;            // [n] or nullptr
  float* y;                     // [m, n] contiguous
  int64_t m, n, k;
};
int64_t linear_panel_width(Isa isa);
void pack_linear_weight(const float* w, int64_t n, int64_t k, int64_t panel, float* packed);
void packed_linear(const LinearArgs& a, Isa isa);

}  // namespace pfengine
