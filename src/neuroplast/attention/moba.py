"""Mixture of Block Attention (MoBA; Lu et al., arXiv:2502.13189), exact per-token routing.

Keys are cut into contiguous blocks of `block_size` (the last one may be short). Each query
scores every block by q . mean(K_block) (fp32, unscaled, no gradient: routing is a hard choice)
and attends to its top-k blocks only; the outputs of the parts are merged exactly with their
log-sum-exps.

- causal: the query's own block is always chosen (token-level causal mask inside it) and counts
  in k; history blocks are those entirely in the past; future blocks are never chosen.
- non-causal (images): every block is eligible; `force_own_block` adds the own block (counting
  in k) as a locality prior.

Three implementations give the same result (tests hold them to it):
- `reference`: dense attention with the exact N x N selection mask (O(N^2); the test oracle);
- `gather`: cost proportional to the selected blocks. Every (query, chosen block) pair, the
  forced own block included, joins the group of its (batch x head, key block); each group is cut
  into dense tiles of queries, and each tile is one batched matmul against its block's keys and
  one against its values (token-causal or short-block keys masked per query). The parts of a
  query are merged by log-sum-exp. A custom backward recomputes the scores from the saved
  log-sum-exp (five batched matmuls); tiles are processed a chunk at a time, so memory beyond the
  inputs is bounded by the chunk and by the (query, block) pairs.
- `kernel` (CPU): numba kernels that walk each query's selected keys (`attention/kernels.py`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from neuroplast.attention import kernels

IMPLEMENTATIONS = ("auto", "gather", "kernel", "reference")
TILE_ROWS = 64  # queries per dense tile in the gather path
TILE_CHUNK_SCORES = 1 << 20  # score elements per chunk of tiles in the gather path (4 MiB in fp32)
GPU_CHUNK_FACTOR = 64  # ... times this on a GPU (256 MiB)
GATHER_MIN_BLOCK, GATHER_MIN_HEAD_DIM = 64, 32  # "auto" on CPU: smaller blocks or heads take the kernel


def key_convolution(k: torch.Tensor, weight: torch.Tensor, causal: bool) -> torch.Tensor:
    """Depthwise convolution of the keys along the sequence ("Optimizing MoBA", arXiv:2511.11571):
    k (B, H, N, D), weight (H, D, width). Causal: each key sees itself and the width - 1 before it;
    non-causal: a centred window (odd width)."""
    batch, heads, n, dim = k.shape
    width = weight.shape[-1]
    x = k.permute(0, 1, 3, 2).reshape(batch, heads * dim, n)
    pad = (width - 1, 0) if causal else ((width - 1) // 2, width // 2)
    y = F.conv1d(F.pad(x, pad), weight.reshape(heads * dim, 1, width), groups=heads * dim)
    return y.reshape(batch, heads, dim, n).permute(0, 1, 3, 2)


def expand_kv_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Grouped KV heads: query head h reads KV head h // (Hq / Hkv)."""
    hq, hkv = q.shape[1], k.shape[1]
    if hq % hkv:
        raise ValueError(f"{hq} query heads are not a multiple of {hkv} key/value heads")
    if hq != hkv:
        k, v = k.repeat_interleave(hq // hkv, dim=1), v.repeat_interleave(hq // hkv, dim=1)
    return k, v


@torch.no_grad()
def select_blocks(
    q: torch.Tensor, k: torch.Tensor, block_size: int, top_k: int, causal: bool, force_own_block: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The routing: (chosen, valid), each (B, H, N, c). chosen[..., t, :] are the blocks query t
    attends to besides its forced own block (all of them when the own block is not forced);
    valid marks real choices (early causal queries have fewer eligible blocks than k - 1)."""
    batch, heads, n, _ = k.shape
    blocks = math.ceil(n / block_size)
    padded = k.float() if n % block_size == 0 else F.pad(k.float(), (0, 0, 0, blocks * block_size - n))
    lengths = torch.full((blocks,), float(block_size), device=k.device)
    lengths[-1] = n - (blocks - 1) * block_size
    centroids = padded.view(batch, heads, blocks, block_size, -1).sum(3) / lengths[:, None]
    count = min(top_k - 1 if (causal or force_own_block) else top_k, blocks)
    if count <= 0:
        empty = torch.empty(batch, heads, n, 0, dtype=torch.long, device=q.device)
        return empty, empty.bool()
    if kernels.usable(q):  # the same choice, without the score matrix
        return kernels.route(q.float(), centroids, block_size, count, causal, force_own_block)
    scores = q.float() @ centroids.transpose(-1, -2)  # (B, H, N, blocks)
    own = torch.arange(n, device=q.device) // block_size
    block = torch.arange(blocks, device=q.device)
    if causal:
        eligible = block[None, :] < own[:, None]  # entirely in the past
    elif force_own_block:
        eligible = block[None, :] != own[:, None]
    else:
        eligible = torch.ones(n, blocks, dtype=torch.bool, device=q.device)
    scores = scores.masked_fill(~eligible, float("-inf"))
    values, chosen = scores.topk(count, dim=-1)
    return chosen, values > float("-inf")


def _check(q, k, v, block_size, top_k, implementation) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be (batch, heads, sequence, head_dim)")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit together")
    if block_size < 1:
        raise ValueError(f"block_size {block_size!r} must be >= 1")
    if top_k < 1:
        raise ValueError(f"top_k {top_k!r} must be >= 1")
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown implementation {implementation!r}; choose from: {', '.join(IMPLEMENTATIONS)}")


def moba_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_size: int,
    top_k: int,
    causal: bool = True,
    force_own_block: bool | None = None,
    key_conv: torch.Tensor | None = None,
    scale: float | None = None,
    implementation: str = "auto",
) -> torch.Tensor:
    """MoBA attention. q (B, Hq, N, D); k, v (B, Hkv, N, D) with Hq a multiple of Hkv.

    force_own_block: default True when causal (required there), False otherwise.
    key_conv: optional depthwise key convolution weight (Hkv, D, width), applied to the keys
    before routing and attention.
    implementation: "gather" (tiles of queries per chosen block, batched matmuls; any device),
    "kernel" (numba, CPU: query by query over the selected keys), "reference" (dense, exact
    mask), or "auto" (gather, except the kernel on CPU for small blocks or narrow heads).
    """
    _check(q, k, v, block_size, top_k, implementation)
    if force_own_block is None:
        force_own_block = causal
    if causal and not force_own_block:
        raise ValueError(
            "causal MoBA always attends to the query's own block; force_own_block=False needs causal=False"
        )
    if key_conv is not None:
        k = key_convolution(k, key_conv, causal)
    k, v = expand_kv_heads(q, k, v)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    chosen, valid = select_blocks(q.detach(), k.detach(), block_size, top_k, causal, force_own_block)
    if implementation == "auto":
        # on CPU, gather's batched matmuls win when a tile's products are big enough (heads of
        # 64, blocks of 128: 1.4-2.4x faster than the kernel, forward+backward); the kernel wins
        # in the ViT's shapes (heads of 16, blocks of 14-16: 1.3-1.5x) (`python bench/attention.py --vit`)
        small = block_size < GATHER_MIN_BLOCK or q.shape[-1] < GATHER_MIN_HEAD_DIM
        implementation = "kernel" if small and kernels.usable(q) else "gather"
    if implementation == "reference":
        return _reference(q, k, v, block_size, chosen, valid, causal, force_own_block, scale)
    if implementation == "kernel":
        if not kernels.usable(q):
            raise ValueError("implementation 'kernel' needs numba and CPU tensors; use 'gather' or 'auto'")
        out = kernels.moba_kernel(
            _working(q), _working(k), _working(v), block_size, chosen, valid, causal, force_own_block, scale
        )
        return out.to(q.dtype)
    return _gather(q, k, v, block_size, chosen, valid, causal, force_own_block, scale)


def selection_mask(
    n: int, block_size: int, chosen: torch.Tensor, valid: torch.Tensor, causal: bool, force_own_block: bool
) -> torch.Tensor:
    """(B, H, N, N) bool: key j is allowed for query t."""
    blocks = math.ceil(n / block_size)
    picked = torch.zeros(*chosen.shape[:-1], blocks + 1, dtype=torch.bool, device=chosen.device)
    picked.scatter_(-1, torch.where(valid, chosen, blocks), True)  # invalid picks land in a spare column
    picked = picked[..., :blocks]
    position = torch.arange(n, device=chosen.device)
    if force_own_block:
        picked[..., position, position // block_size] = True
    allowed = picked[..., position // block_size]  # (B, H, N, N): block of key j chosen by query t
    if causal:
        allowed = allowed & (position[None, :] <= position[:, None])
    return allowed


def _working(x: torch.Tensor) -> torch.Tensor:
    """Attention arithmetic in at least fp32 (fp16/bf16 inputs are upcast; fp64 stays fp64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _reference(q, k, v, block_size, chosen, valid, causal, force_own_block, scale) -> torch.Tensor:
    allowed = selection_mask(q.shape[2], block_size, chosen, valid, causal, force_own_block)
    scores = (_working(q) @ _working(k).transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (scores.softmax(-1) @ _working(v)).to(q.dtype)


def _blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """(B, H, N, D) -> (B*H, blocks, block_size, D), zero-padded."""
    batch, heads, n, dim = x.shape
    blocks = math.ceil(n / block_size)
    return F.pad(x, (0, 0, 0, blocks * block_size - n)).reshape(batch * heads, blocks, block_size, dim)


def _plan(n, bh, block_size, chosen, valid, causal, force_own_block, device):
    """The tiles of the gather path. Every (query, chosen block) pair, the forced own block
    included, joins the group of its (batch x head, key block); each group is cut into tiles of
    TILE_ROWS queries. Pairs that may read only part of their block (the own block when causal,
    the short last block) form groups of their own, whose tiles come first: only those
    `masked_tiles` need their scores masked. Returns (rows, tile_group, limit, pair_tile,
    pair_row, pair_query, masked_tiles): rows (tiles, TILE_ROWS) the query row of (BH*N) in each
    tile slot (bh*n: a padding slot), tile_group each tile's (batch x head, key block), limit the
    last key of the block a slot may read (the query itself in its own block when causal, the
    last real key otherwise; -1 for padding), and for every pair its tile, slot and query row."""
    blocks = math.ceil(n / block_size)
    head_index, query, slot = valid.view(bh, n, -1).nonzero(as_tuple=True)
    key_block = chosen.view(bh, n, -1)[head_index, query, slot]
    own = torch.zeros_like(query, dtype=torch.bool)
    if force_own_block:
        all_heads = torch.arange(bh, device=device).repeat_interleave(n)
        all_queries = torch.arange(n, device=device).repeat(bh)
        head_index = torch.cat([all_heads, head_index])
        query = torch.cat([all_queries, query])
        key_block = torch.cat([all_queries // block_size, key_block])
        own = torch.cat([torch.ones(bh * n, dtype=torch.bool, device=device), own])
    last_key = (torch.clamp(n - key_block * block_size, max=block_size) - 1).to(torch.long)
    if causal:
        last_key = torch.where(own, query - key_block * block_size, last_key)
    groups = bh * blocks
    group = head_index * blocks + key_block
    # pairs that read a whole block go to groups + group: after every partly read one
    tiling = torch.where(last_key < block_size - 1, group, group + groups)
    order = torch.argsort(tiling, stable=True)
    tiling, head_index, query, last_key = (x[order] for x in (tiling, head_index, query, last_key))
    # each group is cut into tiles of TILE_ROWS queries, so padding wastes less than one tile
    # per group however unequal the groups are
    counts = torch.bincount(tiling, minlength=2 * groups)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(tiling.numel(), device=device) - starts[tiling]
    tiles_per_group = (counts + TILE_ROWS - 1) // TILE_ROWS
    first_tile = torch.cumsum(tiles_per_group, 0) - tiles_per_group
    pair_tile, pair_row = first_tile[tiling] + rank // TILE_ROWS, rank % TILE_ROWS
    tile_group = torch.repeat_interleave(torch.arange(2 * groups, device=device) % groups, tiles_per_group)
    masked_tiles = int(tiles_per_group[:groups].sum())
    pair_query = head_index * n + query  # row of (BH*N, D)
    tiles = tile_group.numel()
    rows = torch.full((tiles, TILE_ROWS), bh * n, dtype=torch.long, device=device)
    rows[pair_tile, pair_row] = pair_query
    limit = torch.full((tiles, TILE_ROWS), -1, dtype=torch.long, device=device)
    limit[pair_tile, pair_row] = last_key
    return rows, tile_group, limit, pair_tile, pair_row, pair_query, masked_tiles


def _mask_scores(s: torch.Tensor, limit: torch.Tensor) -> None:
    """Scores of keys past each slot's limit (future keys, the short last block's padding,
    padding slots) become -inf, in place."""
    keys = torch.arange(s.shape[-1], device=s.device)
    s.masked_fill_(keys > limit[..., None], float("-inf"))


def _chunks(tiles: int, masked_tiles: int, block_size: int, device: torch.device):
    """(start, stop, masked) ranges of tiles whose score matrices hold about TILE_CHUNK_SCORES
    elements on CPU: the temporaries stay small enough to be reused from the heap (and warm in
    cache) instead of being mapped, page-faulted and unmapped by the allocator on every call.
    On a GPU, chunks are GPU_CHUNK_FACTOR times larger (fewer, larger launches). No range
    mixes the first `masked_tiles` (whose scores need masking) with the rest."""
    budget = TILE_CHUNK_SCORES * (1 if device.type == "cpu" else GPU_CHUNK_FACTOR)
    step = max(1, budget // (TILE_ROWS * block_size))
    return [
        (start, min(start + step, stop), masked)
        for first, stop, masked in ((0, masked_tiles, True), (masked_tiles, tiles, False))
        for start in range(first, stop, step)
    ]


class _GatherFunction(torch.autograd.Function):
    """MoBA over tiles of queries grouped by chosen key block: two batched matmuls forward,
    five backward (scores recomputed from the saved log-sum-exp, as FlashAttention does), a
    chunk of tiles at a time, and no autograd graph through the gathers and the merge."""

    @staticmethod
    def forward(ctx, q_rows, kb, vb, plan):
        rows, tile_group, limit, pair_tile, pair_row, pair_query, masked_tiles = plan
        bh_n, dim = q_rows.shape[0] - 1, q_rows.shape[1]  # q_rows ends with the padding slots' zero row
        block_size = kb.shape[1]
        # the pairs are in tile order: a chunk of tiles holds a contiguous range of them
        bounds = torch.searchsorted(pair_tile, torch.arange(rows.shape[0] + 1, device=pair_tile.device)).tolist()
        out_all = q_rows.new_empty(pair_tile.numel(), dim)
        lse_all = q_rows.new_empty(pair_tile.numel())
        for a, b, masked in _chunks(rows.shape[0], masked_tiles, block_size, rows.device):
            group = tile_group[a:b]
            s = torch.bmm(q_rows[rows[a:b]], kb[group].transpose(-1, -2))  # (tiles, TILE_ROWS, bs)
            if masked:
                _mask_scores(s, limit[a:b])
            peak = s.amax(-1, keepdim=True)
            if masked:
                peak = peak.masked_fill_(peak == float("-inf"), 0.0)  # padding slots: no key at all
            p = s.sub_(peak).exp_()
            total = p.sum(-1, keepdim=True)
            out_tiles = torch.bmm(p, vb[group]).div_(total.clamp_min_(torch.finfo(total.dtype).tiny))
            lse_tiles = (peak + total.log()).squeeze(-1)
            first, last = bounds[a], bounds[b]
            tile, row = pair_tile[first:last] - a, pair_row[first:last]
            out_all[first:last], lse_all[first:last] = out_tiles[tile, row], lse_tiles[tile, row]
        # merge the parts of each query: L = logsumexp_p l_p, o = sum_p exp(l_p - L) o_p
        top = lse_all.new_full((bh_n,), float("-inf")).scatter_reduce(0, pair_query, lse_all, reduce="amax")
        total_q = lse_all.new_zeros(bh_n).index_add_(0, pair_query, (lse_all - top[pair_query]).exp())
        lse = top + total_q.log()
        weight = (lse_all - lse[pair_query]).exp_()
        out = out_all.new_zeros(bh_n, dim).index_add_(0, pair_query, out_all.mul_(weight[:, None]))
        ctx.save_for_backward(q_rows, kb, vb, out, lse, rows, tile_group, limit)
        ctx.masked_tiles = masked_tiles
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q_rows, kb, vb, out, lse, rows, tile_group, limit = ctx.saved_tensors
        dim = q_rows.shape[1]
        block_size = kb.shape[1]
        dout = dout.contiguous()
        pad = lambda x, value: torch.cat([x, x.new_full((1, *x.shape[1:]), value)])  # noqa: E731
        do_rows = pad(dout, 0.0)
        lse_rows = pad(lse, float("inf"))  # padding slots: p = 0
        delta_rows = pad((dout * out).sum(-1), 0.0)
        dq = torch.zeros_like(q_rows)
        dkb, dvb = torch.zeros_like(kb), torch.zeros_like(vb)
        for a, b, masked in _chunks(rows.shape[0], ctx.masked_tiles, block_size, rows.device):
            chunk_rows, group = rows[a:b], tile_group[a:b]
            q_tiles, do_tiles = q_rows[chunk_rows], do_rows[chunk_rows]
            keys, values = kb[group], vb[group]
            s = torch.bmm(q_tiles, keys.transpose(-1, -2))
            if masked:
                _mask_scores(s, limit[a:b])
            p = s.sub_(lse_rows[chunk_rows][..., None]).exp_()
            ds = torch.bmm(do_tiles, values.transpose(-1, -2)).sub_(delta_rows[chunk_rows][..., None]).mul_(p)
            dq.index_add_(0, chunk_rows.reshape(-1), torch.bmm(ds, keys).reshape(-1, dim))
            dkb.index_add_(0, group, torch.bmm(ds.transpose(-1, -2), q_tiles))
            dvb.index_add_(0, group, torch.bmm(p.transpose(-1, -2), do_tiles))
        return dq, dkb, dvb, None


def _gather(q, k, v, block_size, chosen, valid, causal, force_own_block, scale) -> torch.Tensor:
    batch, heads, n, dim = q.shape
    bh, blocks = batch * heads, math.ceil(n / block_size)
    q_rows = (_working(q) * scale).reshape(bh * n, dim)  # scaled once, not every score
    q_rows = torch.cat([q_rows, q_rows.new_zeros(1, dim)])  # the row that padding slots read
    kb = _blocks(_working(k), block_size).reshape(bh * blocks, block_size, dim)  # (groups, bs, D)
    vb = _blocks(_working(v), block_size).reshape(bh * blocks, block_size, dim)
    plan = _plan(n, bh, block_size, chosen, valid, causal, force_own_block, q.device)
    if plan[0].numel() == 0:  # an empty sequence: nothing to attend to
        return torch.zeros_like(q)
    # padding slots read keys too, unmasked, but their results are never used and their
    # gradients are zero
    out = _GatherFunction.apply(q_rows, kb, vb, plan)
    return out.view(batch, heads, n, dim).to(q.dtype)


def tile_order(rows: int, cols: int, tile_rows: int, tile_cols: int) -> torch.Tensor:
    """A permutation of a rows x cols grid of patch tokens (raster order) such that each run of
    tile_rows * tile_cols consecutive tokens is one square-ish tile, not a raster strip:
    `tokens[:, order]` puts patch (r, c) at ((r // th) * (cols // tw) + c // tw) * th * tw +
    (r % th) * tw + c % tw. Undo with `tokens[:, inverse_order(order)]`."""
    if rows % tile_rows or cols % tile_cols:
        raise ValueError(f"tiles {tile_rows}x{tile_cols} do not divide the {rows}x{cols} grid")
    r = torch.arange(rows)[:, None]
    c = torch.arange(cols)[None, :]
    tile_size = tile_rows * tile_cols
    destination = ((r // tile_rows) * (cols // tile_cols) + c // tile_cols) * tile_size
    destination = destination + (r % tile_rows) * tile_cols + c % tile_cols
    order = torch.empty(rows * cols, dtype=torch.long)
    order[destination.reshape(-1)] = torch.arange(rows * cols)
    return order


def inverse_order(order: torch.Tensor) -> torch.Tensor:
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return inverse
