"""Compile the library's Triton kernels for sm_90 (H100/H200) without a GPU; run by ``test_compile_sm90.py``.

Run with ``TRITON_INTERPRET`` unset (the interpreter replaces the kernels with Python objects the compiler cannot
take). Prints ``OK <case> shared=<bytes>`` or ``FAIL <case>: <error>`` per case, ``SKIP <why>`` when this Triton
has no CUDA toolchain, and exits 1 if any case failed.

    python tests/ops/sm90_compile.py
"""

from __future__ import annotations

import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from sparseflash.ops.prefill.dropped_blocks_kernel import dropped_blocks_fwd_kernel
from sparseflash.ops.prefill.kernel import prefill_fwd_kernel
from sparseflash.ops.scores.antidiagonal import _antidiag_kernel
from sparseflash.patterns.mass_select_kernel import _mass_select_kernel

TARGET = GPUTarget("cuda", 90, 32)

PREFILL_POINTERS = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "O": "*bf16", "LSE": "*fp32"}
PREFILL_POINTERS.update(
    {n: "*i32" for n in ("KV_NUM", "KV_IDX", "COL_NUM", "COL_IDX", "WORK_ORDER", "SEQ_LO", "SEQ_HI", "SKIP_STATS")}
)
PREFILL_BASE = dict(
    HEAD_DIM=128, BLOCK_D=128, BLOCK_M=128, BLOCK_N=64, PACK=1, CAUSAL=True, SPARSE=False, LAYOUT_BLOCK_Q=128,
    LAYOUT_BLOCK_K=128, CAPACITY_POW2=256, HAS_COLS=False, HAS_SEQ_LENS=False, RETURN_LSE=False, OFFS_64=False,
    PREFETCH=True, SKIP=False, STATS=False,
)  # fmt: skip
PREFILL_CASES = {
    "dense_causal_d128": {},
    "dense_d64_padded_batch_lse": dict(HEAD_DIM=64, BLOCK_D=64, HAS_SEQ_LENS=True, RETURN_LSE=True),
    "dense_gqa_packed_int64": dict(PACK=6, OFFS_64=True, CAUSAL=False),
    "sparse_prefetch": dict(SPARSE=True),
    "sparse_columns_packed": dict(SPARSE=True, HAS_COLS=True, PACK=6),
    "skip_with_stats": dict(SPARSE=True, SKIP=True, STATS=True),
}
ANTIDIAG_POINTERS = {"Q": "*bf16", "K": "*bf16", "P_BUF": "*fp32", "M_BUF": "*fp32", "OUT": "*fp32"}
_ANTIDIAG_D128 = dict(STRIDE=8, HEAD_DIM=128, BLOCK_D=128, R=16, CAUSAL=True)
ANTIDIAG_CASES = {
    "stride8_d128": dict(_ANTIDIAG_D128, BLOCK_T=64, BLOCK_U=128, FLATTEN=False),
    "stride8_d128_flat": dict(_ANTIDIAG_D128, BLOCK_T=64, BLOCK_U=128, FLATTEN=True),
    "stride8_d128_flat_128x128": dict(_ANTIDIAG_D128, BLOCK_T=128, BLOCK_U=128, FLATTEN=True),
    "stride16_d96_full": dict(
        STRIDE=16, HEAD_DIM=96, BLOCK_D=128, BLOCK_T=64, BLOCK_U=128, R=8, CAUSAL=False, FLATTEN=False
    ),
}
DROPPED_POINTERS = {"Q": "*bf16", "KM": "*fp32", "VM": "*bf16", "KEEP": "*u8", "O": "*bf16", "LSE": "*fp32"}
DROPPED_BASE = dict(
    HEAD_DIM=128, BLOCK_D=128, BLOCK_M=64, BLOCK_KB=64, LAYOUT_BLOCK_Q=128, LAYOUT_BLOCK_K=128, POOL=128, OFFS_64=False,
    SPLIT_K=True,
)  # fmt: skip


UNIT_STRIDES = {"stride_qd", "stride_kd", "stride_vd", "stride_od", "stride_ik", "stride_cik", "stride_mj", "stride_sk"}


def _compile(kernel, constexprs: dict, pointers: dict, floats: set[str], warps: int, stages: int):
    """Compile ``kernel`` for sm_90; non-constexpr scalars are int32 except ``floats`` (fp32).

    Specialized as a launch on contiguous tensors is: the innermost strides (``UNIT_STRIDES``) are the constant 1
    and pointers and the other strides are divisible by 16 (what Triton's JIT infers from the values). Without that,
    loads do not vectorize and the compiler does not pipeline them, so the shared memory checked here would not be
    what runs.
    """
    signature, values, attrs = {}, {}, {}
    for index, param in enumerate(kernel.params):
        name = param.name
        if param.is_constexpr:
            signature[name], values[name] = "constexpr", constexprs[name]  # KeyError: a new constexpr to list here
        elif name in UNIT_STRIDES:
            signature[name], values[name] = "constexpr", 1
        else:
            signature[name] = pointers.get(name, "fp32" if name in floats else "i32")
            if name in pointers or name.startswith("stride_"):
                attrs[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=kernel, signature=signature, constexprs=values, attrs=attrs)
    return triton.compile(source, target=TARGET, options={"num_warps": warps, "num_stages": stages})


SHARED_LIMIT = 228 * 1024  # shared memory per block on the H100/H200


def cases() -> dict:
    """``{name: (kernel, constexprs, pointer types, fp32 scalars, warps, stages)}``: variants the launchers use."""
    out = {}
    for name, extra in PREFILL_CASES.items():
        out["prefill/" + name] = (prefill_fwd_kernel, {**PREFILL_BASE, **extra}, PREFILL_POINTERS,
                                  {"qk_scale", "skip_thr"}, 8, 3)  # fmt: skip
    for name, consts in ANTIDIAG_CASES.items():
        out["scoring/" + name] = (_antidiag_kernel, consts, ANTIDIAG_POINTERS, {"qk_scale"}, 8, 3)
    select_ptrs = {"SCORES": "*fp32", "THR": "*fp32", "ALLOWED": "*u8", "FORCED": "*u8"}
    select_ptrs.update({"KV_NUM": "*i32", "KV_IDX": "*i32"})
    for name, consts in {"scalar_256": dict(PER_HEAD=False, EXTRA=0, BLOCK_K=256),
                         "per_head_extra_4096": dict(PER_HEAD=True, EXTRA=1, BLOCK_K=4096)}.items():  # fmt: skip
        out["select/" + name] = (_mass_select_kernel, consts, select_ptrs, {"thr_scalar"}, 4, 1)
    fp32 = {**DROPPED_POINTERS, "Q": "*fp32", "VM": "*fp32", "O": "*fp32"}
    out["dropped/bf16_split"] = (dropped_blocks_fwd_kernel, DROPPED_BASE, DROPPED_POINTERS, {"qk_scale"}, 4, 2)
    out["dropped/bf16_pool16"] = (
        dropped_blocks_fwd_kernel,
        {**DROPPED_BASE, "POOL": 16},
        DROPPED_POINTERS,
        {"qk_scale"},
        4,
        2,
    )
    out["dropped/fp32"] = (dropped_blocks_fwd_kernel, {**DROPPED_BASE, "SPLIT_K": False}, fp32, {"qk_scale"}, 4, 2)
    return out


def main() -> int:
    failed = 0
    for index, (name, (kernel, consts, pointers, floats, warps, stages)) in enumerate(cases().items()):
        try:
            compiled = _compile(kernel, consts, pointers, floats, warps, stages)
        except (ImportError, FileNotFoundError) as err:  # no CUDA backend / no bundled ptxas
            if index == 0:
                print(f"SKIP no sm_90 toolchain in this Triton: {err}")
                return 0
            raise
        except Exception as err:  # a compile error: report it with the case
            print(f"FAIL {name}: {type(err).__name__}: {str(err)[:2000]}")
            failed += 1
            continue
        shared = compiled.metadata.shared
        if shared > SHARED_LIMIT:
            print(f"FAIL {name}: {shared} bytes of shared memory, above {SHARED_LIMIT}")
            failed += 1
        else:
            print(f"OK {name} shared={shared}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
