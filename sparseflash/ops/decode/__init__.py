"""Decoding over a (paged) KV cache: argument checks, the Triton split-KV kernels, the launcher and the reference.

* :mod:`.checks`: the decode arguments, checked before any launch;
* :mod:`.kernel`: the split and combine Triton kernels;
* :mod:`.launcher`: split-count heuristics, ``decode_forward`` and :func:`~sparseflash.decode_attention`;
* :mod:`.reference`: :func:`~sparseflash.decode_reference` in PyTorch.
"""
