"""``PermutedLayout``: PBS-Attn's layout, a :class:`~sparseflash.BlockLayout` over permuted keys plus the permutation.

PBS-Attn (arXiv:2510.21270; :mod:`sparseflash.patterns.pbs` selects it) reorders the keys *inside fixed
segments* so that each segment's important keys gather in few blocks. A ``PermutedLayout`` holds (composition,
not a subclass: its key-block ids do not index the original keys, so it is not a ``BlockLayout``):

* ``blocks``: a :class:`~sparseflash.BlockLayout` whose kept blocks mean, for query block ``I`` in segment
  ``seg(I)``:

  - ``seg(J) < seg(I)``: key block ``J`` **of the permuted keys** ``K' = K[perm]`` (full blocks: every key of an
    earlier segment precedes every query of a later one, so the order inside the segment does not matter);
  - ``seg(J) == seg(I)``, ``J <= I``: the diagonal segment in **original** order with the causal mask, the same
    keys as the whole permuted segment with the original-position mask, and exactly what is computed.

  So ``blocks`` is causal on the block grid, ``density()`` is the fraction of blocks computed, and the diagonal
  segment is always in.
* ``perm``: int64 ``(batch, perm_heads, seq_len_k)``; ``perm[b, h, p]`` is the original position of the key at
  slot ``p`` of ``K'`` (a permutation inside each segment); ``perm_heads`` is the number of query or KV heads.
* ``segment_size``: tokens per segment, a multiple of the key block size.

Run it with :func:`sparseflash.permuted_block_sparse_attention` (or :func:`sparseflash.block_sparse_attention`,
which hands it over); :meth:`PermutedLayout.token_mask` gives the equivalent token mask in original key order.
The sizes (``seq_len_q``, ``block_size``, ``num_heads``, ...), ``density()``, ``check_indices()`` and ``to()`` read
through to ``blocks``; anything that needs key-block ids in original order takes ``blocks`` explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparseflash.layouts.block import BlockLayout, causal_block_mask

DEFAULT_SEGMENT = 256


def inverse_perm(perm: torch.Tensor) -> torch.Tensor:
    """``slot`` with ``slot[..., perm[..., p]] = p``: where each original key sits in the permuted order."""
    positions = torch.arange(perm.shape[-1], device=perm.device).expand_as(perm)
    return torch.empty_like(perm).scatter_(-1, perm, positions)


@dataclass(frozen=True, eq=False, repr=False)
class PermutedLayout:
    """A :class:`~sparseflash.BlockLayout` over permuted keys with its permutation (module docstring).

    Attributes:
        blocks: the kept blocks; off-diagonal segments index ``K' = K[perm]``, the own segment the original keys.
        perm: int64 (batch, perm_heads, seq_len_k): ``perm[b, h, p]`` is the original position of the key
            at slot ``p`` of ``K'``; a permutation inside each segment. ``perm_heads`` is ``num_heads`` or
            ``num_kv_heads``.
        segment_size: tokens per segment, a multiple of the key block size.
    """

    blocks: BlockLayout
    perm: torch.Tensor
    segment_size: int = DEFAULT_SEGMENT

    def __post_init__(self) -> None:
        if not isinstance(self.blocks, BlockLayout):
            raise TypeError(f"blocks: expected a BlockLayout, got {type(self.blocks).__name__}")
        if self.blocks.has_columns:
            raise ValueError("blocks: expected a BlockLayout without token columns (PBS-Attn keeps whole blocks)")
        if not isinstance(self.perm, torch.Tensor):
            raise TypeError(f"perm: expected a torch.Tensor, got {type(self.perm).__name__}")
        if self.perm.dim() != 3 or self.perm.shape[0] != self.batch or self.perm.shape[2] != self.seq_len_k:
            raise ValueError(
                f"perm: expected shape ({self.batch}, perm_heads, {self.seq_len_k}), got {tuple(self.perm.shape)}"
            )
        if self.perm.dtype != torch.int64:
            raise TypeError(f"perm: expected dtype torch.int64, got {self.perm.dtype}")
        if self.seq_len_q != self.seq_len_k or self.block_size[0] != self.block_size[1]:
            raise ValueError(
                f"PermutedLayout: expected seq_len_q == seq_len_k and square blocks, got "
                f"({self.seq_len_q}, {self.seq_len_k}) and {self.block_size}"
            )
        if self.segment_size < 1 or self.segment_size % self.block_size[1]:
            raise ValueError(
                f"segment_size: expected a positive multiple of block size {self.block_size[1]}, "
                f"got {self.segment_size}"
            )

    # ------------------------------------------------------------ sizes, read through to the blocks
    @property
    def seq_len_q(self) -> int:
        return self.blocks.seq_len_q

    @property
    def seq_len_k(self) -> int:
        return self.blocks.seq_len_k

    @property
    def block_size(self) -> tuple[int, int]:
        return self.blocks.block_size

    @property
    def batch(self) -> int:
        return self.blocks.batch

    @property
    def num_heads(self) -> int:
        return self.blocks.num_heads

    @property
    def num_q_blocks(self) -> int:
        return self.blocks.num_q_blocks

    @property
    def num_k_blocks(self) -> int:
        return self.blocks.num_k_blocks

    @property
    def device(self) -> torch.device:
        return self.blocks.device

    @property
    def nbytes(self) -> int:
        """Bytes of block metadata held (counts and indices, as :attr:`BlockLayout.nbytes`)."""
        return self.blocks.nbytes

    def density(self, *, causal: bool = True) -> float:
        """Blocks computed over causal blocks (:meth:`BlockLayout.density` of :attr:`blocks`)."""
        return self.blocks.density(causal=causal)

    def check_indices(self) -> None:
        """:meth:`BlockLayout.check_indices` of :attr:`blocks`."""
        self.blocks.check_indices()

    def to(self, device: torch.device | str) -> PermutedLayout:
        return PermutedLayout(self.blocks.to(device), self.perm.to(device), self.segment_size)

    def __repr__(self) -> str:
        return f"PermutedLayout({self.blocks!r}, segment_size={self.segment_size}, perm_heads={self.perm.shape[1]})"

    # ------------------------------------------------------------------------------------- checking
    def validate(self, q: torch.Tensor, k: torch.Tensor, *, check_indices: bool = True) -> None:
        """:meth:`BlockLayout.validate` of :attr:`blocks`, then ``perm``; q ``(B, Hq, S, D)``, k ``(B, Hkv, S, D)``.

        Raises:
            ValueError: a layout or permutation that does not fit q and k.
        """
        self.blocks.validate(q, k, check_indices=check_indices)
        batch, num_heads, num_kv_heads, seq_len_k = q.shape[0], q.shape[1], k.shape[1], k.shape[2]
        if self.perm.shape[1] not in (num_heads, num_kv_heads) or self.perm.shape[0] != batch:
            raise ValueError(
                f"layout.perm: expected shape ({batch}, {num_heads} or {num_kv_heads}, {seq_len_k}), "
                f"got {tuple(self.perm.shape)}"
            )
        if self.perm.device != q.device:
            raise ValueError(f"layout.perm: expected device {q.device} (from q), got {self.perm.device}")

    # ------------------------------------------------------------------------------- the two launches
    def segments_of_blocks(self) -> torch.Tensor:
        """int64 (Kb,): the segment of each (key or query) block."""
        blocks_per_segment = self.segment_size // self.block_size[1]
        return torch.arange(self.num_k_blocks, device=self.device) // blocks_per_segment

    def split(self) -> tuple[BlockLayout, BlockLayout]:
        """The two launches: ``(off, diag)``.

        ``off``: the kept blocks of earlier segments, over ``K'`` (same heads as this layout);
        ``diag``: the causal blocks of each row's own segment, over the original ``K`` (one shared head).
        """
        seg = self.segments_of_blocks()
        allowed = causal_block_mask(self.seq_len_q, self.seq_len_k, self.block_size, device=self.device)
        same = (seg[:, None] == seg[None, :]) & allowed
        dims = dict(seq_len_q=self.seq_len_q, seq_len_k=self.seq_len_k, block_size=self.block_size)
        off = BlockLayout.from_dense(self.blocks.to_dense() & (seg[:, None] > seg[None, :]), **dims)
        return off, BlockLayout.from_dense(same[None, None], **dims)

    def permute(self, x: torch.Tensor) -> torch.Tensor:
        """Keys or values in permuted order: x (batch, heads, seq_len_k, dim) -> (batch, perm_heads, seq_len_k, dim).

        ``heads`` must divide ``perm_heads`` (a KV tensor is expanded to the query heads when the
        permutation is per query head).
        """
        perm_heads = self.perm.shape[1]
        if x.dim() != 4 or x.shape[2] != self.seq_len_k or perm_heads % x.shape[1]:
            raise ValueError(
                f"x: expected shape ({self.batch}, heads dividing {perm_heads}, {self.seq_len_k}, dim), "
                f"got {tuple(x.shape)}"
            )
        if x.shape[1] != perm_heads:
            x = x.repeat_interleave(perm_heads // x.shape[1], dim=1)
        return x.gather(2, self.perm.unsqueeze(-1).expand(-1, -1, -1, x.shape[3]))

    def token_mask(self, rows: range | None = None) -> torch.Tensor:
        """Equivalent mask in original key order: bool (batch, num_heads, len(rows), seq_len_k).

        Query ``i`` attends key ``j`` iff ``j <= i`` and (``j`` is in ``i``'s segment, or the block of ``K'``
        holding ``j`` is kept for ``i``'s block). For tests and exact recall, in row chunks.
        """
        rows = range(self.seq_len_q) if rows is None else rows
        block = self.block_size[0]
        heads = self.num_heads
        perm = self.perm
        if perm.shape[1] != heads:  # per-KV-head permutation shared by the group of each query head
            perm = perm.repeat_interleave(heads // perm.shape[1], dim=1)
        slot = inverse_perm(perm)  # slot[j]: where original key j sits in K'
        i = torch.arange(rows.start, rows.stop, device=self.device)
        j = torch.arange(self.seq_len_k, device=self.device)
        seg_i, seg_j = i // self.segment_size, j // self.segment_size
        dense = self.blocks.to_dense().expand(self.batch, heads, -1, -1)  # (B, H, Qb, Kb)
        kept = dense[:, :, i // block, :].gather(-1, (slot // block)[:, :, None, :].expand(-1, -1, len(i), -1))
        own = (seg_j[None, :] == seg_i[:, None]) & (j[None, :] <= i[:, None])
        earlier = seg_j[None, :] < seg_i[:, None]
        return own | (earlier & kept)


__all__ = ["DEFAULT_SEGMENT", "PermutedLayout", "inverse_perm"]
