// CUDA kernels behind write_kv / copy_blocks (checks and dispatch live in cache_ops.cpp).
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "cache_ops.h"

namespace nreft {
namespace {

constexpr int kThreads = 256;

// One CUDA block per token: copies its [KVH, D] rows of k and v into the cache slot.
template <typename T>
__global__ void write_kv_kernel(const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ k_cache,
                                T* __restrict__ v_cache, const int64_t* __restrict__ slots, int64_t num_slots,
                                int64_t k_stride_t, int64_t k_stride_h, int64_t v_stride_t, int64_t v_stride_h,
                                int heads, int dim) {
  const int64_t t = blockIdx.x;
  const int64_t slot = slots[t];
  if (slot < 0 || slot >= num_slots) return;
  const int64_t row = static_cast<int64_t>(heads) * dim;
  for (int i = threadIdx.x; i < row; i += blockDim.x) {
    const int h = i / dim, d = i % dim;
    k_cache[slot * row + i] = k[t * k_stride_t + h * k_stride_h + d];
    v_cache[slot * row + i] = v[t * v_stride_t + h * v_stride_h + d];
  }
}

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

void write_kv_cuda(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
                   const at::Tensor& slot_mapping) {
  const int64_t tokens = k.size(0);
  if (tokens == 0) return;
  const c10::cuda::CUDAGuard guard(k.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t num_slots = k_cache.size(0) * k_cache.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k.scalar_type(), "write_kv_cuda", [&] {
    write_kv_kernel<scalar_t><<<tokens, kThreads, 0, stream>>>(
        k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(),
        slot_mapping.data_ptr<int64_t>(), num_slots, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        static_cast<int>(k.size(1)), static_cast<int>(k.size(2)));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

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
