#include "cache_ops.h"

#include <ATen/Parallel.h>

#include <cstring>
#include <unordered_set>

namespace nreft {
namespace {

void check_same(const at::Tensor& a, const at::Tensor& b, const char* what) {
  TORCH_CHECK_VALUE(a.sizes() == b.sizes(), what, ": shape mismatch ", a.sizes(), " vs ", b.sizes());
  TORCH_CHECK_TYPE(a.scalar_type() == b.scalar_type(), what, ": dtype mismatch ", a.scalar_type(), " vs ",
                   b.scalar_type());
  TORCH_CHECK_VALUE(a.device() == b.device(), what, ": device mismatch ", a.device(), " vs ", b.device());
}

void check_cache(const at::Tensor& cache, int64_t dim, const char* name) {
  TORCH_CHECK_VALUE(cache.dim() == dim, name, " must have ", dim, " dims, got shape ", cache.sizes());
  TORCH_CHECK_TYPE(cache.is_floating_point(), name, " must be floating point, got ", cache.scalar_type());
  TORCH_CHECK_VALUE(cache.is_contiguous(), name, " must be contiguous");
}

void write_kv_cpu(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
                  const at::Tensor& slot_mapping) {
  const int64_t tokens = k.size(0), heads = k.size(1), dim = k.size(2);
  const int64_t num_slots = k_cache.size(0) * k_cache.size(1);
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t)  // validate everything before writing anything
    TORCH_CHECK_VALUE(slots[t] < num_slots, "slot_mapping[", t, "] = ", slots[t], " out of range for a cache of ",
                      num_slots, " slots");
  const int64_t es = k.element_size(), row_bytes = dim * es;
  // Plain byte copies: one code path serves every floating dtype.
  auto copy_one = [&](const at::Tensor& src, at::Tensor& cache, int64_t t) {
    const char* s = static_cast<const char*>(src.data_ptr()) + t * src.stride(0) * es;
    char* d = static_cast<char*>(cache.data_ptr()) + slots[t] * heads * row_bytes;
    for (int64_t h = 0; h < heads; ++h) std::memcpy(d + h * row_bytes, s + h * src.stride(1) * es, row_bytes);
  };
  at::parallel_for(0, tokens, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      if (slots[t] < 0) continue;
      copy_one(k, k_cache, t);
      copy_one(v, v_cache, t);
    }
  });
}

void copy_blocks_cpu(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& src_dst) {
  const int64_t layers = k_cache.size(0), num_blocks = k_cache.size(1), pairs = src_dst.size(0);
  const int64_t block_bytes = k_cache[0][0].numel() * k_cache.element_size();
  const int64_t* ids = src_dst.data_ptr<int64_t>();
  char* kc = static_cast<char*>(k_cache.data_ptr());
  char* vc = static_cast<char*>(v_cache.data_ptr());
  at::parallel_for(0, layers * pairs, 4, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t layer = i / pairs, p = i % pairs;
      const int64_t src = (layer * num_blocks + ids[2 * p]) * block_bytes;
      const int64_t dst = (layer * num_blocks + ids[2 * p + 1]) * block_bytes;
      std::memcpy(kc + dst, kc + src, block_bytes);
      std::memcpy(vc + dst, vc + src, block_bytes);
    }
  });
}

}  // namespace

void write_kv(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
              const at::Tensor& slot_mapping) {
  TORCH_CHECK_VALUE(k.dim() == 3, "write_kv: k must be [T, KVH, D], got shape ", k.sizes());
  check_same(k, v, "write_kv: k and v");
  check_cache(k_cache, 4, "write_kv: k_cache_layer");
  check_same(k_cache, v_cache, "write_kv: k_cache_layer and v_cache_layer");
  TORCH_CHECK_VALUE(k_cache.size(2) == k.size(1) && k_cache.size(3) == k.size(2), "write_kv: cache shape ",
                    k_cache.sizes(), " does not match k shape ", k.sizes(), " in [KVH, D]");
  TORCH_CHECK_TYPE(k.scalar_type() == k_cache.scalar_type(), "write_kv: k dtype ", k.scalar_type(),
                   " != cache dtype ", k_cache.scalar_type());
  TORCH_CHECK_VALUE(k.device() == k_cache.device(), "write_kv: k on ", k.device(), ", cache on ",
                    k_cache.device());
  TORCH_CHECK_TYPE(slot_mapping.scalar_type() == at::kLong, "write_kv: slot_mapping must be int64, got ",
                   slot_mapping.scalar_type());
  TORCH_CHECK_VALUE(slot_mapping.dim() == 1 && slot_mapping.size(0) == k.size(0),
                    "write_kv: slot_mapping must be [", k.size(0), "], got shape ", slot_mapping.sizes());
  TORCH_CHECK_VALUE(slot_mapping.device() == k.device(), "write_kv: slot_mapping on ", slot_mapping.device(),
                    ", k on ", k.device());
  // Token and head strides are free (k may be a view of a fused qkv projection); rows must be contiguous.
  const auto k_rows = k.stride(2) == 1 ? k : k.contiguous();
  const auto v_rows = v.stride(2) == 1 ? v : v.contiguous();
  const auto slots = slot_mapping.contiguous();
  if (k.is_cuda()) {
#ifdef NREFT_WITH_CUDA
    write_kv_cuda(k_rows, v_rows, k_cache, v_cache, slots);
    return;
#else
    TORCH_CHECK(false, "write_kv: nreft_engine._C was built without CUDA");
#endif
  }
  TORCH_CHECK_VALUE(k.is_cpu(), "write_kv: unsupported device ", k.device());
  write_kv_cpu(k_rows, v_rows, k_cache, v_cache, slots);
}

void copy_blocks(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& src_dst) {
  check_cache(k_cache, 5, "copy_blocks: k_cache");
  check_same(k_cache, v_cache, "copy_blocks: k_cache and v_cache");
  TORCH_CHECK_TYPE(src_dst.scalar_type() == at::kLong, "copy_blocks: src_dst must be int64, got ",
                   src_dst.scalar_type());
  TORCH_CHECK_VALUE(src_dst.dim() == 2 && src_dst.size(1) == 2, "copy_blocks: src_dst must be [N, 2], got shape ",
                    src_dst.sizes());
  // Validate the (small) pair list on the host: ids in range, and no destination that is also written
  // twice or read by another pair, so the copies can run in parallel in any order.
  const auto pairs = src_dst.cpu().contiguous();
  const int64_t* ids = pairs.data_ptr<int64_t>();
  const int64_t num_blocks = k_cache.size(1);
  std::unordered_set<int64_t> srcs, dsts;
  for (int64_t i = 0; i < pairs.size(0); ++i) {
    for (int64_t j = 0; j < 2; ++j)
      TORCH_CHECK_VALUE(ids[2 * i + j] >= 0 && ids[2 * i + j] < num_blocks, "copy_blocks: block id ",
                        ids[2 * i + j], " in row ", i, " out of range [0, ", num_blocks, ")");
    srcs.insert(ids[2 * i]);
    TORCH_CHECK_VALUE(dsts.insert(ids[2 * i + 1]).second, "copy_blocks: destination block ", ids[2 * i + 1],
                      " appears twice");
  }
  for (int64_t dst : dsts)
    TORCH_CHECK_VALUE(!srcs.count(dst), "copy_blocks: block ", dst, " is both a source and a destination");
  if (pairs.size(0) == 0) return;
  if (k_cache.is_cuda()) {
#ifdef NREFT_WITH_CUDA
    // through pinned memory, so the host does not wait for the work already queued on the device
    copy_blocks_cuda(k_cache, v_cache, pairs.pin_memory().to(k_cache.device(), /*non_blocking=*/true));
    return;
#else
    TORCH_CHECK(false, "copy_blocks: nreft_engine._C was built without CUDA");
#endif
  }
  TORCH_CHECK_VALUE(k_cache.is_cpu(), "copy_blocks: unsupported device ", k_cache.device());
  copy_blocks_cpu(k_cache, v_cache, pairs);
}

}  // namespace nreft
