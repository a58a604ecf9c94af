// Copy-on-write block copies of the paged KV cache (layouts: docs/CONTRACTS.md). The entry point checks
// shapes, dtypes, devices and block ids, then dispatches to the CPU code or, built with CUDA, the CUDA kernel.
#pragma once

#include <ATen/ATen.h>

namespace nreft {

// Caches [num_layers, num_blocks, block_size, KVH, D]; src_dst int64 [N, 2]: block src -> dst, every layer.
void copy_blocks(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& src_dst);

#ifdef NREFT_WITH_CUDA
// Device kernel (cache_ops_cuda.cu); arguments already checked.
void copy_blocks_cuda(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& src_dst);
#endif

}  // namespace nreft
