"""Prefill attention: the Triton kernel, its launcher, the PyTorch reference and the public entry points.

* :mod:`.kernel`: the Triton kernel (dense and block-sparse, one kernel); :mod:`.tile`: its key-tile step,
  with optional in-kernel block skipping (``skip_threshold``);
* :mod:`.launcher`: tiles, GQA packing, longest-first order, int64 offsets (``prefill_forward``);
* :mod:`.reference`: the float64 PyTorch reference and the masked-softmax CPU path; :mod:`.reference_skip`:
  the kernel's tile walk with block skipping, replayed in PyTorch (reference and CPU path of ``skip_threshold``);
* :mod:`.dense`: :func:`~sparseflash.flash_attention`; :mod:`.block_sparse`:
  :func:`~sparseflash.block_sparse_attention`; :mod:`.dropped_blocks`: pooled dropped blocks.
"""
