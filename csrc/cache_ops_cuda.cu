// The CUDA kernel behind copy_blocks (checks and dispatch live in cache_ops.cpp).
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "cache_ops.h"

namespace nreft {
namespace {

constexpr int kThreads = 256;

// Grid (pairs, layers): copies one block of one layer, k and v.
template <typename T>
__global__ void copy_blocks_kernel(T* __restrict__ k_cache, T* __restrict__ v_cache,
                                   const int64_t* __restrict__ src_dst, int64_t num_blocks, int64_t block_numel) {
  const int64_t layer = blockIdx.y, p = blockIdx.x;
  const int64_t src = (layer * num_blocks + src_dst[2 * p]) * block_numel;
  const int64_t dst = (layer * num_blocks + src_dst[2 * p + 1]) * block_numel;
  for (int64_t i = threadIdx.x; i < block_numel; i += blockDim.x) {
    k_cache[dst + i] = k_cache[src + i];
    v_cache[dst + i] = v_cache[src + i];
  }
}

}  // namespace

void copy_blocks_cuda(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& src_dst) {
  const c10::cuda::CUDAGuard guard(k_cache.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(src_dst.size(0)), static_cast<unsigned>(k_cache.size(0)));
  const int64_t block_numel = k_cache[0][0].numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k_cache.scalar_type(), "copy_blocks_cuda", [&] {
    copy_blocks_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(k_cache.data_ptr<scalar_t>(),
                                                                v_cache.data_ptr<scalar_t>(),
                                                                src_dst.data_ptr<int64_t>(), k_cache.size(1),
                                                                block_numel);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace nreft
