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
