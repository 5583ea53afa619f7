"""Input checks shared by every public entry point.

Every check raises before any kernel launch, with a message of the form
``<argument>: expected <what>, got <what>`` so a user sees which tensor is wrong and why.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
GPU_DTYPES = (torch.float16, torch.bfloat16)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # what the patterns read
MIN_HEAD_DIM = 16
MAX_HEAD_DIM = 256
# largest softmax scale accepted: float16 logits (|q.k| < 2**40 at head_dim 256) times it stay far below float32's
# 3.4e38, and no model uses more than a few hundred
MAX_SCALE = 1e18


class AttentionDims(NamedTuple):
    """Sizes shared by q, k and v in the (batch, heads, seq_len, head_dim) layout."""

    batch: int
    num_heads: int
    num_kv_heads: int
    seq_len_q: int
    seq_len_k: int
    head_dim: int

    @property
    def group_size(self) -> int:
        """Query heads per KV head (1 for MHA, num_heads for MQA)."""
        return self.num_heads // self.num_kv_heads


def check_tensor(name: str, t: object, *, ndim: int | None = None) -> torch.Tensor:
    """Check that ``t`` is a tensor of the given rank; return it."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got {t.dim()}-D with shape {tuple(t.shape)}")
    return t


def check_head_dim(name: str, head_dim: int) -> None:
    """Head dims the kernels support: multiples of 8 in [16, 256]."""
    if head_dim % 8 != 0 or not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(
            f"{name}: expected head_dim a multiple of 8 in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}] "
            f"(64, 128 and 256 are the tuned ones), got {head_dim}"
        )


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> AttentionDims:
    """Validate q ``(B, Hq, Sq, D)``, k and v ``(B, Hkv, Sk, D)`` and return their sizes.

    Raises:
        TypeError: a non-tensor, a non-floating dtype, or q/k/v dtypes that differ.
        ValueError: wrong rank, mismatched batch/head_dim/kv shapes/devices, Hq not a multiple of Hkv,
            an unsupported head dim, or an empty dimension.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=4)
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name}: expected dtype float16, bfloat16 or float32, got {t.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"k, v: expected dtype {q.dtype} (from q), got k {k.dtype} and v {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"k, v: expected device {q.device} (from q), got k {k.device} and v {v.device}")
    batch, num_heads, seq_len_q, head_dim = q.shape
    _, num_kv_heads, seq_len_k, _ = k.shape
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(
            f"k: expected shape ({batch}, num_kv_heads, seq_len_k, {head_dim}) (batch and head_dim from q), "
            f"got {tuple(k.shape)}"
        )
    if v.shape != k.shape:
        raise ValueError(f"v: expected shape {tuple(k.shape)} (from k), got {tuple(v.shape)}")
    if num_kv_heads == 0 or num_heads % num_kv_heads != 0:
        raise ValueError(
            f"q: expected num_heads a multiple of k's num_kv_heads={num_kv_heads} (GQA/MQA), got {num_heads}"
        )
    if min(batch, num_heads, seq_len_q, seq_len_k) == 0:
        raise ValueError(
            f"q, k: expected non-empty batch, heads and sequence dims, got q {tuple(q.shape)}, k {tuple(k.shape)}"
        )
    check_head_dim("q", head_dim)
    return AttentionDims(batch, num_heads, num_kv_heads, seq_len_q, seq_len_k, head_dim)


def check_qk(name: str, q: object, k: object) -> tuple[int, int, int, int, int, int]:
    """Validate q ``(B, Hq, Sq, D)`` and k ``(B, Hkv, Sk, D)`` for pattern ``name``.

    Returns:
        ``(batch, num_heads, num_kv_heads, seq_len_q, seq_len_k, head_dim)``.

    Raises:
        TypeError: a non-tensor or a non-floating dtype.
        ValueError: wrong rank, mismatched batch/head_dim/device, Hq not a multiple of Hkv, empty dims.
    """
    for arg, t in (("q", q), ("k", k)):
        check_tensor(arg, t, ndim=4)
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name}: {arg}: expected a floating dtype (float16, bfloat16, float32), got {t.dtype}")
    batch, num_heads, seq_len_q, head_dim = q.shape
    num_kv_heads, seq_len_k = k.shape[1], k.shape[2]
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(
            f"{name}: k: expected shape ({batch}, num_kv_heads, seq_len_k, {head_dim}) (batch and head_dim "
            f"from q), got {tuple(k.shape)}"
        )
    if k.device != q.device:
        raise ValueError(f"{name}: k: expected device {q.device} (from q), got {k.device}")
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise ValueError(
            f"{name}: q: expected num_heads a multiple of k's num_kv_heads={num_kv_heads}, got {num_heads}"
        )
    if min(batch, num_heads, seq_len_q, seq_len_k, head_dim) == 0:
        raise ValueError(f"{name}: q, k: expected non-empty dims, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    return batch, num_heads, num_kv_heads, seq_len_q, seq_len_k, head_dim


def check_scale(scale: float | None, head_dim: int) -> float:
    """Return the softmax scale: ``scale`` or ``1/sqrt(head_dim)``.

    The logits ``q.k * scale`` are formed in float32, so a scale above :data:`MAX_SCALE` (or one that is not a
    finite float32) is refused: it overflows them to inf for ordinary inputs and the softmax turns to NaN.
    """
    if scale is None:
        return head_dim**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale: expected a float or None, got {type(scale).__name__}")
    if not 0 < scale <= MAX_SCALE:  # False for NaN too
        raise ValueError(
            f"scale: expected a finite positive float of at most {MAX_SCALE:g} (larger ones can overflow the float32 "
            f"logits q.k * scale), got {scale}"
        )
    return float(scale)


def check_grad(backend: str, **tensors: torch.Tensor) -> None:
    """Refuse a call that builds an autograd graph on the Triton backend (its kernels have no backward)."""
    if backend != "triton" or not torch.is_grad_enabled():
        return
    needing = [name for name, t in tensors.items() if t is not None and t.requires_grad]
    if needing:
        raise ValueError(
            f"{', '.join(needing)}: expected no requires_grad with grad mode on for the Triton backend "
            "(sparseflash kernels have no backward; use torch.no_grad() or backend='torch'), got requires_grad=True"
        )


def check_seq_lens(seq_lens: torch.Tensor | None, dims: AttentionDims, device: torch.device, padding_side: str) -> None:
    """Validate per-sequence valid lengths ``(B,)`` int32 for right- or left-padded batches."""
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side: expected 'right' or 'left', got {padding_side!r}")
    if seq_lens is None:
        return
    check_tensor("seq_lens", seq_lens, ndim=1)
    if seq_lens.dtype != torch.int32:
        raise TypeError(f"seq_lens: expected dtype torch.int32, got {seq_lens.dtype}")
    if seq_lens.shape[0] != dims.batch:
        raise ValueError(f"seq_lens: expected shape ({dims.batch},) (batch from q), got {tuple(seq_lens.shape)}")
    if seq_lens.device != device:
        raise ValueError(f"seq_lens: expected device {device} (from q), got {seq_lens.device}")
    if dims.seq_len_q != dims.seq_len_k:
        raise ValueError(
            "seq_lens: padded batches need self-attention prefill with seq_len_q == seq_len_k, "
            f"got seq_len_q={dims.seq_len_q}, seq_len_k={dims.seq_len_k}"
        )
    lo, hi = int(seq_lens.min()), int(seq_lens.max())
    if lo < 0 or hi > dims.seq_len_k:
        raise ValueError(f"seq_lens: expected values in [0, {dims.seq_len_k}], got min {lo}, max {hi}")


def check_backend(backend: str, device: torch.device) -> str:
    """Resolve ``backend`` ('auto', 'triton' or 'torch') for tensors on ``device``."""
    from sparseflash.ops._triton_env import triton_runs_on

    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend: expected 'auto', 'triton' or 'torch', got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and not triton_runs_on(device):
        raise ValueError(
            f"backend: 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got device {device}"
        )
    return backend


def check_skip(skip_threshold: object, skip_stats: object, device: torch.device) -> float | None:
    """Validate block skipping's options: ``skip_threshold`` None or a finite float >= 0 (natural log), and
    ``skip_stats`` None or an int32 ``(2,)`` contiguous counter on ``device`` (only with a threshold).

    Returns the threshold as a float (or None). Raises ``ValueError`` naming the argument, with what it got.
    """
    import math
    import numbers

    if skip_threshold is not None and (
        isinstance(skip_threshold, bool)
        or not isinstance(skip_threshold, numbers.Real)
        or not math.isfinite(skip_threshold)
        or skip_threshold < 0
    ):
        raise ValueError(f"skip_threshold: expected a finite float >= 0 or None, got {skip_threshold!r}")
    if skip_stats is not None:
        if skip_threshold is None:
            raise ValueError("skip_stats: expected None without a skip_threshold, got a tensor")
        if not isinstance(skip_stats, torch.Tensor) or skip_stats.dtype != torch.int32 or skip_stats.shape != (2,):
            got = (
                f"{skip_stats.dtype} {tuple(skip_stats.shape)}"
                if isinstance(skip_stats, torch.Tensor)
                else type(skip_stats).__name__
            )
            raise ValueError(f"skip_stats: expected an int32 tensor of shape (2,) or None, got {got}")
        if skip_stats.device != device or not skip_stats.is_contiguous():
            raise ValueError(
                f"skip_stats: expected a contiguous tensor on {device} (from q), got device {skip_stats.device}, "
                f"stride {skip_stats.stride()}"
            )
    return None if skip_threshold is None else float(skip_threshold)
