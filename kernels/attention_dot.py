"""The tile matmul shared by the Triton attention kernels, and the exp2 scale they use."""

import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # exp(x) = exp2(x * LOG2E)


@triton.jit
def attention_dot(a, b, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """tl.dot; IEEE: exact fp32 products (no TF32). UPCAST: multiply in fp32, for Triton's CPU interpreter,
    whose dot multiplies the raw bits of bf16/fp16 operands (the GPU path never sets it)."""
    if UPCAST:
        r = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif IEEE:
        r = tl.dot(a, b, input_precision="ieee")
    else:
        r = tl.dot(a, b)
    return r
