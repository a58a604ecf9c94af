"""The Triton kernels compile for an H100 (sm_90) without a GPU, without register spills at bf16.

The interpreter runs the kernels' Python, not the GPU compiler: this catches what only compilation sees
(typing of loop-carried values, unsupported constructs, local-memory spills) on CPU-only machines. It
compiles in a subprocess, since the kernels in this process are interpreter functions.
"""

import os
import re
import subprocess
import sys

import pytest

# (module, kernel, pointer/float argument types, constexprs, options, require_no_spill)
BF, F32 = "*bf16", "*fp32"
CASES = [
    (
        "rms_norm",
        "_rms_norm_kernel",
        {"x_ptr": BF, "res_ptr": BF, "w_ptr": BF, "y_ptr": BF, "eps": "fp32"},
        {"HAS_RESIDUAL": True, "BLOCK": 2048},
        {"num_warps": 4},
        True,
    ),
    (
        "activation",
        "_silu_and_mul_kernel",
        {"gate_ptr": BF, "up_ptr": BF, "out_ptr": BF},
        {"BLOCK": 2048},
        {"num_warps": 8},
        True,
    ),
    (
        "rope",
        "_rope_write_kv_kernel",
        {
            "q_ptr": BF,
            "k_ptr": BF,
            "v_ptr": BF,
            "pos_ptr": "*i64",
            "cos_ptr": F32,
            "sin_ptr": F32,
            "kc_ptr": BF,
            "vc_ptr": BF,
            "slot_ptr": "*i64",
            "qo_ptr": BF,
            "ko_ptr": BF,
        },
        {"HALF": 64, "HALF_PAD": 64, "QH_PAD": 16, "KVH_PAD": 2},
        {"num_warps": 4},
        True,
    ),
    (
        "paged_attention",
        "_paged_decode_split_kernel",
        {
            "q_ptr": BF,
            "kc_ptr": BF,
            "vc_ptr": BF,
            "bt_ptr": "*i32",
            "ctx_ptr": "*i32",
            "out_ptr": BF,
            "opart_ptr": F32,
            "lse_ptr": F32,
            "qk_scale": "fp32",
        },
        {
            "GROUP": 6,
            "G_PAD": 16,
            "HEAD_DIM": 128,
            "D_PAD": 128,
            "PAGE": 16,
            "BLOCK_N": 64,
            "PARTITION": 512,
            "SINGLE_SPLIT": False,
            "IEEE": False,
            "UPCAST": False,
        },
        {"num_warps": 4, "num_stages": 3},
        True,
    ),
    (
        "paged_attention",
        "_paged_decode_split_kernel",
        {
            "q_ptr": F32,
            "kc_ptr": F32,
            "vc_ptr": F32,
            "bt_ptr": "*i32",
            "ctx_ptr": "*i32",
            "out_ptr": F32,
            "opart_ptr": F32,
            "lse_ptr": F32,
            "qk_scale": "fp32",
        },
        {
            "GROUP": 3,
            "G_PAD": 16,
            "HEAD_DIM": 64,
            "D_PAD": 64,
            "PAGE": 32,
            "BLOCK_N": 64,
            "PARTITION": 128,
            "SINGLE_SPLIT": True,
            "IEEE": True,
            "UPCAST": False,
        },
        {"num_warps": 4, "num_stages": 3},
        False,
    ),
    (
        "paged_attention",
        "_paged_decode_merge_kernel",
        {"ctx_ptr": "*i32", "opart_ptr": F32, "lse_ptr": F32, "out_ptr": BF},
        {"HEAD_DIM": 128, "D_PAD": 128, "PARTITION": 512, "S_PAD": 64, "S_CHUNK": 16},
        {"num_warps": 4},
        True,
    ),
    (
        "prefill_attention",
        "_prefill_attention_kernel",
        {
            "q_ptr": BF,
            "k_ptr": BF,
            "v_ptr": BF,
            "o_ptr": BF,
            "cu_ptr": "*i32",
            "tile_cu_ptr": "*i32",
            "qk_scale": "fp32",
        },
        {
            "GROUP": 6,
            "HEAD_DIM": 128,
            "D_PAD": 128,
            "BLOCK_M": 128,
            "BLOCK_N": 64,
            "IEEE": False,
            "UPCAST": False,
        },
        {"num_warps": 8, "num_stages": 3},
        True,
    ),
    (
        "sampler",
        "_sample_kernel",
        {
            "logits_ptr": F32,
            "temp_ptr": F32,
            "topk_ptr": "*i64",
            "topp_ptr": F32,
            "minp_ptr": F32,
            "u_ptr": F32,
            "cmax_ptr": F32,
            "carg_ptr": "*i32",
            "csum_ptr": F32,
            "tok_ptr": "*i64",
            "lp_ptr": F32,
        },
        {"ROWS": 1, "BLOCK": 4096, "SEARCH_BLOCK": 1024, "N_CAND": 16, "CHUNK": 1024, "NUM_CHUNKS_P2": 256},
        {"num_warps": 8},
        True,
    ),
    (
        "sampler",
        "_chunk_stats_kernel",
        {"logits_ptr": F32, "temp_ptr": F32, "cmax_ptr": F32, "carg_ptr": "*i32", "csum_ptr": F32},
        {"ROWS": 1, "CHUNK": 1024},
        {"num_warps": 4},
        True,
    ),
]


def _compile_all() -> None:
    """Runs in the subprocess: compile every case, print one 'module kernel REG:.. LOCAL:..' line each."""
    import importlib
    import warnings

    warnings.filterwarnings("ignore")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    for module, name, types, consts, options, _ in CASES:
        fn = getattr(importlib.import_module(f"nreft_engine.kernels.{module}"), name)
        sig = {a: "constexpr" if a in consts else types.get(a, "i32") for a in fn.arg_names}
        # what the launcher specializes at run time: pointers and strides divisible by 16
        attrs = {
            (i,): [["tt.divisibility", 16]]
            for i, a in enumerate(fn.arg_names)
            if a not in consts and (sig[a].startswith("*") or a.startswith("stride"))
        }
        kernel = triton.compile(
            ASTSource(fn, sig, constexprs=consts, attrs=attrs),
            target=GPUTarget("cuda", 90, 32),
            options=options,
        )
        path = f"/tmp/nreft_{os.getpid()}_{name}.cubin"
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        usage = subprocess.run(
            [cuobjdump, "-res-usage", path], capture_output=True, text=True, check=False
        ).stdout
        os.unlink(path)
        match = re.search(r"REG:\d+ STACK:\d+ SHARED:\d+ LOCAL:\d+", usage)
        print(module, name, match.group(0) if match else "REG:? STACK:? SHARED:? LOCAL:?", flush=True)


def _ptxas_available() -> bool:
    try:
        import triton
    except ImportError:
        return False
    return os.path.exists(
        os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    )


@pytest.mark.skipif(not _ptxas_available(), reason="triton's bundled ptxas is not installed")
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, __file__], capture_output=True, text=True, env=env, timeout=600, check=False
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == len(CASES), proc.stdout
    for line, case in zip(lines, CASES):
        stack = re.search(r"STACK:(\d+)", line)  # absent if cuobjdump could not read the cubin
        if stack and case[5]:  # a few bytes of stack frame are not spills of the tiles
            assert int(stack.group(1)) <= 16, f"register spills: {line}"


if __name__ == "__main__":
    _compile_all()
