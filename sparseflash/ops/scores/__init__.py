"""Scoring ops the selection patterns build on, each a Triton kernel with its PyTorch reference beside it.

* :mod:`.antidiagonal`: XAttention's antidiagonal estimate of the block masses;
* :mod:`.block_scores`: pooled per-block attention scores (max or mass) over the causal tiles;
* :mod:`.last_queries`: the last queries' attention summed along key columns (vertical) and diagonals (slash).
"""
