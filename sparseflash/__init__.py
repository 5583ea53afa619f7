"""sparseflash: exact and block-sparse long-context attention for PyTorch, in Triton.

Public API:
    flash_attention          exact prefill attention (dense)
    block_sparse_attention   prefill attention over the blocks a BlockLayout keeps
    BlockLayout              the block layout every pattern returns and every kernel takes
    attention_reference      the plain-PyTorch reference (explicit mask, float64)
"""

from sparseflash.layout import BlockLayout, causal_block_mask, dense_layout
from sparseflash.ops.block_sparse import block_sparse_attention
from sparseflash.ops.dense import flash_attention
from sparseflash.ops.reference import attention_reference

__version__ = "0.1.0"

__all__ = [
    "BlockLayout",
    "attention_reference",
    "block_sparse_attention",
    "causal_block_mask",
    "dense_layout",
    "flash_attention",
]
