"""``permuted_block_sparse_attention``: causal attention over a :class:`~sparseflash.layouts.PermutedLayout`.

PBS-Attn's attention path (:mod:`sparseflash.layouts.permuted` explains the layout): two launches of the
block-sparse prefill, the kept blocks of earlier segments over ``K' = K[perm]``, ``V' = V[perm]`` and each row's
own segment over the original ``K``/``V``, merged exactly by log-sum-exp.
"""

from __future__ import annotations

from typing import Literal, overload

import torch

from sparseflash._validate import check_backend, check_grad, check_qkv, check_scale
from sparseflash.layouts import PermutedLayout
from sparseflash.ops.merge import merge_attention_states
from sparseflash.ops.prefill.launcher import sparse_forward


@overload
def permuted_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: PermutedLayout,
    *,
    scale: float | None = ...,
    return_lse: Literal[False] = ...,
    backend: str = ...,
) -> torch.Tensor: ...


@overload
def permuted_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: PermutedLayout,
    *,
    scale: float | None = ...,
    return_lse: Literal[True],
    backend: str = ...,
) -> tuple[torch.Tensor, torch.Tensor]: ...


@overload
def permuted_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: PermutedLayout,
    *,
    scale: float | None = ...,
    return_lse: bool = ...,
    backend: str = ...,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]: ...


def permuted_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: PermutedLayout,
    *,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Causal attention over a :class:`PermutedLayout`: output in the original query order.

    Two launches of the block-sparse prefill: (a) the kept blocks of earlier segments over ``K' = K[perm]``,
    ``V' = V[perm]`` (full blocks, no mask needed); (b) each row's own segment over the original ``K``/``V`` with
    the causal mask; then an exact log-sum-exp merge (:func:`sparseflash.ops.merge.merge_attention_states`). The
    gather reads and writes K and V once more.

    Args:
        q: (batch, num_heads, seq_len, head_dim). k, v: (batch, num_kv_heads, seq_len, head_dim).
        layout: from ``select('permuted', q, k)`` on the same q and k.
        scale: softmax scale, default ``1 / sqrt(head_dim)``.
        return_lse: also return the log-sum-exp (batch, num_heads, seq_len) float32.
        backend: 'auto', 'triton' or 'torch' (as for block_sparse_attention).

    Returns:
        out (batch, num_heads, seq_len, head_dim) in q's dtype, and lse with ``return_lse``.

    Raises:
        TypeError: bad tensors or a layout that is not a PermutedLayout.
        ValueError: a layout that does not fit q and k; inputs requiring grad on the Triton backend.
    """
    dims = check_qkv(q, k, v)
    if not isinstance(layout, PermutedLayout):
        raise TypeError(
            f"layout: expected a PermutedLayout (from select('permuted', q, k)), got {type(layout).__name__}"
        )
    scale = check_scale(scale, dims.head_dim)
    layout.validate(q, k, check_indices=False)
    backend = check_backend(backend, q.device)
    check_grad(backend, q=q, k=k, v=v)
    off, diag = layout.split()
    k_perm, v_perm = layout.permute(k), layout.permute(v)
    common = dict(causal=True, scale=scale, return_lse=True, backend=backend)
    out_a, lse_a = sparse_forward(q, k_perm, v_perm, off, **common)
    out_b, lse_b = sparse_forward(q, k, v, diag, **common)
    out, lse = merge_attention_states(out_a, lse_a, out_b, lse_b)
    return (out, lse) if return_lse else out
