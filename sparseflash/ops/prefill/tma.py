"""TMA loads of K and V in the prefill kernel (``Tuning.tma``): when they apply, and the pieces they need.

With ``USE_TMA`` the kernel (:mod:`.kernel`) makes two device-side tensor descriptors per program
(:func:`.tile.kv_sources`), one over the ``(S_K, D)`` keys and one over the values of its (batch, KV head), and its
unmasked key tiles (:func:`.tile._attend_tile` with ``MASKED=False``) load ``[BLOCK_N, D]`` tiles through them: the
Hopper copy engine writes them to shared memory, no per-thread addresses. Masked tiles (causal diagonal, sequence
end, padding, the NaN guard) and gathered token columns keep pointer loads, so a descriptor never reaches past
``S_K`` or into padding.

Requirements (:func:`tma_usable`; otherwise the launcher keeps the pointer path): a CUDA device of compute
capability 9 or newer, or CPU tensors under ``TRITON_INTERPRET=1`` (Triton 3.6's interpreter runs descriptors);
the head dim a power of two (``BLOCK_D == HEAD_DIM``, at least 16 bytes); K and V with unit last-dim stride, a
16-byte aligned base and 16-byte multiple strides (so each head's base is aligned too). Offsets: the descriptor
takes the head's base pointer, computed in int64 as the pointer path does; its row stride is an int64 (Triton
widens the strides of ``tl.make_tensor_descriptor``), so ``S_K * stride_ks`` past int32 is safe; the hardware
bounds (row stride below 2**40 bytes, ``S_K`` below 2**31) are checked.

Device-side descriptors are written to a global scratch buffer at launch, which Triton takes from the allocator of
``triton.set_allocator``. :func:`ensure_allocator` installs a PyTorch one (int8 buffers on the current CUDA
device, the one Triton launches on, stream-ordered by PyTorch's caching allocator) when none is set; the
launcher calls it only for launches that use TMA, and a user's own allocator is left in place.
"""

from __future__ import annotations

import torch
import triton

from sparseflash.ops._triton_env import interpreting

_MAX_ROW_STRIDE_BYTES = 2**40  # TMA: global strides below 2**40 bytes
_MAX_ROWS = 2**31 - 1  # descriptor shapes are int32


def tma_usable(k: torch.Tensor, v: torch.Tensor, head_dim: int) -> bool:
    """Whether the kernel may load ``k`` and ``v`` ``(B, H, S, D)`` through TMA descriptors (see the module)."""
    if k.device.type == "cuda":
        if torch.cuda.get_device_capability(k.device)[0] < 9:
            return False
    elif not (k.device.type == "cpu" and interpreting()):
        return False
    size = k.element_size()
    if head_dim & (head_dim - 1) or head_dim * size < 16 or head_dim > 256 or k.shape[2] > _MAX_ROWS:
        return False
    for t in (k, v):
        if t.stride(3) != 1 or t.data_ptr() % 16:
            return False
        if t.stride(2) * size % 16 or t.stride(2) * size >= _MAX_ROW_STRIDE_BYTES:
            return False
        # batch and head strides place each head's base: they matter only where there is more than one
        if any(n > 1 and s * size % 16 for n, s in zip(t.shape[:2], t.stride()[:2], strict=True)):
            return False
    return True


def _torch_scratch(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    """Triton's allocator protocol: ``size`` bytes on the current CUDA device (PyTorch aligns to 512 bytes)."""
    del alignment, stream  # PyTorch's blocks are 512-byte aligned; the current stream is the launch's
    return torch.empty(size, dtype=torch.int8, device="cuda")


def ensure_allocator() -> None:
    """Install :func:`_torch_scratch` as Triton's allocator unless one is already set (in this context)."""
    try:
        from triton.runtime._allocation import NullAllocator, _allocator
    except ImportError:  # pragma: no cover - another Triton layout: set ours
        triton.set_allocator(_torch_scratch)
        return
    if isinstance(_allocator.get(), NullAllocator):
        triton.set_allocator(_torch_scratch)
