// Paged KV cache writes and block copies (layouts: docs/CONTRACTS.md). The public entry points check
// shapes, dtypes and devices, then dispatch to the CPU code or, when built with CUDA, the CUDA kernels.
#pragma once

#include <ATen/ATen.h>

namespace nreft {

// k, v [T, KVH, D] into caches [num_blocks, block_size, KVH, D] at slot_mapping[t] (int64; < 0 skips).
void write_kv(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
              const at::Tensor& slot_mapping);

// Caches [num_layers, num_blocks, block_size, KVH, D]; src_dst int64 [N, 2]: block src -> dst, every layer.
void copy_blocks(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& src_dst);

#ifdef NREFT_WITH_CUDA
// Device kernels (cache_ops_cuda.cu); arguments already checked. write_kv_cuda skips slots out of range
// instead of raising (checking them would need a device sync every layer).
void write_kv_cuda(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache,
                   at::Tensor& v_cache, const at::Tensor& slot_mapping);
void copy_blocks_cuda(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& src_dst);
#endif

}  // namespace nreft
