"""sparseflash: exact and block-sparse long-context attention for PyTorch, in Triton.

Public API:
    flash_attention                   exact prefill attention (dense)
    block_sparse_attention            prefill attention over the blocks a BlockLayout keeps
    decode_attention                  split-KV decoding over a (paged) KV cache, dense or sparse
    BlockLayout                       the block layout every pattern returns and every kernel takes
    patterns                          the selection methods, by name (``patterns.select(name, q, k)``)
    attention_recall, density         accuracy proxy and cost of a layout
    permuted_block_sparse_attention   PBS-Attn's permuted path (with ``patterns.select("permuted", ...)``)
    patch, unpatch, patched           turn a transformers model into a sparse-prefill model (needs transformers)
    calibrate, load_calibration       per-layer / per-head thresholds reaching a target recall (``patch(calibration=)``)
    attention_reference, decode_reference, merge_attention_states   PyTorch references and helpers
"""

from sparseflash import patterns
from sparseflash.calibration import calibrate, load_calibration
from sparseflash.integrations.hf import is_patched, patch, patched, unpatch
from sparseflash.layouts import BlockLayout, PermutedLayout, causal_block_mask, dense_layout
from sparseflash.metrics import attention_recall, density
from sparseflash.ops.decode.api import decode_attention
from sparseflash.ops.decode.reference import decode_reference
from sparseflash.ops.merge import merge_attention_states
from sparseflash.ops.prefill.block_sparse import block_sparse_attention
from sparseflash.ops.prefill.dense import flash_attention
from sparseflash.ops.prefill.permuted import permuted_block_sparse_attention
from sparseflash.ops.prefill.reference import attention_reference

__version__ = "0.1.0"

__all__ = [
    "BlockLayout",
    "PermutedLayout",
    "attention_recall",
    "attention_reference",
    "block_sparse_attention",
    "calibrate",
    "causal_block_mask",
    "decode_attention",
    "decode_reference",
    "dense_layout",
    "density",
    "flash_attention",
    "is_patched",
    "load_calibration",
    "merge_attention_states",
    "patch",
    "patched",
    "patterns",
    "permuted_block_sparse_attention",
    "unpatch",
]
