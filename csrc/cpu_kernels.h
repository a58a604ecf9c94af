// C++ CPU kernels of the decode step (semantics: the torch references in kernels/*.py; layouts:
// docs/CONTRACTS.md). Math in fp32, fp32 and bf16 tensors; the inner loops are compiled for AVX-512,
// AVX2 and baseline x86-64 and picked at run time (cpu_kernels.cpp). Python wrappers: kernels/cpu.py.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>

namespace nreft {

// q [B, H, D] over caches [num_blocks, block_size, KVH, D] through block_tables int32 [B, W] for
// context_lens int32 [B] tokens; returns [B, H, D] (into `out` when given). D % 16 == 0.
at::Tensor paged_decode_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                      const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                                      const std::optional<at::Tensor>& out);

// y = weight * rmsnorm(x [+ residual]) over the last dim (any leading shape); with a residual, the sum is
// written into it first. Returns y (into `out` when given); dtype result_type(weight, x).
at::Tensor rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, double eps,
                        const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& out);

// silu(gate) * up, elementwise over [..., cols] (rows may be strided); returns a contiguous tensor.
at::Tensor silu_and_mul_cpu(const at::Tensor& gate, const at::Tensor& up, const std::optional<at::Tensor>& out);

// Which code path the kernels run: "avx512", "avx2" or "base". set_cpu_isa picks one for tests
// ("" = best the CPU supports; the NREFT_CPU_ISA environment variable sets the start-up choice).
std::string cpu_isa();
void set_cpu_isa(const std::string& isa);

}  // namespace nreft
