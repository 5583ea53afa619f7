"""``block_sparse_attention``: attention over the (query block, key block) tiles a layout keeps."""

from __future__ import annotations

from typing import Literal, overload

import torch

from sparseflash._validate import check_backend, check_grad, check_qkv, check_scale, check_seq_lens, check_skip
from sparseflash.layouts import BlockLayout, PermutedLayout
from sparseflash.ops.prefill.launcher import sparse_forward
from sparseflash.ops.prefill.permuted import permuted_block_sparse_attention


@overload
def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout | PermutedLayout,
    *,
    causal: bool = ...,
    scale: float | None = ...,
    return_lse: Literal[False] = ...,
    seq_lens: torch.Tensor | None = ...,
    padding_side: str = ...,
    check_indices: bool = ...,
    pack_gqa: bool | None = ...,
    backend: str = ...,
    skip_threshold: float | None = ...,
    skip_stats: torch.Tensor | None = ...,
) -> torch.Tensor: ...


@overload
def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout | PermutedLayout,
    *,
    causal: bool = ...,
    scale: float | None = ...,
    return_lse: Literal[True],
    seq_lens: torch.Tensor | None = ...,
    padding_side: str = ...,
    check_indices: bool = ...,
    pack_gqa: bool | None = ...,
    backend: str = ...,
    skip_threshold: float | None = ...,
    skip_stats: torch.Tensor | None = ...,
) -> tuple[torch.Tensor, torch.Tensor]: ...


@overload
def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout | PermutedLayout,
    *,
    causal: bool = ...,
    scale: float | None = ...,
    return_lse: bool = ...,
    seq_lens: torch.Tensor | None = ...,
    padding_side: str = ...,
    check_indices: bool = ...,
    pack_gqa: bool | None = ...,
    backend: str = ...,
    skip_threshold: float | None = ...,
    skip_stats: torch.Tensor | None = ...,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]: ...


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout | PermutedLayout,
    *,
    causal: bool = True,
    scale: float | None = None,
    return_lse: bool = False,
    seq_lens: torch.Tensor | None = None,
    padding_side: str = "right",
    check_indices: bool = True,
    pack_gqa: bool | None = None,
    backend: str = "auto",
    skip_threshold: float | None = None,
    skip_stats: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention that computes only the blocks ``layout`` keeps; time scales with the kept fraction.

    Same tensor conventions as :func:`sparseflash.flash_attention` (q (B, Hq, Sq, D), k/v (B, Hkv, Sk, D),
    GQA, bottom-right causal, fp16/bf16, head dims 16-256).

    Args:
        layout: a :class:`sparseflash.BlockLayout` built for (Sq, Sk), batch 1 or B, heads 1, Hkv or Hq.
            The causal mask (and the sequence ends) are applied inside the blocks that need it only. A
            ``PermutedLayout`` (PBS-Attn) runs through :func:`sparseflash.permuted_block_sparse_attention`.
            A layout with token columns (:func:`sparseflash.layouts.with_columns`) also attends each query
            block's single key columns, gathered after its blocks, under the same causal / sequence-end mask;
            ``check_indices`` then also checks that no column lies inside a kept block.
        seq_lens: optional int32 (B,) valid lengths of a padded batch (Sq == Sk); each sequence may have its
            own layout (layout batch B). Padded tokens neither attend nor are attended. Its values are checked
            on the host (one sync).
        check_indices: check the layout's index values before launch (one host sync); turn off for layouts
            from sparseflash's own patterns inside a captured graph.
        pack_gqa: pack the query heads of a GQA group into one tile so each K/V tile load serves the group
            (default: on for a layout shared by the group and a power-of-two group size).
        backend: 'auto' (Triton on CUDA, PyTorch on CPU), 'triton' or 'torch'. The PyTorch path gathers the
            kept key blocks of each query block (float32, a few query blocks at a time): its work scales with
            the kept fraction too. It reads the block counts on the host (one sync).
        skip_threshold: None (default: the kept blocks, exactly) or a finite float >= 0: in-kernel block
            skipping on top of the layout, as :func:`sparseflash.flash_attention` documents it. Here a
            program visits its query block's kept key blocks in the layout's order (ascending ids), each cut
            into tiles of the kernel's key width; blocks needing the causal / sequence-end mask come last and
            are never skipped. With ``pack_gqa`` a program's rows span the heads of a GQA group, and the
            decision is taken over all of them. The PyTorch path replays the same walk (float32). Not
            supported with a ``PermutedLayout`` or a layout with token columns.
        skip_stats: optional int32 ``(2,)`` tensor on q's device (with ``skip_threshold`` only): key tiles
            skipped and visited are added to ``skip_stats[0]`` and ``skip_stats[1]``.

    Autograd: only the 'torch' backend is differentiable. The Triton kernels have no backward, so a call that
    would build a graph on them (grad mode on and an input with ``requires_grad``) raises ``ValueError``: wrap
    inference in ``torch.no_grad()`` or pass ``backend='torch'``.

    Non-finite inputs: dropped blocks are never read, and NaN/inf in padding or in keys past a row's causal
    horizon never reach that row; a row attending a non-finite value comes out non-finite.

    Returns:
        out (B, Hq, Sq, D) in q's dtype, and with ``return_lse`` lse (B, Hq, Sq) float32. A row with no kept
        block (or no allowed key in its kept blocks) gives 0 and lse -inf.

    Raises:
        TypeError: bad tensor types/dtypes, or a layout that is not a BlockLayout (``None`` included: use
            :func:`sparseflash.flash_attention` for dense attention).
        ValueError: shape/device mismatches, a layout that does not fit q and k, bad skip_threshold /
            skip_stats (or either with a PermutedLayout or token columns), and inputs requiring grad on the
            Triton backend.
    """
    dims = check_qkv(q, k, v)
    skip_threshold = check_skip(skip_threshold, skip_stats, q.device)
    if isinstance(layout, PermutedLayout):  # its key blocks index permuted keys: PBS-Attn's own two-pass path
        if skip_threshold is not None:
            raise ValueError(
                f"skip_threshold: expected None with a PermutedLayout (PBS-Attn's two-pass path), got {skip_threshold}"
            )
        if not causal or seq_lens is not None:
            raise ValueError(
                "layout: a PermutedLayout (PBS-Attn) supports causal attention without seq_lens, "
                f"got causal={causal}, seq_lens={'given' if seq_lens is not None else None}"
            )
        return permuted_block_sparse_attention(q, k, v, layout, scale=scale, return_lse=return_lse, backend=backend)
    if not isinstance(layout, BlockLayout):
        raise TypeError(
            f"layout: expected a sparseflash.BlockLayout (use flash_attention for dense attention), "
            f"got {type(layout).__name__}"
        )
    scale = check_scale(scale, dims.head_dim)
    check_seq_lens(seq_lens, dims, q.device, padding_side)
    layout.validate(q, k, check_indices=check_indices)
    if skip_threshold is not None and layout.has_columns:
        raise ValueError(
            f"skip_threshold: expected None with a layout that has token columns (col_counts/col_indices), got "
            f"{skip_threshold}"
        )
    backend = check_backend(backend, q.device)
    check_grad(backend, q=q, k=k, v=v)
    out, lse = sparse_forward(
        q,
        k,
        v,
        layout,
        causal=causal,
        scale=scale,
        seq_lens=seq_lens,
        padding_side=padding_side,
        return_lse=return_lse,
        pack_gqa=pack_gqa,
        backend=backend,
        skip_threshold=skip_threshold,
        skip_stats=skip_stats,
    )
    return (out, lse) if return_lse else out
