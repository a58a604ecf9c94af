// C++ CPU kernels: argument checks, the run-time choice of instruction set, and at::parallel_for over
// independent work items (rows, tokens, or (sequence, kv head) pairs). The inner loops live in
// cpu_kernels_impl.inc, compiled below once per instruction set.
#include "cpu_kernels.h"

#include <ATen/Parallel.h>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// 64-byte vector types only ever cross always-inline helpers inside one ISA section: no ABI is involved.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace nreft {
namespace cpu_impl {

struct AttnArgs {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  const int32_t* tables;
  const int32_t* ctx;
  int64_t q_sb, q_sh, k_sb, k_st, k_sh, v_sb, v_st, v_sh, t_sb, o_sb, o_sh;  // strides, in elements
  int64_t kv_heads, group, dim, block_size, max_ctx;
  float scale;
  bool bf16;
};

struct RmsArgs {
  const void* x;
  void* res;  // nullptr: no residual
  const void* w;
  void* y;
  int64_t x_rs, res_rs, y_rs, dim;  // row strides, in elements
  float eps;
  bool bf16, w_bf16;
};

struct SiluArgs {
  const void* gate;
  const void* up;
  void* out;
  int64_t g_rs, u_rs, o_rs, cols;
  bool bf16;
};

struct RopeArgs {
  const void *q, *k, *v;
  const int64_t *pos, *slots;
  const float *cos, *sin;
  void *q_out, *k_out, *k_cache, *v_cache;
  int64_t q_st, q_sh, k_st, k_sh, v_st, v_sh, cos_rs, sin_rs;  // strides, in elements
  int64_t heads, kv_heads, dim;
  bool bf16;
};

struct SampleArgs {
  const void* logits;
  const float *temperature, *top_p, *min_p, *uniform;
  const int64_t* top_k;
  int64_t* tokens;  // -1: the row has no finite maximum
  float* logprobs;
  int64_t row_stride, vocab;
  int lanes;  // of the reference's fp32 softmax sums
  bool bf16;
};

struct LinearArgs {
  const float* x;     // [rows, in_features], contiguous
  const float* bias;  // [out_features] or nullptr
  const void* w;      // [ceil(out_features / 16), in_features, 16]
  void* y;
  int64_t rows, in_features, out_features;  // y is [rows, out_features], contiguous
  bool bf16;
};

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define NREFT_X86_MULTI 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2")
namespace avx512 {
constexpr int kCmpLanes = 16;  // the widest comparison the instruction set has, in fp32 lanes
#include "cpu_kernels_impl.inc"
}  // namespace avx512
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi,bmi2")
namespace avx2 {
constexpr int kCmpLanes = 8;
#include "cpu_kernels_impl.inc"
}  // namespace avx2
#pragma GCC pop_options
#endif
namespace base {
constexpr int kCmpLanes = 4;
#include "cpu_kernels_impl.inc"
}  // namespace base

struct Impl {
  const char* name;
  void (*attn)(const AttnArgs&, int64_t, int64_t, float*);
  void (*rms)(const RmsArgs&, int64_t, int64_t);
  void (*silu)(const SiluArgs&, int64_t, int64_t);
  void (*rope)(const RopeArgs&, int64_t, int64_t);
  void (*sample)(const SampleArgs&, int64_t, int64_t, float*);
  void (*linear)(const LinearArgs&, int64_t, int64_t);
};

#define NREFT_IMPL(isa)                                                                                    \
  Impl {                                                                                                   \
    #isa, &isa::paged_attention_range, &isa::rms_norm_range, &isa::silu_and_mul_range,                     \
        &isa::rope_write_kv_range, &isa::sample_range, &isa::linear_rows16_range                              \
  }
const Impl kBase = NREFT_IMPL(base);
#ifdef NREFT_X86_MULTI
const Impl kAvx2 = NREFT_IMPL(avx2);
const Impl kAvx512 = NREFT_IMPL(avx512);
#endif
#undef NREFT_IMPL

bool supported(const std::string& isa) {
  if (isa == "base") return true;
#ifdef NREFT_X86_MULTI
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (isa == "avx2") return avx2;
  if (isa == "avx512")
    return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#endif
  return false;
}

const Impl* by_name(const std::string& isa) {
#ifdef NREFT_X86_MULTI
  if (isa == "avx512") return &kAvx512;
  if (isa == "avx2") return &kAvx2;
#endif
  return &kBase;
}

const Impl* best() {
  for (const char* isa : {"avx512", "avx2"})
    if (supported(isa)) return by_name(isa);
  return &kBase;
}

const Impl* initial() {
  const char* env = std::getenv("NREFT_CPU_ISA");
  if (env && *env && supported(env)) return by_name(env);
  return best();
}

const Impl* g_impl = initial();

// [rows, cols] view of t with unit column stride: false when the leading dims do not share one row stride.
bool row_view(const at::Tensor& t, int64_t* rows, int64_t* row_stride) {
  const int64_t nd = t.dim(), cols = nd ? t.size(-1) : 1;
  if (nd && cols > 1 && t.stride(-1) != 1) return false;
  int64_t r = 1, rs = cols, expected = -1;
  for (int64_t d = nd - 2; d >= 0; --d) {
    r *= t.size(d);
    if (t.size(d) == 1) continue;
    if (expected < 0) {
      rs = t.stride(d);
      expected = rs * t.size(d);
    } else {
      if (t.stride(d) != expected) return false;
      expected *= t.size(d);
    }
  }
  *rows = r;
  *row_stride = rs;
  return true;
}

bool is_f32_or_bf16(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16;
}

// at::parallel_for's grain for items of `per_item` elements of work each: about 16K elements per task (at least
// one item, also for empty items)
int64_t grain_for(int64_t per_item) { return per_item >= 16384 ? 1 : 16384 / std::max<int64_t>(per_item, 1); }

// t itself when its last dim is contiguous, else a contiguous copy
at::Tensor unit_last_stride(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// A contiguous [n] tensor of `dtype`: TypeError / ValueError naming `name` otherwise.
at::Tensor checked_vector(const at::Tensor& t, int64_t n, at::ScalarType dtype, const char* name, const char* what) {
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, what, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.is_cpu() && t.dim() == 1 && t.size(0) == n, what, ": ", name, " must be a CPU tensor [", n,
                    "], got ", t.sizes());
  return t.contiguous();
}

at::Tensor checked_out(const std::optional<at::Tensor>& out, at::IntArrayRef shape, at::ScalarType dtype,
                       const at::Device& device, const char* what) {
  if (!out.has_value()) return at::empty(shape, at::TensorOptions().dtype(dtype).device(device));
  const at::Tensor& o = *out;
  TORCH_CHECK_VALUE(o.sizes() == shape, what, ": out must have shape ", shape, ", got ", o.sizes());
  TORCH_CHECK_TYPE(o.scalar_type() == dtype, what, ": out must be ", dtype, ", got ", o.scalar_type());
  TORCH_CHECK_VALUE(o.device() == device && o.is_contiguous(), what, ": out must be contiguous on ", device);
  return o;
}

// An uninitialised tensor on memory of its own, advised into 2 MiB pages on Linux: a weight streamed once
// per token then costs a TLB miss per 2 MiB instead of per 4 KiB (about 10% of a memory-bound matmul).
at::Tensor empty_huge_pages(at::IntArrayRef shape, at::ScalarType dtype) {
  const auto options = at::TensorOptions().dtype(dtype);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr size_t kHuge = size_t{2} << 20, kPage = 4096;
  int64_t numel = 1;
  for (const int64_t d : shape) numel *= d;
  const size_t bytes = (static_cast<size_t>(numel) * at::elementSize(dtype) + kPage - 1) / kPage * kPage;
  if (bytes >= kHuge) {
    void* raw = mmap(nullptr, bytes + kHuge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw != MAP_FAILED) {
      const uintptr_t base = reinterpret_cast<uintptr_t>(raw), start = (base + kHuge - 1) / kHuge * kHuge;
      if (start > base) munmap(raw, start - base);
      if (base + kHuge > start) munmap(reinterpret_cast<void*>(start + bytes), base + kHuge - start);
      void* data = reinterpret_cast<void*>(start);
      madvise(data, bytes, MADV_HUGEPAGE);  // advice only: without THP the pages stay 4 KiB
      return at::from_blob(data, shape, [bytes](void* p) { munmap(p, bytes); }, options);
    }
  }
#endif
  return at::empty(shape, options);
}

}  // namespace cpu_impl

using namespace cpu_impl;

std::string cpu_isa() { return g_impl->name; }

void set_cpu_isa(const std::string& isa) {
  if (isa.empty()) {
    g_impl = best();
    return;
  }
  TORCH_CHECK_VALUE(isa == "avx512" || isa == "avx2" || isa == "base", "set_cpu_isa: unknown isa '", isa,
                    "' (avx512, avx2, base)");
  TORCH_CHECK_VALUE(supported(isa), "set_cpu_isa: this CPU does not support ", isa);
  g_impl = by_name(isa);
}

at::Tensor paged_decode_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                      const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                                      const std::optional<at::Tensor>& out) {
  const char* what = "paged_decode_attention_cpu";
  TORCH_CHECK_VALUE(q.is_cpu() && k_cache.is_cpu() && v_cache.is_cpu() && block_tables.is_cpu() &&
                        context_lens.is_cpu(),
                    what, ": all tensors must be on the CPU");
  TORCH_CHECK_VALUE(q.dim() == 3, what, ": q must be [B, H, D], got ", q.sizes());
  TORCH_CHECK_VALUE(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(), what,
                    ": caches must both be [num_blocks, block_size, KVH, D], got ", k_cache.sizes(), " and ",
                    v_cache.sizes());
  TORCH_CHECK_TYPE(is_f32_or_bf16(q) && k_cache.scalar_type() == q.scalar_type() &&
                       v_cache.scalar_type() == q.scalar_type(),
                   what, ": q and caches must share one dtype, float32 or bfloat16");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t NB = k_cache.size(0), bs = k_cache.size(1), KVH = k_cache.size(2);
  TORCH_CHECK_VALUE(k_cache.size(3) == D, what, ": head_dim of q (", D, ") != cache (", k_cache.size(3), ")");
  TORCH_CHECK_VALUE(KVH > 0 && H % KVH == 0, what, ": heads ", H, " not a multiple of kv heads ", KVH);
  TORCH_CHECK_VALUE(D % 16 == 0 && D > 0, what, ": head_dim must be a multiple of 16, got ", D);
  TORCH_CHECK_VALUE(q.stride(2) == 1 && k_cache.stride(3) == 1 && v_cache.stride(3) == 1, what,
                    ": the last dim of q and the caches must be contiguous");
  TORCH_CHECK_TYPE(block_tables.scalar_type() == at::kInt && context_lens.scalar_type() == at::kInt, what,
                   ": block_tables and context_lens must be int32");
  TORCH_CHECK_VALUE(block_tables.dim() == 2 && block_tables.size(0) == B, what, ": block_tables must be [", B,
                    ", W], got ", block_tables.sizes());
  TORCH_CHECK_VALUE(context_lens.dim() == 1 && context_lens.size(0) == B, what, ": context_lens must be [", B,
                    "], got ", context_lens.sizes());
  at::Tensor o = checked_out(out, q.sizes(), q.scalar_type(), q.device(), what);
  if (B == 0 || H == 0) return o;
  const at::Tensor tables = unit_last_stride(block_tables);
  const at::Tensor ctx = context_lens.contiguous();
  const int32_t* tp = tables.data_ptr<int32_t>();
  const int32_t* cp = ctx.data_ptr<int32_t>();
  const int64_t W = tables.size(1), t_sb = tables.stride(0);
  int64_t max_ctx = 0;
  for (int64_t b = 0; b < B; ++b) {  // validate before any thread reads the cache
    const int64_t c = cp[b];
    TORCH_CHECK_VALUE(c <= W * bs, what, ": context_lens[", b, "] = ", c, " exceeds the block table (", W,
                      " blocks of ", bs, ")");
    for (int64_t i = 0; i * bs < c; ++i)
      TORCH_CHECK_VALUE(tp[b * t_sb + i] >= 0 && tp[b * t_sb + i] < NB, what, ": block_tables[", b, ", ", i,
                        "] = ", tp[b * t_sb + i], " out of range [0, ", NB, ")");
    max_ctx = c > max_ctx ? c : max_ctx;
  }
  AttnArgs a{};
  a.q = q.data_ptr();
  a.k = k_cache.data_ptr();
  a.v = v_cache.data_ptr();
  a.out = o.data_ptr();
  a.tables = tp;
  a.ctx = cp;
  a.q_sb = q.stride(0);
  a.q_sh = q.stride(1);
  a.k_sb = k_cache.stride(0);
  a.k_st = k_cache.stride(1);
  a.k_sh = k_cache.stride(2);
  a.v_sb = v_cache.stride(0);
  a.v_st = v_cache.stride(1);
  a.v_sh = v_cache.stride(2);
  a.t_sb = t_sb;
  a.o_sb = o.stride(0);
  a.o_sh = o.stride(1);
  a.kv_heads = KVH;
  a.group = H / KVH;
  a.dim = D;
  a.block_size = bs;
  a.max_ctx = max_ctx;
  a.scale = static_cast<float>(scale);
  a.bf16 = q.scalar_type() == at::kBFloat16;
  const int64_t cap = (max_ctx + 15) / 16 * 16;
  const int64_t scratch = 2 * a.group * D + D + a.group + a.group * cap;  // see the kernels' layout
  const Impl* impl = g_impl;
  at::parallel_for(0, B * KVH, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(scratch);
    impl->attn(a, begin, end, buf.data());
  });
  return o;
}

at::Tensor rms_norm_cpu(const at::Tensor& x_in, const at::Tensor& weight_in, double eps,
                        const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& out) {
  const char* what = "rms_norm_cpu";
  TORCH_CHECK_VALUE(x_in.is_cpu() && weight_in.is_cpu(), what, ": tensors must be on the CPU");
  TORCH_CHECK_VALUE(x_in.dim() >= 1, what, ": x must have at least one dim");
  const int64_t D = x_in.size(-1);
  TORCH_CHECK_VALUE(weight_in.dim() == 1 && weight_in.size(0) == D, what, ": weight must be [", D, "], got ",
                    weight_in.sizes());
  TORCH_CHECK_TYPE(is_f32_or_bf16(x_in) && is_f32_or_bf16(weight_in), what,
                   ": x and weight must be float32 or bfloat16");
  const bool has_res = residual.has_value() && residual->defined();
  if (has_res) {
    TORCH_CHECK_VALUE(residual->is_cpu() && residual->sizes() == x_in.sizes(), what,
                      ": residual must be a CPU tensor shaped like x ", x_in.sizes(), ", got ", residual->sizes());
    TORCH_CHECK_TYPE(residual->scalar_type() == x_in.scalar_type(), what, ": residual dtype ",
                     residual->scalar_type(), " != x dtype ", x_in.scalar_type());
  }
  const at::ScalarType out_dtype = at::result_type(weight_in, x_in);
  at::Tensor y = checked_out(out, x_in.sizes(), out_dtype, x_in.device(), what);
  if (x_in.numel() == 0) return y;
  int64_t rows = 0, x_rs = 0, res_rs = 0;
  at::Tensor x = x_in;
  if (!row_view(x, &rows, &x_rs)) {
    x = x_in.contiguous();
    row_view(x, &rows, &x_rs);
  }
  at::Tensor res;
  bool copy_back = false;
  if (has_res) {
    res = *residual;
    int64_t r2 = 0;
    if (!row_view(res, &r2, &res_rs) || (rows > 1 && res_rs < D)) {
      res = residual->contiguous();
      row_view(res, &r2, &res_rs);
      copy_back = true;
    }
  }
  const at::Tensor w = unit_last_stride(weight_in);
  RmsArgs a{};
  a.x = x.data_ptr();
  a.res = has_res ? res.data_ptr() : nullptr;
  a.w = w.data_ptr();
  a.y = y.data_ptr();
  a.x_rs = x_rs;
  a.res_rs = res_rs;
  a.y_rs = D;
  a.dim = D;
  a.eps = static_cast<float>(eps);
  a.bf16 = x.scalar_type() == at::kBFloat16;
  a.w_bf16 = w.scalar_type() == at::kBFloat16;
  const Impl* impl = g_impl;
  at::parallel_for(0, rows, grain_for(D), [&](int64_t begin, int64_t end) { impl->rms(a, begin, end); });
  if (copy_back) residual->copy_(res);
  return y;
}

at::Tensor silu_and_mul_cpu(const at::Tensor& gate_in, const at::Tensor& up_in,
                            const std::optional<at::Tensor>& out) {
  const char* what = "silu_and_mul_cpu";
  TORCH_CHECK_VALUE(gate_in.is_cpu() && up_in.is_cpu(), what, ": tensors must be on the CPU");
  TORCH_CHECK_VALUE(gate_in.sizes() == up_in.sizes() && gate_in.dim() >= 1, what,
                    ": gate and up must have one shape, got ", gate_in.sizes(), " and ", up_in.sizes());
  TORCH_CHECK_TYPE(is_f32_or_bf16(gate_in) && up_in.scalar_type() == gate_in.scalar_type(), what,
                   ": gate and up must share one dtype, float32 or bfloat16");
  at::Tensor o = checked_out(out, gate_in.sizes(), gate_in.scalar_type(), gate_in.device(), what);
  if (gate_in.numel() == 0) return o;
  at::Tensor gate = gate_in, up = up_in;
  int64_t rows = 0, g_rs = 0, u_rs = 0;
  if (!row_view(gate, &rows, &g_rs)) {
    gate = gate_in.contiguous();
    row_view(gate, &rows, &g_rs);
  }
  if (!row_view(up, &rows, &u_rs)) {
    up = up_in.contiguous();
    row_view(up, &rows, &u_rs);
  }
  SiluArgs a{};
  a.gate = gate.data_ptr();
  a.up = up.data_ptr();
  a.out = o.data_ptr();
  a.g_rs = g_rs;
  a.u_rs = u_rs;
  a.cols = gate.size(-1);
  a.o_rs = a.cols;
  a.bf16 = gate.scalar_type() == at::kBFloat16;
  const Impl* impl = g_impl;
  at::parallel_for(0, rows, grain_for(a.cols), [&](int64_t begin, int64_t end) { impl->silu(a, begin, end); });
  return o;
}

std::tuple<at::Tensor, at::Tensor> rope_write_kv_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                     const at::Tensor& v_in, const at::Tensor& positions,
                                                     const at::Tensor& cos_in, const at::Tensor& sin_in,
                                                     const at::Tensor& k_cache, const at::Tensor& v_cache,
                                                     const at::Tensor& slot_mapping,
                                                     const std::optional<at::Tensor>& q_out,
                                                     const std::optional<at::Tensor>& k_out) {
  const char* what = "rope_write_kv_cpu";
  TORCH_CHECK_VALUE(q_in.is_cpu() && k_in.is_cpu() && v_in.is_cpu() && cos_in.is_cpu() && sin_in.is_cpu() &&
                        k_cache.is_cpu() && v_cache.is_cpu(),
                    what, ": all tensors must be on the CPU");
  TORCH_CHECK_VALUE(q_in.dim() == 3 && k_in.dim() == 3 && v_in.sizes() == k_in.sizes() &&
                        k_in.size(0) == q_in.size(0) && k_in.size(2) == q_in.size(2),
                    what, ": q must be [T, H, D] and k, v [T, KVH, D], got ", q_in.sizes(), ", ", k_in.sizes(),
                    ", ", v_in.sizes());
  const int64_t T = q_in.size(0), H = q_in.size(1), KVH = k_in.size(1), D = q_in.size(2);
  TORCH_CHECK_TYPE(is_f32_or_bf16(q_in) && k_in.scalar_type() == q_in.scalar_type() &&
                       v_in.scalar_type() == q_in.scalar_type() && k_cache.scalar_type() == q_in.scalar_type() &&
                       v_cache.scalar_type() == q_in.scalar_type(),
                   what, ": q, k, v and the caches must share one dtype, float32 or bfloat16");
  TORCH_CHECK_VALUE(D > 0 && D % 2 == 0, what, ": head_dim must be even, got ", D);
  TORCH_CHECK_VALUE(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.size(2) == KVH &&
                        k_cache.size(3) == D,
                    what, ": caches must both be [num_blocks, block_size, ", KVH, ", ", D, "], got ",
                    k_cache.sizes(), " and ", v_cache.sizes());
  TORCH_CHECK_VALUE(k_cache.is_contiguous() && v_cache.is_contiguous(), what, ": caches must be contiguous");
  TORCH_CHECK_TYPE(cos_in.scalar_type() == at::kFloat && sin_in.scalar_type() == at::kFloat, what,
                   ": cos and sin must be float32");
  TORCH_CHECK_VALUE(cos_in.dim() == 2 && cos_in.sizes() == sin_in.sizes() && cos_in.size(1) == D / 2, what,
                    ": cos and sin must both be [P, ", D / 2, "], got ", cos_in.sizes(), " and ", sin_in.sizes());
  const at::Tensor pos = checked_vector(positions, T, at::kLong, "positions", what);
  const at::Tensor slots = checked_vector(slot_mapping, T, at::kLong, "slot_mapping", what);
  at::Tensor qo = checked_out(q_out, q_in.sizes(), q_in.scalar_type(), q_in.device(), what);
  at::Tensor ko = checked_out(k_out, k_in.sizes(), k_in.scalar_type(), k_in.device(), what);
  if (T == 0) return {qo, ko};
  const int64_t P = cos_in.size(0), num_slots = k_cache.size(0) * k_cache.size(1);
  const int64_t* pp = pos.data_ptr<int64_t>();
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) {  // validate before anything is written
    TORCH_CHECK_VALUE(pp[t] >= 0 && pp[t] < P, what, ": positions[", t, "] = ", pp[t], " out of range [0, ", P,
                      ") of the cos/sin tables");
    TORCH_CHECK_VALUE(sp[t] < num_slots, what, ": slot_mapping[", t, "] = ", sp[t], " out of range: the cache has ",
                      num_slots, " slots");
  }
  const at::Tensor q = unit_last_stride(q_in), k = unit_last_stride(k_in), v = unit_last_stride(v_in);
  const at::Tensor cos = unit_last_stride(cos_in), sin = unit_last_stride(sin_in);
  const RopeArgs a{q.data_ptr(),
                   k.data_ptr(),
                   v.data_ptr(),
                   pp,
                   sp,
                   cos.data_ptr<float>(),
                   sin.data_ptr<float>(),
                   qo.data_ptr(),
                   ko.data_ptr(),
                   k_cache.data_ptr(),
                   v_cache.data_ptr(),
                   q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                   cos.stride(0), sin.stride(0),
                   H, KVH, D,
                   q.scalar_type() == at::kBFloat16};
  const Impl* impl = g_impl;
  at::parallel_for(0, T, grain_for((H + 2 * KVH) * D), [&](int64_t begin, int64_t end) { impl->rope(a, begin, end); });
  return {qo, ko};
}

std::tuple<at::Tensor, at::Tensor> sample_cpu(const at::Tensor& logits_in, const at::Tensor& temperature,
                                              const at::Tensor& top_k, const at::Tensor& top_p,
                                              const at::Tensor& min_p, const at::Tensor& uniform,
                                              int64_t softmax_lanes) {
  const char* what = "sample_cpu";
  TORCH_CHECK_VALUE(softmax_lanes > 0 && softmax_lanes <= 64 && (softmax_lanes & (softmax_lanes - 1)) == 0, what,
                    ": softmax_lanes must be a power of two up to 64, got ", softmax_lanes);
  TORCH_CHECK_VALUE(logits_in.is_cpu() && logits_in.dim() == 2 && logits_in.size(1) > 0, what,
                    ": logits must be a CPU tensor [B, V] with V > 0, got ", logits_in.sizes());
  TORCH_CHECK_TYPE(is_f32_or_bf16(logits_in), what, ": logits must be float32 or bfloat16, got ",
                   logits_in.scalar_type());
  const int64_t B = logits_in.size(0), V = logits_in.size(1);
  const at::Tensor temp = checked_vector(temperature, B, at::kFloat, "temperature", what);
  const at::Tensor tk = checked_vector(top_k, B, at::kLong, "top_k", what);
  const at::Tensor tp = checked_vector(top_p, B, at::kFloat, "top_p", what);
  const at::Tensor mp = checked_vector(min_p, B, at::kFloat, "min_p", what);
  const at::Tensor u = checked_vector(uniform, B, at::kFloat, "uniform", what);
  at::Tensor tokens = at::empty({B}, at::TensorOptions().dtype(at::kLong));
  at::Tensor logprobs = at::empty({B}, at::TensorOptions().dtype(at::kFloat));
  if (B == 0) return {tokens, logprobs};
  const at::Tensor logits = unit_last_stride(logits_in);
  const SampleArgs a{logits.data_ptr(),
                     temp.data_ptr<float>(), tp.data_ptr<float>(), mp.data_ptr<float>(), u.data_ptr<float>(),
                     tk.data_ptr<int64_t>(),
                     tokens.data_ptr<int64_t>(),
                     logprobs.data_ptr<float>(),
                     logits.stride(0), V,
                     static_cast<int>(softmax_lanes),
                     logits.scalar_type() == at::kBFloat16};
  const Impl* impl = g_impl;
  const int64_t scratch = (V + 15) / 16 * 16;  // whole vectors
  at::parallel_for(0, B, grain_for(V), [&](int64_t begin, int64_t end) {
    std::vector<float> buf(scratch);
    impl->sample(a, begin, end, buf.data());
  });
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK_VALUE(a.tokens[b] >= 0, what, ": logits row ", b,
                      " has no finite maximum (NaN, +inf or every logit -inf)");
  return {tokens, logprobs};
}

at::Tensor pack_rows16(const at::Tensor& weight) {
  const char* what = "pack_rows16";
  TORCH_CHECK_VALUE(weight.is_cpu() && weight.dim() == 2, what, ": weight must be a CPU tensor [out, in], got ",
                    weight.sizes());
  TORCH_CHECK_TYPE(is_f32_or_bf16(weight), what, ": weight must be float32 or bfloat16, got ", weight.scalar_type());
  const int64_t N = weight.size(0), K = weight.size(1), NB = (N + 15) / 16;
  at::Tensor packed = empty_huge_pages({NB, K, 16}, weight.scalar_type());
  at::Tensor rows = weight;
  if (NB * 16 != N) rows = at::cat({weight, weight.new_zeros({NB * 16 - N, K})});
  packed.copy_(rows.view({NB, 16, K}).transpose(1, 2));
  return packed;
}

at::Tensor linear_rows16_cpu(const at::Tensor& x_in, const at::Tensor& packed,
                             const std::optional<at::Tensor>& bias_in, int64_t out_features) {
  const char* what = "linear_rows16_cpu";
  TORCH_CHECK_VALUE(x_in.is_cpu() && packed.is_cpu(), what, ": tensors must be on the CPU");
  TORCH_CHECK_VALUE(packed.dim() == 3 && packed.size(2) == 16 && packed.is_contiguous(), what,
                    ": packed must be a contiguous [blocks, in, 16] tensor from pack_rows16, got ", packed.sizes());
  const int64_t K = packed.size(1), N = out_features;
  TORCH_CHECK_VALUE(N > (packed.size(0) - 1) * 16 && N <= packed.size(0) * 16, what, ": out_features ", N,
                    " does not match ", packed.size(0), " blocks of 16");
  TORCH_CHECK_VALUE(x_in.dim() >= 1 && x_in.size(-1) == K, what, ": x must be [..., ", K, "], got ", x_in.sizes());
  TORCH_CHECK_TYPE(x_in.scalar_type() == packed.scalar_type(), what, ": x dtype ", x_in.scalar_type(),
                   " != weight dtype ", packed.scalar_type());
  const bool has_bias = bias_in.has_value() && bias_in->defined();
  at::Tensor bias;
  if (has_bias) {
    TORCH_CHECK_VALUE(bias_in->is_cpu() && bias_in->dim() == 1 && bias_in->size(0) == N, what, ": bias must be [",
                      N, "], got ", bias_in->sizes());
    bias = bias_in->to(at::kFloat).contiguous();
  }
  std::vector<int64_t> shape(x_in.sizes().begin(), x_in.sizes().end());
  shape.back() = N;
  at::Tensor y = at::empty(shape, x_in.options());
  const int64_t rows = c10::multiply_integers(x_in.sizes().slice(0, x_in.dim() - 1));
  if (rows == 0 || N == 0) return y;
  const at::Tensor x = x_in.reshape({rows, K}).to(at::kFloat).contiguous();
  const LinearArgs a{x.data_ptr<float>(), has_bias ? bias.data_ptr<float>() : nullptr, packed.data_ptr(),
                     y.data_ptr(), rows, K, N, x_in.scalar_type() == at::kBFloat16};
  const Impl* impl = g_impl;
  at::parallel_for(0, packed.size(0), grain_for(K * 16 * rows),
                   [&](int64_t begin, int64_t end) { impl->linear(a, begin, end); });
  return y;
}

}  // namespace nreft
