// pfengine._cpp: tensor-level entry points (checks, dtype conversions, outputs) over kernels.h.
// Signatures follow the torch references in pfengine/kernels/; the GIL is released while they run.
#include <torch/extension.h>

#include <algorithm>
#include <array>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "kernels.h"
#include "sampling.h"

namespace pfengine {
namespace {

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
}

void check_cpu(std::initializer_list<std::pair<const at::Tensor*, const char*>> tensors) {
  for (const auto& [t, name] : tensors) check_cpu(*t, name);
}

constexpr std::array<std::pair<Isa, const char*>, 3> kIsaNames{
    {{Isa::avx512, "avx512"}, {Isa::avx2, "avx2"}, {Isa::portable, "portable"}}};

// The instruction sets this CPU runs, best first.
std::vector<std::string> cpu_isas() {
  std::vector<std::string> out;
  for (const auto& [isa, name] : kIsaNames)
    if (cpu_supports(isa)) out.emplace_back(name);
  return out;
}

// An instruction set by name, checked against this CPU.
Isa parse_isa(const std::string& name, const char* op) {
  const auto it = std::find_if(kIsaNames.begin(), kIsaNames.end(), [&](const auto& e) { return name == e.second; });
  TORCH_CHECK(it != kIsaNames.end(), op, ": isa must be 'avx512', 'avx2' or 'portable', got '", name, "'");
  TORCH_CHECK(cpu_supports(it->first), op, ": this CPU cannot run the ", name, " code (it runs ",
              c10::Join(", ", cpu_isas()), ")");
  return it->first;
}

KvType kv_type(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return KvType::f32;
    case at::kBFloat16: return KvType::bf16;
    case at::kHalf: return KvType::f16;
    default: TORCH_CHECK(false, "paged attention: unsupported KV cache dtype ", t);
  }
}

at::Tensor paged_decode_attention_op(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                     const at::Tensor& block_tables, const at::Tensor& context_lens,
                                     double scale, const std::string& isa) {
  const Isa code = parse_isa(isa, "paged attention");
  check_cpu({{&q, "q"}, {&k_cache, "k_cache"}, {&v_cache, "v_cache"},
            {&block_tables, "block_tables"}, {&context_lens, "context_lens"}});
  TORCH_CHECK(q.dim() == 3, "paged attention: q must be [N, Hq, D]");
  TORCH_CHECK(k_cache.dim() == 4, "paged attention: caches must be [num_blocks, B, Hkv, D]");
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes() && v_cache.scalar_type() == k_cache.scalar_type(),
              "paged attention: k_cache and v_cache differ in shape or dtype");
  const int64_t n = q.size(0), hq = q.size(1), d = q.size(2);
  const int64_t num_blocks = k_cache.size(0), bs = k_cache.size(1), hkv = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == d, "paged attention: head dim of q (", d, ") and cache (", k_cache.size(3),
              ") differ");
  TORCH_CHECK(hkv > 0 && hq % hkv == 0, "paged attention: query heads must be a multiple of kv heads");
  TORCH_CHECK(at::isFloatingType(q.scalar_type()), "paged attention: q must be floating point");
  if (n == 0) return at::empty({0, hq, d}, q.options());
  TORCH_CHECK(k_cache.stride(3) == 1 && v_cache.stride(3) == 1, "paged attention: cache rows must be contiguous");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == n, "paged attention: block_tables must be [N, W]");
  TORCH_CHECK(context_lens.numel() == n, "paged attention: context_lens must have N entries");
  const KvType kt = kv_type(k_cache.scalar_type());

  const at::Tensor qf = q.to(at::kFloat).contiguous();
  const at::Tensor tables = block_tables.scalar_type() == at::kInt ? block_tables : block_tables.to(at::kInt);
  const at::Tensor lens = context_lens.to(at::kLong).contiguous();
  const int64_t width = tables.size(1);
  const int32_t* tp = tables.data_ptr<int32_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(lp[i] >= 0 && lp[i] <= width * bs, "paged attention: context length ", lp[i], " of particle ", i,
                " outside [0, ", width * bs, "]");
    for (int64_t j = 0; j < (lp[i] + bs - 1) / bs; ++j) {
      const int32_t b = tp[i * tables.stride(0) + j * tables.stride(1)];
      TORCH_CHECK(b >= 0 && b < num_blocks, "paged attention: particle ", i, " reads block ", b,
                  " (table entry ", j, ") outside [0, ", num_blocks, ")");
    }
  }

  at::Tensor out = at::empty({n, hq, d}, q.options().dtype(at::kFloat));
  AttentionArgs a{};
  a.q = qf.data_ptr<float>();
  a.k_cache = k_cache.data_ptr();
  a.v_cache = v_cache.data_ptr();
  a.kv_type = kt;
  for (int i = 0; i < 3; ++i) {
    a.k_stride[i] = k_cache.stride(i);
    a.v_stride[i] = v_cache.stride(i);
  }
  a.tables = tp;
  a.table_stride[0] = tables.stride(0);
  a.table_stride[1] = tables.stride(1);
  a.context_lens = lp;
  a.out = out.data_ptr<float>();
  a.n = n;
  a.hq = hq;
  a.hkv = hkv;
  a.d = d;
  a.block_size = bs;
  a.scale = static_cast<float>(scale);
  a.isa = code;
  paged_decode_attention(a);
  return q.scalar_type() == at::kFloat ? out : out.to(q.scalar_type());
}

void store_kv_op(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache, const at::Tensor& v_cache,
                 const at::Tensor& slots) {
  check_cpu({{&k, "k"}, {&v, "v"}, {&k_cache, "k_cache"}, {&v_cache, "v_cache"},
            {&slots, "slots"}});
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes(), "store_kv: k and v must be [T, Hkv, D] alike");
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "store_kv: caches must be [NB, B, Hkv, D]");
  TORCH_CHECK(k.size(1) == k_cache.size(2) && k.size(2) == k_cache.size(3), "store_kv: k rows ", k.sizes(),
              " do not fit the cache ", k_cache.sizes());
  const int64_t t = k.size(0);
  TORCH_CHECK(slots.numel() == t, "store_kv: one slot per token");
  if (t == 0) return;
  TORCH_CHECK(k_cache.stride(3) == 1 && v_cache.stride(3) == 1, "store_kv: cache rows must be contiguous");
  auto prepare = [](const at::Tensor& x, const at::Tensor& cache) {
    at::Tensor y = x.to(cache.scalar_type());  // the reference's conversion (round to nearest even)
    return y.stride(2) == 1 ? y : y.contiguous();
  };
  const at::Tensor kk = prepare(k, k_cache), vv = prepare(v, v_cache);
  const at::Tensor sl = slots.to(at::kLong).contiguous();
  const int64_t capacity = k_cache.size(0) * k_cache.size(1);
  const int64_t* sp = sl.data_ptr<int64_t>();
  for (int64_t i = 0; i < t; ++i)
    TORCH_CHECK(sp[i] < capacity, "store_kv: slot ", sp[i], " outside the cache (", capacity, " slots)");
  auto args = [](const at::Tensor& src, const at::Tensor& cache) {
    const int64_t es = cache.element_size();
    StoreArgs a{};
    a.src = static_cast<const char*>(src.data_ptr());
    a.src_stride[0] = src.stride(0) * es;
    a.src_stride[1] = src.stride(1) * es;
    a.dst = static_cast<char*>(cache.data_ptr());
    for (int i = 0; i < 3; ++i) a.dst_stride[i] = cache.stride(i) * es;
    return a;
  };
  store_kv(args(kk, k_cache), args(vv, v_cache), sp, t, k.size(1), k.size(2) * k_cache.element_size(),
           k_cache.size(1));
}

void copy_blocks_op(const at::Tensor& kv_cache, const at::Tensor& pairs) {
  check_cpu(kv_cache, "kv_cache");
  check_cpu(pairs, "pairs");
  TORCH_CHECK(kv_cache.dim() == 6, "copy_blocks: kv_cache must be [2, layers, num_blocks, B, Hkv, D]");
  TORCH_CHECK(kv_cache.is_contiguous(), "copy_blocks: kv_cache must be contiguous");
  TORCH_CHECK(pairs.dim() == 2 && pairs.size(0) == 2, "copy_blocks: pairs must be [2, P]");
  const int64_t p = pairs.size(1);
  if (p == 0) return;
  const at::Tensor pr = pairs.to(at::kLong).contiguous();
  const int64_t* src = pr.data_ptr<int64_t>();
  const int64_t* dst = src + p;
  const int64_t nb = kv_cache.size(2);
  for (int64_t j = 0; j < p; ++j)
    TORCH_CHECK(src[j] < nb && dst[j] < nb, "copy_blocks: pair (", src[j], ", ", dst[j], ") outside [0, ", nb, ")");
  const int64_t block_bytes = kv_cache.stride(2) * kv_cache.element_size();
  copy_blocks(static_cast<char*>(kv_cache.data_ptr()), kv_cache.size(0) * kv_cache.size(1), nb, block_bytes, src,
              dst, p);
}

at::Tensor resample_op(const at::Tensor& weights, const at::Tensor& seg_starts, const at::Tensor& uniforms,
                       int64_t method, const std::optional<at::Tensor>& active) {
  check_cpu(weights, "weights");
  check_cpu(seg_starts, "seg_starts");
  check_cpu(uniforms, "uniforms");
  TORCH_CHECK(method >= 0 && method <= 2, "resample: method must be 0, 1 or 2");
  const int64_t m = weights.numel();
  TORCH_CHECK(seg_starts.numel() >= 1, "resample: seg_starts needs at least one entry");
  const int64_t r = seg_starts.numel() - 1;
  const at::Tensor w = weights.to(at::kDouble).contiguous();
  const at::Tensor u = uniforms.to(at::kDouble).contiguous();
  const at::Tensor seg = seg_starts.to(at::kLong).contiguous();
  const int64_t* sp = seg.data_ptr<int64_t>();
  for (int64_t i = 0; i < r; ++i)
    TORCH_CHECK(0 <= sp[i] && sp[i] <= sp[i + 1] && sp[i + 1] <= m, "resample: bad segment [", sp[i], ", ",
                sp[i + 1], ") of ", m, " particles");
  TORCH_CHECK(u.numel() >= (r > 0 ? sp[r] : 0), "resample: one uniform per particle");
  at::Tensor act;
  if (active.has_value()) {
    check_cpu(*active, "active");
    act = active->to(at::kBool).contiguous();
    TORCH_CHECK(act.numel() == r, "resample: one active flag per segment");
  }
  at::Tensor out = at::arange(m, weights.options().dtype(at::kLong));
  if (r > 0)
    resample(w.data_ptr<double>(), sp, r, u.data_ptr<double>(), static_cast<int>(method),
             act.defined() ? act.data_ptr<bool>() : nullptr, out.data_ptr<int64_t>());
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fork_op(const at::Tensor& tables, const at::Tensor& lens,
                                                       const at::Tensor& ref_counts, const at::Tensor& free_stack,
                                                       const at::Tensor& num_free, const at::Tensor& rows,
                                                       const at::Tensor& ancestors, const at::Tensor& writes,
                                                       int64_t block_size) {
  check_cpu({{&tables, "tables"}, {&lens, "lens"}, {&ref_counts, "ref_counts"},
            {&free_stack, "free_stack"}, {&num_free, "num_free"}, {&rows, "rows"},
            {&ancestors, "ancestors"}, {&writes, "writes"}});
  TORCH_CHECK(tables.dim() == 2 && tables.scalar_type() == at::kInt, "fork: tables must be [R, W] int32");
  TORCH_CHECK(lens.dim() == 1 && lens.scalar_type() == at::kLong && lens.size(0) == tables.size(0),
              "fork: lens must be [R] int64");
  TORCH_CHECK(ref_counts.scalar_type() == at::kInt && ref_counts.is_contiguous(),
              "fork: ref_counts must be contiguous int32");
  TORCH_CHECK(free_stack.scalar_type() == at::kInt && free_stack.is_contiguous() &&
                  free_stack.numel() == ref_counts.numel(),
              "fork: free_stack must be contiguous int32 with one entry per block");
  TORCH_CHECK(num_free.scalar_type() == at::kLong && num_free.numel() == 1, "fork: num_free must be [1] int64");
  TORCH_CHECK(block_size > 0, "fork: block_size must be positive");
  const int64_t m = rows.numel();
  TORCH_CHECK(ancestors.numel() == m && writes.numel() == m, "fork: rows, ancestors and writes differ in length");
  auto long_opts = tables.options().dtype(at::kLong);
  at::Tensor pairs = at::full({2, m}, -1, long_opts);
  at::Tensor num_cow = at::zeros({1}, long_opts);
  at::Tensor missing = at::zeros({1}, long_opts);
  if (m == 0) return {pairs, num_cow, missing};
  const at::Tensor rw = rows.to(at::kLong).contiguous();
  const at::Tensor an = ancestors.to(at::kLong).contiguous();
  const at::Tensor wr = writes.to(at::kBool).contiguous();
  const int64_t* rp = rw.data_ptr<int64_t>();
  const int64_t* ap = an.data_ptr<int64_t>();
  for (int64_t i = 0; i < m; ++i) {
    TORCH_CHECK(0 <= rp[i] && rp[i] < tables.size(0), "fork: row ", rp[i], " out of range");
    TORCH_CHECK(0 <= ap[i] && ap[i] < m, "fork: ancestor ", ap[i], " out of range [0, ", m, ")");
  }
  // num_free may be a non-contiguous view: work on a copy and write it back.
  at::Tensor nf = num_free.reshape({1}).contiguous();
  ForkState s{};
  s.tables = tables.data_ptr<int32_t>();
  s.table_stride[0] = tables.stride(0);
  s.table_stride[1] = tables.stride(1);
  s.num_rows = tables.size(0);
  s.width = tables.size(1);
  s.lens = lens.data_ptr<int64_t>();
  s.lens_stride = lens.stride(0);
  s.ref_counts = ref_counts.data_ptr<int32_t>();
  s.num_blocks = ref_counts.numel();
  s.free_stack = free_stack.data_ptr<int32_t>();
  s.num_free = nf.data_ptr<int64_t>();
  int64_t miss = 0;
  const int64_t n = fork(s, rp, ap, wr.data_ptr<bool>(), m, block_size, pairs.data_ptr<int64_t>(), &miss);
  if (!nf.is_same(num_free)) num_free.copy_(nf.view(num_free.sizes()));
  num_cow.fill_(n);
  missing.fill_(miss);
  return {pairs, num_cow, missing};
}

at::Tensor pack_linear_op(const at::Tensor& weight, const std::string& isa) {
  const int64_t panel = linear_panel_width(parse_isa(isa, "pack_linear"));
  check_cpu(weight, "weight");
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kFloat,
              "pack_linear: weight must be a 2-D float32 tensor [out_features, in_features], got ",
              weight.scalar_type(), " of shape ", weight.sizes());
  const at::Tensor w = weight.contiguous();
  const int64_t n = w.size(0), k = w.size(1);
  at::Tensor packed = at::empty({(n + panel - 1) / panel, k, panel}, w.options());
  pack_linear_weight(w.data_ptr<float>(), n, k, panel, packed.data_ptr<float>());
  return packed;
}

at::Tensor packed_linear_op(const at::Tensor& x, const at::Tensor& packed, int64_t out_features,
                            const c10::optional<at::Tensor>& bias, const std::string& isa) {
  const Isa code = parse_isa(isa, "packed_linear");
  const int64_t panel = linear_panel_width(code);
  check_cpu({{&x, "x"}, {&packed, "packed"}});
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "packed_linear: x must be a 2-D float32 tensor");
  TORCH_CHECK(packed.dim() == 3 && packed.is_contiguous() && packed.scalar_type() == at::kFloat,
              "packed_linear: packed must come from pack_linear");
  TORCH_CHECK(packed.size(2) == panel, "packed_linear: packed has panels of ", packed.size(2), " columns, the ", isa,
              " kernel reads ", panel, ": pack the weight with pack_linear(weight, '", isa, "')");
  const int64_t m = x.size(0), k = x.size(1);
  TORCH_CHECK(packed.size(1) == k, "packed_linear: x has ", k, " features, the weight ", packed.size(1));
  TORCH_CHECK(out_features > 0 && (out_features + panel - 1) / panel == packed.size(0),
              "packed_linear: out_features ", out_features, " does not match the packed weight");
  const at::Tensor xc = x.stride(1) == 1 ? x : x.contiguous();
  at::Tensor b;
  if (bias.has_value()) {
    check_cpu(*bias, "bias");
    TORCH_CHECK(bias->numel() == out_features && bias->scalar_type() == at::kFloat,
                "packed_linear: bias must be float32 with out_features entries");
    b = bias->contiguous();
  }
  at::Tensor y = at::empty({m, out_features}, x.options());
  if (m == 0) return y;
  packed_linear({xc.data_ptr<float>(), xc.stride(0), packed.data_ptr<float>(), b.defined() ? b.data_ptr<float>() : nullptr,
                 y.data_ptr<float>(), m, out_features, k}, code);
  return y;
}

}  // namespace
}  // namespace pfengine

PYBIND11_MODULE(_cpp, m) {
  namespace py = pybind11;
  m.doc() = "pfengine C++ CPU kernels (csrc/): paged decode attention, KV store, COW block copy, resampling, fork, "
            "temperature sampling, row-invariant linear";
  auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("paged_decode_attention", &pfengine::paged_decode_attention_op, nogil, py::arg("q"), py::arg("k_cache"),
        py::arg("v_cache"), py::arg("block_tables"), py::arg("context_lens"), py::arg("scale"), py::arg("isa"));
  m.def("store_kv", &pfengine::store_kv_op, nogil, py::arg("k"), py::arg("v"), py::arg("k_cache"),
        py::arg("v_cache"), py::arg("slots"));
  m.def("copy_blocks", &pfengine::copy_blocks_op, nogil, py::arg("kv_cache"), py::arg("pairs"));
  m.def("resample", &pfengine::resample_op, nogil, py::arg("weights"), py::arg("seg_starts"), py::arg("uniforms"),
        py::arg("method"), py::arg("active") = py::none());
  m.def("fork", &pfengine::fork_op, nogil, py::arg("tables"), py::arg("lens"), py::arg("ref_counts"),
        py::arg("free_stack"), py::arg("num_free"), py::arg("rows"), py::arg("ancestors"), py::arg("writes"),
        py::arg("block_size"));
  m.def("temperature_sample", &pfengine::temperature_sample, nogil, py::arg("logits"), py::arg("temperature"),
        py::arg("u"));
  m.def("pack_linear", &pfengine::pack_linear_op, nogil, py::arg("weight"), py::arg("isa"));
  m.def("packed_linear", &pfengine::packed_linear_op, nogil, py::arg("x"), py::arg("packed"), py::arg("out_features"),
        py::arg("bias"), py::arg("isa"));
  m.def("cpu_isas", &pfengine::cpu_isas,
        "Instruction sets whose kernels this CPU runs, best first: 'avx512' (AVX-512F), 'avx2' (AVX2 + FMA + F16C), "
        "'portable'.");
}
