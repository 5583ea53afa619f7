"""Block layouts: which (query block, key block) tiles a block-sparse attention computes.

* :mod:`~sparseflash.layouts.block`: :class:`BlockLayout` (the FlexAttention ``BlockMask`` convention), which every
  pattern returns and every sparse kernel takes, and the causal block geometry;
* :mod:`~sparseflash.layouts.permuted`: :class:`PermutedLayout` (PBS-Attn), a ``BlockLayout`` over permuted keys
  together with the permutation (composition: it is not a ``BlockLayout``).
"""

from sparseflash.layouts.block import (
    DEFAULT_BLOCK_SIZE,
    SUPPORTED_BLOCK_SIZES,
    BlockLayout,
    block_bounds,
    causal_block_mask,
    dense_layout,
    full_block_mask,
)
from sparseflash.layouts.columns import with_columns
from sparseflash.layouts.permuted import PermutedLayout

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "SUPPORTED_BLOCK_SIZES",
    "BlockLayout",
    "PermutedLayout",
    "block_bounds",
    "causal_block_mask",
    "dense_layout",
    "full_block_mask",
    "with_columns",
]
