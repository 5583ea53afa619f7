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

Token columns (MInference's vertical lines, optional): besides whole blocks, query block ``I`` may keep single
key positions, gathered by the prefill kernel in tiles of its key width:

* ``col_counts`` int32 ``(B, H, Qb)``: how many columns query block ``I`` keeps;
* ``col_indices`` int32 ``(B, H, Qb, Ccol)``: their token positions in ``[0, Sk)``, strictly ascending in the
  first ``col_counts[b, h, I]`` entries, and none inside one of ``I``'s kept blocks (a key is counted once);
  the rest of the row is ignored. :func:`with_columns` builds them (dropping columns that lie in kept blocks);
  :meth:`BlockLayout.check_indices` rejects a layout that breaks these rules.

A column is attended by query ``i`` of block ``I`` under the same element mask as a block key: bottom-right
causal (``j <= i + Sk - Sq``) and the sequence ends. ``to_dense`` and ``density`` describe the blocks only;
:meth:`BlockLayout.token_density` counts blocks and columns in (query, key) pairs.

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
        self._check_column_metadata()

    def _check_column_metadata(self) -> None:
        counts, cols = self.col_counts, self.col_indices
        if counts is None and cols is None:
            return
        if counts is None or cols is None:
            given, missing = ("col_indices", "col_counts") if counts is None else ("col_counts", "col_indices")
            raise ValueError(f"{missing}: expected a tensor together with {given}, got None")
        for name, t in (("col_counts", counts), ("col_indices", cols)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
            if t.dtype != torch.int32:
                raise TypeError(f"{name}: expected dtype torch.int32, got {t.dtype}")
            if t.device != self.kv_num_blocks.device:
                raise ValueError(
                    f"{name}: expected device {self.kv_num_blocks.device} (from kv_num_blocks), got {t.device}"
                )
        if counts.shape != self.kv_num_blocks.shape:
            raise ValueError(
                f"col_counts: expected shape {tuple(self.kv_num_blocks.shape)} (from kv_num_blocks), "
                f"got {tuple(counts.shape)}"
            )
        if cols.dim() != 4 or cols.shape[:3] != counts.shape or cols.shape[3] < 1:
            raise ValueError(
                f"col_indices: expected shape {tuple(counts.shape)} + (capacity >= 1,) (from col_counts), "
                f"got {tuple(cols.shape)}"
            )

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
        tensors = [self.kv_num_blocks, self.kv_indices]
        if self.has_columns:
            tensors += [self.col_counts, self.col_indices]
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

        if self.has_columns:
            raise ValueError(
                f"layout: a layout with token columns (col_counts/col_indices, capacity {self.col_capacity}) has no "
                "FlexAttention BlockMask form (Flex keeps whole blocks); use layout.without_columns() for the blocks"
            )
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
        if self.has_columns:
            raise ValueError(
                "layout: expected a layout without token columns (col_counts/col_indices) for decode, got one with "
                f"{self.col_capacity} column slots"
            )
        if self.num_q_blocks != 1:
            raise ValueError(
                f"layout: expected one query block (a decode layout, seq_len_q <= block_q), got {self.num_q_blocks}"
            )
        if (
            self.batch not in (1, batch)
            or self.num_heads not in (1, num_kv_heads, num_heads)
            or (num_kv_heads < 1 or num_heads % num_kv_heads)
        ):
            raise ValueError(
                f"layout: expected batch 1 or {batch} and heads 1, {num_kv_heads} or {num_heads}, got batch "
                f"{self.batch} and heads {self.num_heads}"
            )
        keep = self.to_dense()[:, :, 0]  # (B or 1, H, Kb) with H in (1, Hkv, Hq)
        if keep.shape[1] == num_heads and num_heads != num_kv_heads:
            keep = keep.reshape(keep.shape[0], num_kv_heads, num_heads // num_kv_heads, -1).any(2)
        keep = keep.expand(batch, num_kv_heads, keep.shape[-1])
        counts = keep.sum(-1, dtype=torch.int32)
        order = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices  # kept block ids first, ascending
        return order.to(torch.int32).contiguous(), counts.contiguous(), self.block_size[1]

    # ---------------------------------------------------------------- metrics
    def density(self, *, causal: bool = True) -> float:
        """Kept blocks over allowed blocks (causal blocks when ``causal``), averaged over batch and heads.

        Blocks kept above the causal diagonal do not count (they compute nothing).
        """
        allowed = causal_block_mask(self.seq_len_q, self.seq_len_k, self.block_size, causal=causal, device=self.device)
        kept = (self.to_dense() & allowed).sum(dtype=torch.float64)
        return float(kept / (allowed.sum() * self.batch * self.num_heads))

    def token_density(self, *, causal: bool = True) -> float:
        """Kept (query, key) pairs over allowed pairs, averaged over batch and heads; blocks and columns.

        A kept block counts the pairs of it inside the allowed region (the causal part when ``causal``, the
        real rows and keys of ragged end blocks), a token column the rows of its query block that see it; the
        denominator is the allowed pair count (``Sq * Sk`` without ``causal``). This is the work a kernel
        gathering columns does, in keys per row, where :meth:`density` counts whole blocks. Exact, in float64,
        with one host sync; it never builds an ``Sq x Sk`` tensor.
        """
        block_q, block_k = self.block_size
        device, offset = self.device, self.seq_len_k - self.seq_len_q
        rows_lo = torch.arange(self.num_q_blocks, device=device, dtype=torch.float64) * block_q
        rows_hi = torch.clamp(rows_lo + block_q, max=self.seq_len_q)
        keys_lo = torch.arange(self.num_k_blocks, device=device, dtype=torch.float64) * block_k
        keys_hi = torch.clamp(keys_lo + block_k, max=self.seq_len_k)
        if causal:
            pairs = torch.zeros(self.num_q_blocks, self.num_k_blocks, dtype=torch.float64, device=device)
            for r in range(block_q):  # row r of every query block at once
                row = rows_lo + r
                seen = (torch.minimum(row[:, None] + offset + 1, keys_hi[None, :]) - keys_lo[None, :]).clamp(min=0)
                pairs += seen * (row < rows_hi)[:, None]
        else:
            pairs = (rows_hi - rows_lo)[:, None] * (keys_hi - keys_lo)[None, :]
        kept = (self.to_dense().to(torch.float64) * pairs).sum()
        if self.has_columns:
            used = torch.arange(self.col_capacity, device=device) < self.col_counts.unsqueeze(-1)
            lo, hi = rows_lo[:, None], rows_hi[:, None]  # (Qb, 1)
            if causal:  # rows i of block I with j <= i + offset
                seeing = (hi - torch.maximum(lo, self.col_indices.to(torch.float64) - offset)).clamp(min=0)
            else:
                seeing = (hi - lo).expand(self.col_indices.shape)
            kept = kept + (seeing * used).sum()
        return float(kept / (pairs.sum() * self.batch * self.num_heads))

    def columns_to_dense(self) -> torch.Tensor | None:
        """Bool ``(B, H, Qb, Sk)``, True where query block ``I`` keeps token column ``j``; None without columns.

        Memory ``Qb * Sk`` per head: for references and tests on small shapes.
        """
        if not self.has_columns:
            return None
        used = torch.arange(self.col_capacity, device=self.device) < self.col_counts.unsqueeze(-1).long()
        target = torch.where(used, self.col_indices.long().clamp(0, self.seq_len_k), self.seq_len_k)
        dense = torch.zeros(*self.col_counts.shape, self.seq_len_k + 1, dtype=torch.bool, device=self.device)
        dense.scatter_(-1, target, used)
        return dense[..., : self.seq_len_k]

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
        """Raise ``ValueError`` unless counts lie in [0, capacity] and used indices ascend within [0, Kb).

        Token columns likewise: counts in [0, Ccol], used positions strictly ascending within [0, Sk), and none
        inside a block its query block keeps (no key counted twice). One host sync.
        """
        num, idx = self.kv_num_blocks, self.kv_indices
        used = torch.arange(self.capacity, device=self.device) < num.unsqueeze(-1)
        bad_count = ((num < 0) | (num > self.capacity)).any()
        bad_range = (used & ((idx < 0) | (idx >= self.num_k_blocks))).any()
        bad_order = (used[..., 1:] & (idx[..., 1:] <= idx[..., :-1])).any()
        checks = [bad_count, bad_range, bad_order]
        if self.has_columns:
            cnum, cidx = self.col_counts, self.col_indices
            cused = torch.arange(self.col_capacity, device=self.device) < cnum.unsqueeze(-1)
            checks.append(((cnum < 0) | (cnum > self.col_capacity)).any())
            checks.append((cused & ((cidx < 0) | (cidx >= self.seq_len_k))).any())
            checks.append((cused[..., 1:] & (cidx[..., 1:] <= cidx[..., :-1])).any())
            block_of = (cidx.long() // self.block_size[1]).clamp(0, self.num_k_blocks - 1)
            checks.append((cused & self.to_dense().gather(-1, block_of)).any())
        flags = torch.stack(checks).tolist()
        if flags[0]:
            raise ValueError(f"layout.kv_num_blocks: expected counts in [0, {self.capacity}], got values outside")
        if flags[1]:
            raise ValueError(f"layout.kv_indices: expected block ids in [0, {self.num_k_blocks}), got values outside")
        if flags[2]:
            raise ValueError(
                "layout.kv_indices: expected strictly ascending block ids in each row, got a row that is not"
            )
        if self.has_columns:
            if flags[3]:
                raise ValueError(f"layout.col_counts: expected counts in [0, {self.col_capacity}], got values outside")
            if flags[4]:
                raise ValueError(
                    f"layout.col_indices: expected token positions in [0, {self.seq_len_k}), got values outside"
                )
            if flags[5]:
                raise ValueError(
                    "layout.col_indices: expected strictly ascending positions in each row, got a row that is not"
                )
            if flags[6]:
                raise ValueError(
                    "layout.col_indices: expected columns outside the row's kept blocks (a key counted once), got a "
                    "column inside a kept block: build the columns with sparseflash.layouts.with_columns"
                )

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


def with_columns(
    layout: BlockLayout,
    col_indices: torch.Tensor,
    col_counts: torch.Tensor | None = None,
    *,
    check: bool = True,
) -> BlockLayout:
    """``layout``'s blocks plus token columns per query block (replacing any columns it holds).

    Columns inside a block their query block keeps are dropped (a key is counted once), duplicates merged, and
    each row sorted ascending; unused slots hold 0. No host sync unless ``check``.

    Args:
        layout: the block layout, ``(B, H, Qb)`` counts.
        col_indices: integer ``(B, H, Qb, C)``, token positions per query block, in any order.
        col_counts: optional integer ``(B, H, Qb)``: only the first ``col_counts`` slots of each row are used
            (default: all ``C``).
        check: check on the host (one sync) that the used positions lie in ``[0, Sk)`` and the counts in
            ``[0, C]``; without it, positions outside ``[0, Sk)`` are dropped.

    Returns:
        A :class:`BlockLayout` with ``col_counts`` int32 ``(B, H, Qb)`` and ``col_indices`` int32 ``(B, H, Qb, C)``.

    Raises:
        TypeError: ``layout`` not a BlockLayout, or non-integer column tensors.
        ValueError: shapes or devices that do not match the layout; with ``check``, values out of range.
    """
    if not isinstance(layout, BlockLayout):
        raise TypeError(f"layout: expected a BlockLayout, got {type(layout).__name__}")
    lead = tuple(layout.kv_num_blocks.shape)
    for name, t, ndim in (("col_indices", col_indices, 4), ("col_counts", col_counts, 3)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"{name}: expected an integer tensor, got {got}")
        if t.dim() != ndim or tuple(t.shape[:3]) != lead or (ndim == 4 and t.shape[3] < 1):
            raise ValueError(
                f"{name}: expected shape {lead}{' + (C >= 1,)' if ndim == 4 else ''} (the layout's counts), "
                f"got {tuple(t.shape)}"
            )
        if t.device != layout.device:
            raise ValueError(f"{name}: expected device {layout.device} (the layout's), got {t.device}")
    seq_len_k, capacity = layout.seq_len_k, col_indices.shape[3]
    cols = col_indices.long()
    used = torch.ones_like(cols, dtype=torch.bool)
    if col_counts is not None:
        used = torch.arange(capacity, device=layout.device) < col_counts.long().unsqueeze(-1)
    if check:
        bad_count = col_counts is not None and ((col_counts < 0) | (col_counts > capacity)).any()
        flags = torch.stack(
            [torch.as_tensor(bad_count, device=layout.device), (used & ((cols < 0) | (cols >= seq_len_k))).any()]
        ).tolist()
        if flags[0]:
            raise ValueError(f"col_counts: expected counts in [0, {capacity}], got values outside")
        if flags[1]:
            raise ValueError(f"col_indices: expected token positions in [0, {seq_len_k}), got values outside")
    valid = used & (cols >= 0) & (cols < seq_len_k)
    block_of = (cols // layout.block_size[1]).clamp(0, layout.num_k_blocks - 1)
    valid &= ~layout.to_dense().gather(-1, block_of)
    # sort with Sk as the sentinel of a dropped slot, then drop repeats and sort again
    vals = torch.where(valid, cols, seq_len_k).sort(-1).values
    repeat = torch.zeros_like(valid)
    repeat[..., 1:] = vals[..., 1:] == vals[..., :-1]
    vals = torch.where(repeat, seq_len_k, vals).sort(-1).values
    kept = vals < seq_len_k
    return BlockLayout(
        layout.kv_num_blocks,
        layout.kv_indices,
        layout.seq_len_q,
        layout.seq_len_k,
        layout.block_size,
        col_counts=kept.sum(-1, dtype=torch.int32),
        col_indices=torch.where(kept, vals, 0).to(torch.int32).contiguous(),
    )


__all__ = ["BlockLayout", "causal_block_mask", "full_block_mask", "block_bounds", "dense_layout", "with_columns"]
