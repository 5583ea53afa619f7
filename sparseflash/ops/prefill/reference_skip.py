"""PyTorch reference for in-kernel block skipping: the prefill kernel's tile walk in ``float64`` (or ``float32``).

``skip_threshold`` (``flash_attention`` / ``block_sparse_attention``) changes the function computed, and how it
changes depends on the kernel's tiles. So this reference follows the kernel's geometry (:class:`TileGeometry`:
rows per program, keys per tile, GQA heads packed per program) and its visiting order, and takes the same
decision, per program, in natural-log units:

* the rows of a program (``block_m`` of them: ``block_m // pack`` queries times ``pack`` query heads of one GQA
  group) visit key tiles of ``block_n`` keys in order: dense, ascending from key 0 (first the tiles every row
  sees whole, then those needing the causal / sequence-end mask); with a layout, the row's kept blocks in the
  layout's (ascending) order, each cut into ``block_n``-key tiles, masked blocks last;
* an *unmasked* tile is skipped when, for every stored row of the program,
  ``max(tile logits) < m - skip_threshold``, the logits ``scale * q.k`` and ``m`` the row's running maximum over
  the tiles kept before. The first tile (``m = -inf``) is never skipped; a row maximum that is NaN (NaN logits
  are ignored by the maximum, as in the kernel, unless all are NaN) is never below;
* a skipped tile is left out of the softmax altogether: numerator and denominator, and its V is never read;
* masked tiles are never skipped, and with ``seq_lens`` every tile is masked: nothing is skipped.

Everything else is the semantics of :mod:`sparseflash.ops.prefill.reference` (empty rows give 0 and lse -inf; a
row that attends a non-finite key or value in a tile it keeps comes out NaN).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

import torch

from sparseflash.ops.prefill.reference import valid_range

if TYPE_CHECKING:
    from sparseflash.layouts import BlockLayout


class TileGeometry(NamedTuple):
    """The prefill kernel's program shape (``launcher.tile_geometry`` gives the one a launch uses).

    Attributes:
        block_m: rows per program (``block_m // pack`` queries of ``pack`` query heads).
        block_n: keys per tile.
        pack: query heads of one GQA group sharing a program (1: no packing).
    """

    block_m: int
    block_n: int
    pack: int


def _see(tiles: torch.Tensor, qpt: int, seq_len_q: int, seq_len_k: int, causal: bool) -> tuple:
    """Keys every row / some row of each query tile may see: ``[0, all_see)``, ``[0, any_see)``."""
    if not causal:
        full = torch.full_like(tiles, seq_len_k)
        return full, full
    q_first = tiles * qpt
    q_last = torch.clamp(q_first + qpt, max=seq_len_q) - 1
    offset = seq_len_k - seq_len_q
    return (q_first + offset + 1).clamp(0, seq_len_k), (q_last + offset + 1).clamp(0, seq_len_k)


def tile_schedule(
    geometry: TileGeometry,
    tiles: torch.Tensor,
    *,
    num_heads: int,
    seq_len_q: int,
    seq_len_k: int,
    causal: bool,
    layout: BlockLayout | None = None,
    seq_range: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The key tiles each program visits, in order: ``(starts, masked, valid)``, each ``(B|1, Hp|1, T, J)``.

    ``tiles`` are the query-tile indices (T,); Hp = num_heads // pack; ``starts`` int64 first keys, ``masked``
    whether the tile goes through the masked path, ``valid`` whether step ``j`` exists for that program.
    """
    block_m, block_n, pack = geometry
    qpt = block_m // pack
    all_see, any_see = _see(tiles, qpt, seq_len_q, seq_len_k, causal)
    if layout is None:
        lo = torch.zeros_like(tiles)
        hi, full_hi = any_see, (all_see // block_n) * block_n
        if seq_range is not None:  # padded batches: every tile masked, from the tile holding the first valid key
            lo = ((seq_range[0].long() // block_n) * block_n)[:, None]  # (B, 1)
            hi = torch.minimum(hi[None, :], seq_range[1].long()[:, None])
            full_hi = lo
        steps = int(((hi - lo).clamp(min=0) + block_n - 1).div(block_n, rounding_mode="floor").max())
        starts = lo[..., None] + torch.arange(steps, device=tiles.device) * block_n  # (T or B x T, J)
        starts = starts.expand(*hi.shape, steps)
        valid, masked = starts < hi[..., None], starts >= full_hi[..., None]
        return tuple(t.reshape(-1, 1, len(tiles), steps) for t in (starts, masked, valid))
    block_q, block_k = layout.block_size
    subs = block_k // block_n
    heads = (torch.arange(num_heads // pack, device=tiles.device) * pack) // (num_heads // layout.num_heads)
    q_blocks = (tiles * qpt) // block_q
    num = layout.kv_num_blocks.long()[:, heads][:, :, q_blocks]  # (Bl, Hp, T)
    ids = layout.kv_indices.long()[:, heads][:, :, q_blocks]  # (Bl, Hp, T, C)
    used = torch.arange(ids.shape[-1], device=tiles.device) < num[..., None]
    n_full = (used & (ids + 1 <= (all_see // block_k)[:, None])).sum(-1, keepdim=True)
    if seq_range is not None:
        n_full = torch.zeros_like(n_full)
    slot = torch.arange(ids.shape[-1] * subs, device=tiles.device) // subs  # (J,)
    starts = ids[..., slot] * block_k + (torch.arange(len(slot), device=tiles.device) % subs) * block_n
    return starts, slot >= n_full, slot < num[..., None]


def skip_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    skip_threshold: float | None,
    geometry: TileGeometry,
    causal: bool = True,
    scale: float | None = None,
    layout: BlockLayout | None = None,
    seq_lens: torch.Tensor | None = None,
    padding_side: str = "right",
    dtype: torch.dtype = torch.float64,
    max_elements: int = 2**24,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention with block skipping as the kernel does it (module docstring), tile by tile in ``dtype``.

    Args:
        q: (B, Hq, Sq, D). k, v: (B, Hkv, Sk, D). Any float dtype; computed in ``dtype``.
        skip_threshold: natural-log margin (>= 0), or None: nothing skipped (the same walk, exact attention).
        geometry: the kernel's tiles; with a layout ``block_k`` must be a multiple of ``block_n`` and
            ``block_q`` of ``block_m // pack`` (the launcher's own choice always is).
        layout, causal, scale, seq_lens, padding_side: as :func:`sparseflash.block_sparse_attention`.
        max_elements: query tiles are processed in groups whose score tensor stays under this many elements.

    Returns:
        out (B, Hq, Sq, D) and natural-log lse (B, Hq, Sq) in ``dtype``, and int64 ``(2,)``: key tiles skipped
        and key tiles visited, summed over programs (what the kernel's ``skip_stats`` counts).
    """
    batch, num_heads, seq_len_q, head_dim = q.shape
    num_kv_heads, seq_len_k = k.shape[1], k.shape[2]
    block_m, block_n, pack = geometry
    qpt = block_m // pack
    if qpt < 1 or num_heads % pack or (num_heads // num_kv_heads) % pack:
        raise ValueError(f"geometry: expected pack dividing the GQA group and <= block_m, got {geometry}")
    if layout is not None and (layout.block_size[1] % block_n or layout.block_size[0] % qpt):
        raise ValueError(f"geometry: expected tiles dividing the layout's blocks {layout.block_size}, got {geometry}")
    scale = head_dim**-0.5 if scale is None else scale
    thr = math.inf if skip_threshold is None else float(skip_threshold)
    num_packs, num_tiles = num_heads // pack, -(-seq_len_q // qpt)
    dev = q.device
    seq_range = None if seq_lens is None else valid_range(seq_lens.to(dev), seq_len_k, padding_side)

    # queries as programs: (B, Hp, T, block_m, D), row r = query t * qpt + r // pack of head hp * pack + r % pack
    qq = torch.nn.functional.pad(q.to(dtype), (0, 0, 0, num_tiles * qpt - seq_len_q))
    qq = qq.view(batch, num_packs, pack, num_tiles, qpt, head_dim).permute(0, 1, 3, 4, 2, 5)
    qq = torch.nn.functional.pad(
        qq.reshape(batch, num_packs, num_tiles, qpt * pack, head_dim), (0, 0, 0, block_m - qpt * pack)
    )
    rows = torch.arange(block_m, device=dev)
    row_q = torch.arange(num_tiles, device=dev)[:, None] * qpt + rows // pack  # (T, block_m)
    row_ok = ((rows < qpt * pack) & (row_q < seq_len_q))[None, None]  # (1, 1, T, block_m)
    if seq_range is not None:
        lo, hi = (t.view(-1, 1, 1, 1).long() for t in seq_range)
        row_ok = row_ok & (row_q >= lo) & (row_q < hi)
    qq = qq.masked_fill(~row_ok[..., None], 0.0)  # rows the kernel never loads
    kv_heads = (torch.arange(num_packs, device=dev) * pack) // (num_heads // num_kv_heads)
    kk, vv = (t[:, kv_heads].to(dtype) for t in (k, v))  # (B, Hp, Sk, D)
    k_bad, v_bad = (~torch.isfinite(t).all(-1) for t in (kk, vv))  # (B, Hp, Sk)
    vv = vv.masked_fill(v_bad[..., None], 0.0)

    group_tiles = max(1, max_elements // (batch * num_packs * block_m * max(block_n, head_dim)))
    outs, lses, stats = [], [], torch.zeros(2, dtype=torch.int64)
    for t0 in range(0, num_tiles, group_tiles):
        tiles = torch.arange(t0, min(t0 + group_tiles, num_tiles), device=dev)
        sched = tile_schedule(
            geometry,
            tiles,
            num_heads=num_heads,
            seq_len_q=seq_len_q,
            seq_len_k=seq_len_k,
            causal=causal,
            layout=layout,
            seq_range=seq_range,
        )
        ok = row_ok.expand(batch, num_packs, num_tiles, block_m)[:, :, tiles]
        out, lse, counts = _walk(
            qq[:, :, tiles],
            kk,
            vv,
            k_bad,
            v_bad,
            sched,
            ok,
            row_q[tiles],
            thr,
            scale,
            geometry,
            causal=causal,
            seq_len_q=seq_len_q,
            seq_range=seq_range,
        )
        outs.append(out)
        lses.append(lse)
        stats += counts

    def unpack(t: torch.Tensor) -> torch.Tensor:  # (B, Hp, T, block_m, ...) -> (B, Hq, Sq, ...)
        t = t[:, :, :, : qpt * pack].unflatten(3, (qpt, pack)).movedim(4, 2)  # (B, Hp, pack, T, qpt, ...)
        return t.flatten(1, 2).flatten(2, 3)[:, :, :seq_len_q]

    return unpack(torch.cat(outs, 2)), unpack(torch.cat(lses, 2)), stats


def _walk(qq, kk, vv, k_bad, v_bad, sched, row_ok, row_q, thr, scale, geometry, *, causal, seq_len_q, seq_range):
    """Online softmax of the programs ``qq`` (B, Hp, T, block_m, D) over their scheduled key tiles."""
    batch, num_packs, num_tiles, block_m, head_dim = qq.shape
    seq_len_k, block_n = kk.shape[2], geometry.block_n
    starts, masked, valid = (t.expand(batch, num_packs, num_tiles, -1) for t in sched)
    shape = (batch, num_packs, num_tiles, block_m)
    m = torch.full(shape, float("-inf"), dtype=qq.dtype, device=qq.device)
    l = torch.zeros_like(m)
    acc = torch.zeros_like(qq)
    k_hit = torch.zeros(shape, dtype=torch.bool, device=qq.device)
    v_hit = torch.zeros_like(k_hit)
    counts = torch.zeros(2, dtype=torch.int64)
    offs = torch.arange(block_n, device=qq.device)
    for j in range(starts.shape[-1]):
        k_pos = starts[..., j, None] + offs  # (B, Hp, T, block_n)
        idx = k_pos.clamp(0, seq_len_k - 1).flatten(2)
        k_t, v_t = (
            t.gather(2, idx[..., None].expand(-1, -1, -1, head_dim)).unflatten(2, k_pos.shape[2:]) for t in (kk, vv)
        )
        kb_t, vb_t = (t.gather(2, idx).view(k_pos.shape) for t in (k_bad, v_bad))
        s = torch.matmul(qq, k_t.transpose(-1, -2)) * scale  # (B, Hp, T, block_m, block_n)
        attend = row_ok[..., None] & (k_pos < seq_len_k)[..., None, :]
        if causal:
            attend = attend & (k_pos[..., None, :] <= row_q[..., None] + (seq_len_k - seq_len_q))
        if seq_range is not None:
            lo, hi = (t.view(-1, 1, 1, 1, 1).long() for t in seq_range)
            attend = attend & (k_pos[..., None, :] >= lo) & (k_pos[..., None, :] < hi)
        s = s.masked_fill(~attend, float("-inf"))
        nan = torch.isnan(s)
        s_max = s.masked_fill(nan, float("-inf")).amax(-1).masked_fill(nan.all(-1), float("nan"))  # NaN-ignoring
        below = (s_max < m - thr) | ~row_ok  # NaN: never below
        skip = valid[..., j] & ~masked[..., j] & below.all(-1)
        use = (valid[..., j] & ~skip)[..., None]  # (B, Hp, T, 1)
        m_new = torch.fmax(m, s_max)
        m_use = m_new.masked_fill(m_new == float("-inf"), 0.0)
        p = torch.exp(s.masked_fill(kb_t[..., None, :], float("-inf")) - m_use[..., None])  # bad keys: marked below
        alpha = torch.exp(m - m_use)
        l = torch.where(use, l * alpha + p.sum(-1), l)
        acc = torch.where(use[..., None], acc * alpha[..., None] + torch.matmul(p, v_t), acc)
        m = torch.where(use, m_new, m)
        k_hit |= use & (attend & kb_t[..., None, :]).any(-1)
        v_hit |= use & (attend & vb_t[..., None, :]).any(-1)
        counts += torch.stack([skip.sum(), valid[..., j].sum()]).cpu()
    empty = l == 0
    out = acc / l.masked_fill(empty, 1.0)[..., None]
    lse = (m + torch.log(l.masked_fill(empty, 1.0))).masked_fill(empty, float("-inf"))
    out = out.masked_fill((k_hit | v_hit)[..., None], float("nan"))
    return out, lse.masked_fill(k_hit, float("nan")), counts
