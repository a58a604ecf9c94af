"""What the Triton attention kernels share: the tile matmul, the online-softmax step, the exp2 scale."""

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


@triton.jit
def online_softmax_step(s, v, m_i, l_i, acc, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """One key tile of online softmax in base 2: scores s [M, N] (masked keys at -inf) and values v [N, D]
    update the running max m_i [M], normaliser l_i [M] and unnormalised output acc [M, D]."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + attention_dot(p.to(v.dtype), v, IEEE, UPCAST)
    return m_new, l_i, acc
