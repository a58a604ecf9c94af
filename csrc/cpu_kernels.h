// C++ CPU kernels of the decode step (semantics: the torch references in kernels/*.py; layouts:
// docs/CONTRACTS.md). Math in fp32, fp32 and bf16 tensors; the inner loops are compiled for AVX-512,
// AVX2 and baseline x86-64 and picked at run time (cpu_kernels.cpp). Python wrappers: kernels/cpu.py.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>

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

// RoPE (HF rotate_half: the two halves of D) on q [T, H, D] and k [T, KVH, D] at positions int64 [T] of the
// fp32 tables cos/sin [P, D/2]; rotated k and unrotated v are written into the caches [num_blocks,
// block_size, KVH, D] (contiguous, the dtype of q) at the flat slots slot_mapping int64 [T] (negative: not
// written). q/k/v may be views with any token and head strides. Positions and slots are validated before
// anything is written. Returns (q_rot, k_rot), contiguous (into q_out / k_out when given).
std::tuple<at::Tensor, at::Tensor> rope_write_kv_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     const at::Tensor& positions, const at::Tensor& cos,
                                                     const at::Tensor& sin, const at::Tensor& k_cache,
                                                     const at::Tensor& v_cache, const at::Tensor& slot_mapping,
                                                     const std::optional<at::Tensor>& q_out,
                                                     const std::optional<at::Tensor>& k_out);

// One token per row of logits [B, V] (fp32 or bf16), as kernels/sampler.py's sample_reference: temperature
// (0 = greedy), then top-k (<= 0 or >= V: off), top-p (1: off), min-p (0: off; > 1 acts as 1), keeping
// ties; inverse-CDF sampling in vocabulary order with uniform [B]; the token's log-prob under the filtered
// distribution. Parameters: temperature, top_p, min_p, uniform fp32 [B]; top_k int64 [B]. Top-p keeps the
// reference's tokens where they depend on its fp32 softmax sum, which ATen takes in softmax_lanes lanes (the
// floats of its Vectorized<float>: 16 with AVX-512, 8 with AVX2) reduced pairwise. A row without a finite
// maximum (NaN, +inf or all -inf) is a ValueError. Returns (tokens int64 [B], logprobs fp32 [B]).
std::tuple<at::Tensor, at::Tensor> sample_cpu(const at::Tensor& logits, const at::Tensor& temperature,
                                              const at::Tensor& top_k, const at::Tensor& top_p,
                                              const at::Tensor& min_p, const at::Tensor& uniform,
                                              int64_t softmax_lanes);

// Which code path the kernels run: "avx512", "avx2" or "base". set_cpu_isa picks one for tests
// ("" = best the CPU supports; the NREFT_CPU_ISA environment variable sets the start-up choice).
std::string cpu_isa();
void set_cpu_isa(const std::string& isa);

// Small-batch linear (the decode step at batch 1-8 is a memory-bound matrix-vector product). pack_rows16
// copies weight [N, K] (fp32 / bf16) into [ceil(N / 16), K, 16]: its rows in blocks of 16, zero-padded, each
// block k-major, so one block is one sequential read; on Linux the copy sits in 2 MiB pages. linear_rows16_cpu
// computes x [..., K] @ W.T + bias [N] from it, fp32 sums in k order, in x's dtype (W's). Any number of rows;
// beyond a few, a blocked GEMM (oneDNN) is faster.
at::Tensor pack_rows16(const at::Tensor& weight);
at::Tensor linear_rows16_cpu(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                             int64_t out_features);

}  // namespace nreft
