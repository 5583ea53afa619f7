"""Prefill attention: the Triton kernel, its launcher, the PyTorch reference and the public entry points.

* :mod:`.kernel`: the Triton kernel (dense and block-sparse, one kernel);
* :mod:`.launcher`: tiles, GQA packing, longest-first order, int64 offsets (``prefill_forward``);
* :mod:`.reference`: the float64 PyTorch reference and the masked-softmax CPU path;
* :mod:`.dense`: :func:`~sparseflash.flash_attention`; :mod:`.block_sparse`:
  :func:`~sparseflash.block_sparse_attention`; :mod:`.dropped_blocks`: pooled dropped blocks.
"""
