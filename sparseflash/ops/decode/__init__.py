"""Decoding over a (paged) KV cache: argument checks, the Triton split-KV kernels, the launcher, the API, the reference.

* :mod:`.checks`: the decode arguments, checked before any launch;
* :mod:`.kernel`: the split Triton kernel, :mod:`.tile` its key-tile step (addresses, online softmax);
  :mod:`.combine`: the kernel merging its partial results;
* :mod:`.launcher`: split-count heuristics and ``decode_forward`` (validated inputs, no host sync);
* :mod:`.api`: :func:`~sparseflash.decode_attention`, the public entry point;
* :mod:`.reference`: :func:`~sparseflash.decode_reference` in PyTorch.
"""

from sparseflash.ops.decode.api import decode_attention

__all__ = ["decode_attention"]
