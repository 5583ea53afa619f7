"""``BlockLayout``: which (query block, key block) tiles a block-sparse attention computes.

Every pattern in :mod:`sparseflash.patterns` returns one; :func:`sparseflash.block_sparse_attention` and the
sparse decode consume it.

Format (the FlexAttention ``BlockMask`` convention, compressed rows):

* ``kv_num_blocks`` int32 ``(B, H, Qb)``: how many key blocks query block ``I`` keeps;
* ``kv_indices`` int32 ``(B, H, Qb, C)``: their key-block ids, strictly ascending in the first
  ``kv_num_blocks[b, h, I]`` entries; the rest of the row is ignored. ``C <= Kb`` is the row capacity, so a
  top-k pattern keeping at most 16 blocks per row stores ``C = 16`` instead of ``Kb``;
* ``B`` is 1 (shared by the batch) or the batch; ``H`` is 1, the number of KV heads (one layout shared by a
  GQA group, so the group's query heads read K/V once) or the number of query heads;
* ``block_size = (block_q, block_k)``, 128 x 128 by default, 64 supported; ``Qb = ceil(Sq / block_q)``,
  ``Kb = ceil(Sk / block_k)`` for the ``seq_len_q``/``seq_len_k`` it was built for.

Full and partial blocks: FlexAttention stores blocks that need no element mask ("full") apart from those that
do ("partial"). sparseflash's only element masks are the causal diagonal and the sequence ends, both decided by
position, so one ordered list suffices: the kernel applies the mask exactly on the blocks that need it (a
suffix of each ordered row). :meth:`split_full` computes Flex's split, :meth:`to_flex` hands it over and
:meth:`from_flex` merges it back.

Token columns (MInference's vertical lines, optional: ``col_counts``/``col_indices``): single key positions a
query block keeps besides its blocks; :mod:`sparseflash.layouts.columns` describes them.

Memory is metadata only, never an ``Sq x Sk`` tensor: at 128K tokens with 128 x 128 blocks
(``Qb = Kb = 1024``), a full-capacity per-query-head layout for 32 heads holds
``32 * 1024 * 1024 * 4 B = 128 MiB`` of indices plus 128 KiB of counts; per KV head (8) it is 32 MiB, and a
top-k layout with ``C = 64`` needs 8 MiB (per query head) or 2 MiB (per KV head).

Example (dense round trip)::

    mask = torch.tensor([[1, 0], [1, 1]], dtype=torch.bool)[None, None]  # (1, 1, Qb=2, Kb=2)
    layout = BlockLayout.from_dense(mask, seq_len_q=256, seq_len_k=256)
    layout.kv_num_blocks  # tensor([[[1, 2]]], dtype=torch.int32)
    layout.kv_indices     # tensor([[[[0, 1], [0, 1]]]], dtype=torch.int32); row 0's second entry unused
    assert torch.equal(layout.to_dense(), mask)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sparseflash._validate import check_tensor
from sparseflash.layouts import columns
from sparseflash.layouts.geometry import (  # noqa: F401  (block sizes and geometry: re-exported for layouts/)
    DEFAULT_BLOCK_SIZE,
    SUPPORTED_BLOCK_SIZES,
    _cdiv,
    _check_block_size,
    block_bounds,
    causal_block_mask,
    full_block_mask,
)


@dataclass(frozen=True, eq=False)
class BlockLayout:
    """A block-sparse attention layout (see the module docstring for the format).

    Attributes:
        kv_num_blocks: int32 ``(B, H, Qb)``, kept key blocks per query block.
        kv_indices: int32 ``(B, H, Qb, C)``, ascending key-block ids, ``C <= Kb``.
        seq_len_q: query length the layout was built for.
        seq_len_k: key length the layout was built for.
        block_size: ``(block_q, block_k)``.
        col_counts: None, or int32 ``(B, H, Qb)``: token columns kept per query block (module docstring).
        col_indices: None, or int32 ``(B, H, Qb, Ccol)``: their ascending token positions; given with
            ``col_counts`` (both or neither).
    """

    kv_num_blocks: torch.Tensor
    kv_indices: torch.Tensor
    seq_len_q: int
    seq_len_k: int
    block_size: tuple[int, int] = DEFAULT_BLOCK_SIZE
    col_counts: torch.Tensor | None = None
    col_indices: torch.Tensor | None = None
    _dense_cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_size", _check_block_size(self.block_size))
        for name in ("kv_num_blocks", "kv_indices"):
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
            if t.dtype != torch.int32:
                raise TypeError(f"{name}: expected dtype torch.int32, got {t.dtype}")
        for name in ("seq_len_q", "seq_len_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        num, idx = self.kv_num_blocks, self.kv_indices
        if num.dim() != 3:
            raise ValueError(f"kv_num_blocks: expected shape (B, H, Qb), got {tuple(num.shape)}")
        if idx.dim() != 4 or idx.shape[:3] != num.shape:
            raise ValueError(
                f"kv_indices: expected shape {tuple(num.shape)} + (capacity,) (from kv_num_blocks), "
                f"got {tuple(idx.shape)}"
            )
        if num.shape[2] != self.num_q_blocks:
            raise ValueError(
                f"kv_num_blocks: expected {self.num_q_blocks} query blocks "
                f"(ceil({self.seq_len_q} / {self.block_size[0]})), got {num.shape[2]}"
            )
        if not 1 <= idx.shape[3] <= self.num_k_blocks:
            raise ValueError(
                f"kv_indices: expected a capacity in [1, {self.num_k_blocks}] "
                f"(ceil({self.seq_len_k} / {self.block_size[1]}) key blocks), got {idx.shape[3]}"
            )
        if idx.device != num.device:
            raise ValueError(f"kv_indices: expected device {num.device} (from kv_num_blocks), got {idx.device}")
        columns.check_metadata(self)

    # ------------------------------------------------------------------ sizes
    @property
    def batch(self) -> int:
        return self.kv_num_blocks.shape[0]

    @property
    def num_heads(self) -> int:
        return self.kv_num_blocks.shape[1]

    @property
    def num_q_blocks(self) -> int:
        return _cdiv(self.seq_len_q, self.block_size[0])

    @property
    def num_k_blocks(self) -> int:
        return _cdiv(self.seq_len_k, self.block_size[1])

    @property
    def capacity(self) -> int:
        return self.kv_indices.shape[3]

    @property
    def device(self) -> torch.device:
        return self.kv_num_blocks.device

    @property
    def has_columns(self) -> bool:
        """Whether the layout carries token columns (``col_counts`` / ``col_indices``)."""
        return self.col_counts is not None

    @property
    def col_capacity(self) -> int:
        """Column slots per query block (``Ccol``); 0 without columns."""
        return self.col_indices.shape[3] if self.has_columns else 0

    @property
    def nbytes(self) -> int:
        """Bytes of metadata held (counts and indices, columns included)."""
        tensors = [self.kv_num_blocks, self.kv_indices] + (
            [self.col_counts, self.col_indices] if self.has_columns else []
        )
        return sum(t.numel() * t.element_size() for t in tensors)

    def to(self, device: torch.device | str) -> BlockLayout:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return BlockLayout(
            self.kv_num_blocks.to(device),
            self.kv_indices.to(device),
            self.seq_len_q,
            self.seq_len_k,
            self.block_size,
            col_counts=move(self.col_counts),
            col_indices=move(self.col_indices),
        )

    def without_columns(self) -> BlockLayout:
        """The same kept blocks, no token columns (shares the block tensors)."""
        return BlockLayout(self.kv_num_blocks, self.kv_indices, self.seq_len_q, self.seq_len_k, self.block_size)

    # ------------------------------------------------------------ conversions
    @classmethod
    def from_dense(
        cls,
        mask: torch.Tensor,
        *,
        seq_len_q: int | None = None,
        seq_len_k: int | None = None,
        block_size: tuple[int, int] | int = DEFAULT_BLOCK_SIZE,
        capacity: int | None = None,
    ) -> BlockLayout:
        """Compress a bool block mask ``(B, H, Qb, Kb)`` (True = keep) into a layout.

        ``seq_len_q``/``seq_len_k`` default to ``Qb * block_q`` / ``Kb * block_k``. ``capacity`` (a positive
        int, default ``Kb``; larger values act as ``Kb``) truncates each row's index list; it must hold the
        largest row (not checked: no host sync).
        """
        if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or mask.dtype != torch.bool:
            got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"mask: expected a bool tensor (B, H, Qb, Kb), got {got}")
        block_q, block_k = _check_block_size(block_size)
        num_q_blocks, num_k_blocks = mask.shape[2], mask.shape[3]
        seq_len_q = num_q_blocks * block_q if seq_len_q is None else seq_len_q
        seq_len_k = num_k_blocks * block_k if seq_len_k is None else seq_len_k
        if _cdiv(seq_len_k, block_k) != num_k_blocks:
            raise ValueError(
                f"mask: expected {_cdiv(seq_len_k, block_k)} key blocks (ceil({seq_len_k} / {block_k})), "
                f"got {num_k_blocks}"
            )
        if capacity is None:
            capacity = num_k_blocks
        elif isinstance(capacity, bool) or not isinstance(capacity, int):
            raise TypeError(f"capacity: expected a positive int or None, got {capacity!r}")
        elif capacity < 1:
            raise ValueError(f"capacity: expected a positive int or None, got {capacity}")
        # kept blocks first, each group in ascending order (stable sort of 0 = kept, 1 = dropped)
        order = torch.sort((~mask).to(torch.int8), dim=-1, stable=True).indices[..., :capacity]
        return cls(
            mask.sum(-1, dtype=torch.int32),
            order.to(torch.int32).contiguous(),
            seq_len_q,
            seq_len_k,
            (block_q, block_k),
        )

    def to_dense(self) -> torch.Tensor:
        """Bool ``(B, H, Qb, Kb)``, True where a block is kept (cached: the layout is immutable)."""
        if "dense" not in self._dense_cache:
            slots = torch.arange(self.capacity, device=self.device)
            used = slots < self.kv_num_blocks.unsqueeze(-1).long()
            dense = torch.zeros(*self.kv_num_blocks.shape, self.num_k_blocks + 1, dtype=torch.bool, device=self.device)
            # unused slots write to a spare column that is dropped afterwards
            target = torch.where(used, self.kv_indices.long().clamp(0, self.num_k_blocks), self.num_k_blocks)
            dense.scatter_(-1, target, used)
            self._dense_cache["dense"] = dense[..., : self.num_k_blocks]
        return self._dense_cache["dense"]

    def split_full(self, *, causal: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """FlexAttention's split: ``(partial_num, partial_idx, full_num, full_idx)``, same shapes as the layout.

        Full blocks need no element mask (every pair allowed); partial ones do (causal diagonal, ragged end).
        """
        full = full_block_mask(self.seq_len_q, self.seq_len_k, self.block_size, causal=causal, device=self.device)
        dense = self.to_dense()
        full_dense = dense & full
        partial = BlockLayout.from_dense(
            full_dense.logical_not() & dense,
            seq_len_q=self.seq_len_q,
            seq_len_k=self.seq_len_k,
            block_size=self.block_size,
        )
        full_l = BlockLayout.from_dense(
            full_dense, seq_len_q=self.seq_len_q, seq_len_k=self.seq_len_k, block_size=self.block_size
        )
        return partial.kv_num_blocks, partial.kv_indices, full_l.kv_num_blocks, full_l.kv_indices

    @classmethod
    def from_flex(cls, block_mask: object) -> BlockLayout:
        """Take a FlexAttention ``BlockMask``. Zero-copy when it has no full blocks; else the two lists merge.

        The ``mask_mod`` is not carried over: sparseflash masks by position only (causal and sequence ends),
        so a BlockMask whose partial blocks hide other token-level structure loses it.
        """
        from sparseflash.layouts.flex import read_flex_block_mask

        num, idx, seq_len_q, seq_len_k, block_size, full = read_flex_block_mask(block_mask)
        if full is None:
            return cls(num, idx, seq_len_q, seq_len_k, block_size)
        partial = cls(num, idx, seq_len_q, seq_len_k, block_size).to_dense()
        full = cls(*full, seq_len_q, seq_len_k, block_size).to_dense()
        return cls.from_dense(partial | full, seq_len_q=seq_len_q, seq_len_k=seq_len_k, block_size=block_size)

    def to_flex(self, *, causal: bool = True, num_heads: int | None = None, block_lookup: bool = True) -> object:
        """A FlexAttention ``BlockMask`` computing the same function, split into partial and full blocks.

        Its ``mask_mod`` looks the kept blocks up (Flex evaluates it on partial blocks only, and its eager
        path defines the function by it), and applies the bottom-right causal mask when ``causal``.

        Flex broadcasts a head dim of 1 but has no notion of KV-head layouts: pass ``num_heads`` (query heads)
        to repeat a per-KV-head layout over its group (a copy). ``block_lookup=False`` leaves the kept blocks
        out of ``mask_mod`` (causal only): compiled Flex then computes the same function a little faster, but
        its eager path would attend outside the layout.
        """
        from sparseflash.layouts.flex import to_flex_block_mask

        return to_flex_block_mask(self, causal=causal, num_heads=num_heads, block_lookup=block_lookup)

    def to_block_lists(
        self, *, batch: int, num_heads: int, num_kv_heads: int
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The decode kernel's per-KV-head block lists of a one-query-block layout (the new tokens' row).

        Use: ``decode_attention(q, k_cache, v_cache, lens, layout=layout)`` does this conversion; by hand,
        ``indices, counts, block = layout.to_block_lists(...)`` then ``kv_block_indices=indices,
        kv_block_counts=counts, block_size=block``.

        Args:
            batch, num_heads, num_kv_heads: of the decode call (q's batch and heads, the cache's KV heads); the
                layout's batch is 1 or ``batch`` and its heads 1, ``num_kv_heads`` or ``num_heads``.

        Returns:
            ``(indices, counts, block_k)``: int32 ``(batch, num_kv_heads, Kb)`` with the kept key-block ids first,
            ascending; int32 ``(batch, num_kv_heads)`` counts; the key block size. A per-query-head layout gives
            each KV head the union of its query heads' blocks. No host sync.

        Raises:
            ValueError: a layout with more than one query block, or batch/heads it cannot serve.
        """
        from sparseflash.layouts.decode_lists import decode_block_lists

        return decode_block_lists(self, batch=batch, num_heads=num_heads, num_kv_heads=num_kv_heads)

    # ---------------------------------------------------------------- metrics
    def density(self, *, causal: bool = True) -> float:
        """Kept blocks over allowed blocks (causal blocks when ``causal``), averaged over batch and heads.

        Blocks kept above the causal diagonal do not count (they compute nothing).
        """
        allowed = causal_block_mask(self.seq_len_q, self.seq_len_k, self.block_size, causal=causal, device=self.device)
        kept = (self.to_dense() & allowed).sum(dtype=torch.float64)
        return float(kept / (allowed.sum() * self.batch * self.num_heads))

    def token_density(self, *, causal: bool = True) -> float:
        """Kept (query, key) pairs, blocks and columns, over allowed pairs: :func:`.columns.token_density`."""
        return columns.token_density(self, causal=causal)

    # -------------------------------------------------------------- checking
    def validate(self, q: torch.Tensor, k: torch.Tensor, *, check_indices: bool = True) -> None:
        """Check the layout against q ``(B, Hq, Sq, D)`` and k ``(B, Hkv, Sk, D)``; raise ``ValueError`` if off.

        Shapes, block grid and device are checked from metadata. With ``check_indices`` the index values are
        checked too (range, strict ascending order, counts within capacity): one host sync.

        Raises:
            TypeError: q or k not a tensor. ValueError: q or k not 4-D, or a layout that does not fit them.
        """
        for name, t in (("q", q), ("k", k)):
            check_tensor(name, t, ndim=4)
        batch, num_heads, seq_len_q, _ = q.shape
        num_kv_heads, seq_len_k = k.shape[1], k.shape[2]
        if (self.seq_len_q, self.seq_len_k) != (seq_len_q, seq_len_k):
            raise ValueError(
                f"layout: expected seq lengths (Sq={seq_len_q}, Sk={seq_len_k}) from q and k, "
                f"got a layout built for (Sq={self.seq_len_q}, Sk={self.seq_len_k})"
            )
        if self.batch not in (1, batch):
            raise ValueError(f"layout: expected batch 1 or {batch} (from q), got {self.batch}")
        if self.num_heads not in (1, num_kv_heads, num_heads):
            raise ValueError(
                f"layout: expected heads 1, {num_kv_heads} (KV heads) or {num_heads} (query heads), "
                f"got {self.num_heads}"
            )
        if self.device != q.device:
            raise ValueError(f"layout: expected device {q.device} (from q), got {self.device}")
        if check_indices:
            self.check_indices()

    def check_indices(self) -> None:
        """Raise ``ValueError`` unless counts lie in [0, capacity] and used indices ascend within [0, Kb) (and
        token columns pass :func:`.columns.check_indices`: one more host sync)."""
        num, idx = self.kv_num_blocks, self.kv_indices
        used = torch.arange(self.capacity, device=self.device) < num.unsqueeze(-1)
        bad_count = ((num < 0) | (num > self.capacity)).any()
        bad_range = (used & ((idx < 0) | (idx >= self.num_k_blocks))).any()
        bad_order = (used[..., 1:] & (idx[..., 1:] <= idx[..., :-1])).any()
        flags = torch.stack([bad_count, bad_range, bad_order]).tolist()
        if flags[0]:
            raise ValueError(f"layout.kv_num_blocks: expected counts in [0, {self.capacity}], got values outside")
        if flags[1]:
            raise ValueError(f"layout.kv_indices: expected block ids in [0, {self.num_k_blocks}), got values outside")
        if flags[2]:
            raise ValueError(
                "layout.kv_indices: expected strictly ascending block ids in each row, got a row that is not"
            )
        columns.check_indices(self)

    def __repr__(self) -> str:
        return (
            f"BlockLayout(batch={self.batch}, heads={self.num_heads}, blocks={self.num_q_blocks}x{self.num_k_blocks}, "
            f"capacity={self.capacity}, block_size={self.block_size}, seq_len=({self.seq_len_q}, {self.seq_len_k}), "
            + (f"columns={self.col_capacity}, " if self.has_columns else "")
            + f"device={self.device})"
        )


def dense_layout(
    seq_len_q: int,
    seq_len_k: int,
    *,
    block_size: tuple[int, int] | int = DEFAULT_BLOCK_SIZE,
    causal: bool = True,
    device: torch.device | str = "cpu",
) -> BlockLayout:
    """The layout keeping every allowed block (``(1, 1, Qb, Kb)``, broadcast over batch and heads)."""
    block_size = _check_block_size(block_size)
    mask = causal_block_mask(seq_len_q, seq_len_k, block_size, causal=causal, device=device)
    return BlockLayout.from_dense(mask[None, None], seq_len_q=seq_len_q, seq_len_k=seq_len_k, block_size=block_size)


__all__ = ["BlockLayout", "causal_block_mask", "full_block_mask", "block_bounds", "dense_layout"]
