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

from sparseflash.ops.decode.kernel import decode_split_kernel
from sparseflash.ops.prefill.dropped_blocks_kernel import dropped_blocks_fwd_kernel
from sparseflash.ops.prefill.kernel import prefill_fwd_kernel
from sparseflash.ops.scores.antidiagonal import _antidiag_kernel
from sparseflash.patterns.cover_kernel import CHUNK, CHUNK_TILE, SUB, _cover_round_kernel, _cover_write_kernel
from sparseflash.patterns.flexprefill_layout import _flexprefill_layout_kernel
from sparseflash.patterns.mass_select_kernel import _mass_select_kernel
from sparseflash.patterns.pbs_layout import _pbs_layout_kernel
from sparseflash.patterns.permuted_means import ROWS, _permuted_block_means_kernel

TARGET = GPUTarget("cuda", 90, 32)

PREFILL_POINTERS = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "O": "*bf16", "LSE": "*fp32"}
PREFILL_POINTERS.update(
    {n: "*i32" for n in ("KV_NUM", "KV_IDX", "COL_NUM", "COL_IDX", "WORK_ORDER", "SEQ_LO", "SEQ_HI", "SKIP_STATS")}
)
PREFILL_BASE = dict(
    HEAD_DIM=128, BLOCK_D=128, BLOCK_M=128, BLOCK_N=64, PACK=1, CAUSAL=True, SPARSE=False, LAYOUT_BLOCK_Q=128,
    LAYOUT_BLOCK_K=128, CAPACITY_POW2=256, HAS_COLS=False, HAS_SEQ_LENS=False, RETURN_LSE=False, OFFS_64=False,
    PREFETCH=True, SKIP=False, STATS=False, USE_TMA=False, LAZY_RESCALE=False,
)  # fmt: skip
PREFILL_CASES = {
    "dense_causal_d128": {},
    "dense_d64_padded_batch_lse": dict(HEAD_DIM=64, BLOCK_D=64, HAS_SEQ_LENS=True, RETURN_LSE=True),
    "dense_gqa_packed_int64": dict(PACK=6, OFFS_64=True, CAUSAL=False),
    "sparse_prefetch": dict(SPARSE=True),
    "sparse_columns_packed": dict(SPARSE=True, HAS_COLS=True, PACK=6),
    "skip_with_stats": dict(SPARSE=True, SKIP=True, STATS=True),
    # Tuning.tma / Tuning.lazy_rescale (issue 13): descriptors need BLOCK_D == HEAD_DIM
    "dense_causal_d128_tma": dict(USE_TMA=True),
    "dense_causal_d128_lazy": dict(LAZY_RESCALE=True),
    "dense_d64_tma_lazy_int64": dict(HEAD_DIM=64, BLOCK_D=64, USE_TMA=True, LAZY_RESCALE=True, OFFS_64=True),
    "sparse_tma_lazy": dict(SPARSE=True, USE_TMA=True, LAZY_RESCALE=True),
    "dense_128x128_tma_lazy": dict(BLOCK_N=128, CAUSAL=False, USE_TMA=True, LAZY_RESCALE=True),
    "dense_causal_d128_128x128": dict(BLOCK_N=128),  # the d = 128 default tile
}
DECODE_POINTERS = {n: "*bf16" for n in ("Q", "K", "V", "O")}
DECODE_POINTERS.update({n: "*fp32" for n in ("LSE", "O_PART", "LSE_PART")})
DECODE_POINTERS.update({n: "*i32" for n in ("SEQLENS", "PAGE_TABLE", "BLOCK_IDX", "BLOCK_CNT")})
DECODE_BASE = dict(HEAD_DIM=128, BLOCK_D=128, BLOCK_M=16, BLOCK_N=64, PAGED=False, PAGE_SIZE=1, SPARSE=False,
                   SPARSE_BLOCK=1, SPLIT=True, RETURN_LSE=False, PREFETCH=True)  # fmt: skip
DECODE_CASES = {
    "contiguous_split": {},
    "paged16_prefetch": dict(PAGED=True, PAGE_SIZE=16),
    "paged16_per_tile": dict(PAGED=True, PAGE_SIZE=16, PREFETCH=False),
    "paged64_final_lse": dict(PAGED=True, PAGE_SIZE=64, SPLIT=False, RETURN_LSE=True),
    "sparse_paged16": dict(PAGED=True, PAGE_SIZE=16, SPARSE=True, SPARSE_BLOCK=128),
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
UNIT_STRIDES |= {"stride_xc", "stride_ps", "stride_pk"}


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
    for name, extra in DECODE_CASES.items():
        out["decode/" + name] = (decode_split_kernel, {**DECODE_BASE, **extra}, DECODE_POINTERS, {"qk_scale"}, 4, 3)
    for name, consts in ANTIDIAG_CASES.items():
        out["scoring/" + name] = (_antidiag_kernel, consts, ANTIDIAG_POINTERS, {"qk_scale"}, 8, 3)
    select_ptrs = {"SCORES": "*fp32", "THR": "*fp32", "ALLOWED": "*u8", "FORCED": "*u8"}
    select_ptrs.update({"KV_NUM": "*i32", "KV_IDX": "*i32"})
    for name, consts in {"scalar_256": dict(PER_HEAD=False, EXTRA=0, BLOCK_K=256),
                         "per_head_extra_4096": dict(PER_HEAD=True, EXTRA=1, BLOCK_K=4096)}.items():  # fmt: skip
        out["select/" + name] = (_mass_select_kernel, consts, select_ptrs, {"thr_scalar"}, 4, 1)
    cover_ptrs = {"X": "*fp32", "TARGET": "*fp32", "SUMS": "*fp32", "COUNTS": "*i32"}
    cover_ptrs.update({"NGT": "*i32", "BAD": "*i32", "PREFIX": "*i32", "ABOVE": "*fp32", "COUNT_OUT": "*i64"})
    cover_ptrs["KEEP"] = "*u8"
    cover = dict(PER_ROW=False, CHUNK=CHUNK, SUB=SUB, CHUNK_TILE=CHUNK_TILE)
    scalar = {"target_scalar"}
    out["cover/round"] = (_cover_round_kernel, {**cover, "LAST": False}, cover_ptrs, scalar, 4, 3)
    out["cover/round_last_per_row"] = (
        _cover_round_kernel,
        {**cover, "LAST": True, "PER_ROW": True},
        cover_ptrs,
        scalar,
        4,
        3,
    )
    out["cover/write"] = (_cover_write_kernel, cover, cover_ptrs, scalar, 4, 3)
    means = dict(HEAD_DIM=128, BLOCK_D=128, BLOCK=128, ROWS=ROWS)
    means_ptrs = {"K": "*bf16", "PERM": "*i64", "OUT": "*fp32"}
    out["permuted_means/bf16_d128"] = (_permuted_block_means_kernel, means, means_ptrs, set(), 4, 3)
    flex_ptrs = {n: "*u8" for n in ("LINES", "COVER", "QUERY_AWARE", "ALLOWED", "FORCED", "IN_RANGE")}
    flex_ptrs.update({"GROUP": "*i64", "KV_NUM": "*i32", "KV_IDX": "*i32"})
    out["layout/flexprefill_512"] = (_flexprefill_layout_kernel, dict(BLOCK_K=512), flex_ptrs, set(), 4, 3)
    pbs_ptrs = {"PROBS": "*fp32", "SINK": "*i64", "EARLIER": "*u8", "OWN": "*u8", "KV_NUM": "*i32", "KV_IDX": "*i32"}
    for name, consts, warps in (("pbs_sink_1024", dict(FORCE_SINK=True, BLOCK_K=1024), 4),
                                ("pbs_no_sink_4096", dict(FORCE_SINK=False, BLOCK_K=4096), 8)):  # fmt: skip
        out["layout/" + name] = (_pbs_layout_kernel, consts, pbs_ptrs, {"threshold"}, warps, 3)
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
