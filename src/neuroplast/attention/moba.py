"""Mixture of Block Attention (MoBA; Lu et al., arXiv:2502.13189), exact per-token routing.

Keys are cut into contiguous blocks of `block_size` (the last one may be short). Each query
scores every block by q . mean(K_block) (fp32, unscaled, no gradient: routing is a hard choice)
and attends to its top-k blocks only; the outputs of the parts are merged exactly with their
log-sum-exps.

- causal: the query's own block is always chosen (token-level causal mask inside it) and counts
  in k; history blocks are those entirely in the past; future blocks are never chosen.
- non-causal (images): every block is eligible; `force_own_block` adds the own block (counting
  in k) as a locality prior.

Four implementations give the same result (tests hold them to it):
- `reference`: dense attention with the exact N x N selection mask (O(N^2); the test oracle);
- `gather` (any device; `attention/gather.py`): cost proportional to the selected blocks. The
  (query, chosen block) pairs are grouped by key block, each group a dense problem; groups are
  sorted by size and padded per chunk, so a chunk is a few batched matmuls. On CPU the own
  blocks run as one block-diagonal attention in PyTorch's fused kernel. The parts of a query
  are merged by log-sum-exp; a custom backward recomputes the scores from it.
- `kernel` (CPU): numba kernels that walk each query's selected keys (`attention/kernels.py`);
- `flex` (the GPU path; `attention/flex.py`): FlexAttention with a BlockMask over the pairs
  sorted by key block.

`routing="block"` (non-causal only) routes a whole block of queries at once, BiFormer-style: the
block's mean query scores every key block, and all queries of the block attend to the same top-k
blocks. Every implementation above accepts it (each query takes its block's choice), and one more
is made for it: `tiles` (any device), one fused attention call per query block against its k
gathered key blocks, with no merge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.profiler import record_function

from neuroplast.attention import flex, gather, kernels, tiles

IMPLEMENTATIONS = ("auto", "flex", "gather", "kernel", "reference", "tiles")
ROUTINGS = ("token", "block")  # per-token (the MoBA paper), per query block (non-causal only)
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
    q: torch.Tensor,
    k: torch.Tensor,
    block_size: int,
    top_k: int,
    causal: bool,
    force_own_block: bool,
    routing: str = "token",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The routing: (chosen, valid), each (B, H, N, c), for q (B, H, N, D) and k (B, Hkv, N, D).
    chosen[..., t, :] are the blocks query t attends to besides its forced own block (all of
    them when the own block is not forced); valid marks real choices (early causal queries have
    fewer eligible blocks than k - 1). With routing="block" each query takes its block's choice
    (`select_query_blocks`)."""
    with record_function("moba: routing"):
        if routing == "block":
            chosen, valid = select_query_blocks(q, k, block_size, top_k, force_own_block)
            return tuple(x.repeat_interleave(block_size, dim=2)[:, :, : q.shape[2]] for x in (chosen, valid))
        return _select_blocks(q, k, block_size, top_k, causal, force_own_block)


@torch.no_grad()
def select_query_blocks(
    q: torch.Tensor, k: torch.Tensor, block_size: int, top_k: int, force_own_block: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-query-block routing (non-causal), (chosen, valid), each (B, H, blocks, c): query block
    i scores key block j by mean(Q_i) . mean(K_j) (fp32, unscaled, no gradient; the means over
    the real tokens of a short last block) and takes its top c = k blocks, or its own block and
    the top k - 1 others when `force_own_block`. Every block is eligible, so every choice is
    valid."""
    blocks = math.ceil(q.shape[2] / block_size)
    scores = _centroids(q, block_size) @ _centroids(k, block_size).repeat_interleave(
        q.shape[1] // k.shape[1], dim=1
    ).transpose(-1, -2)  # (B, H, blocks, blocks)
    count = min(top_k - 1 if force_own_block else top_k, blocks - int(force_own_block))
    if force_own_block:
        own = torch.arange(blocks, device=q.device)
        scores[..., own, own] = float("-inf")
    chosen = scores.topk(max(count, 0), dim=-1).indices
    return chosen, torch.ones_like(chosen, dtype=torch.bool)


def _centroids(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """(B, H, N, D) -> (B, H, blocks, D) fp32: the mean of each block's tokens (a short last
    block: of its real tokens)."""
    batch, heads, n, _ = x.shape
    blocks = math.ceil(n / block_size)
    padded = x.float() if n % block_size == 0 else F.pad(x.float(), (0, 0, 0, blocks * block_size - n))
    lengths = torch.full((blocks,), float(block_size), device=x.device)
    lengths[-1] = n - (blocks - 1) * block_size
    return padded.view(batch, heads, blocks, block_size, -1).sum(3) / lengths[:, None]


def _select_blocks(q, k, block_size, top_k, causal, force_own_block):
    batch, heads, n, _ = k.shape
    blocks = math.ceil(n / block_size)
    centroids = _centroids(k, block_size)
    count = min(top_k - 1 if (causal or force_own_block) else top_k, blocks)
    if count <= 0:
        empty = torch.empty(batch, q.shape[1], n, 0, dtype=torch.long, device=q.device)
        return empty, empty.bool()
    if kernels.usable(q):  # the same choice: scores a chunk at a time, no sort
        return kernels.route(q.float(), centroids, block_size, count, causal, force_own_block)
    centroids = centroids.repeat_interleave(q.shape[1] // heads, dim=1)  # one per query head
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


def check_routing(routing: str, causal: bool) -> None:
    """An error naming the choices for an unknown routing, and for block routing with causal
    attention (a block's mean query includes later tokens)."""
    if routing not in ROUTINGS:
        raise ValueError(f"unknown routing {routing!r}; choose from: {', '.join(ROUTINGS)}")
    if routing == "block" and causal:
        raise ValueError(
            "routing 'block' needs causal=False: a block's mean query includes later tokens, which a "
            "causal query must not see; use routing='token'"
        )


@dataclass(frozen=True)
class MoBAOptions:
    """How MoBA routes and computes: the settings `moba_attention`, `moba_attention_packed` and
    `MoBAttention` share, checked when made.

    block_size: tokens per key block (the last block may be short).
    top_k: blocks each query attends to (its own block among them when forced).
    causal: token-causal attention: the own block is always chosen (a token-level causal mask
        inside it), history blocks are those entirely in the past, future blocks never count.
    force_own_block: every query also reads its own block, which counts in top_k; default True
        when causal (required there), False otherwise. Made concrete (a bool) when checked.
    scale: the softmax scale; None: 1 / sqrt(head dim).
    implementation: "flex" (FlexAttention over the (query, block) pairs sorted by block; the
        GPU path, inference-only on CPU), "gather" (queries grouped by chosen block, batched
        matmuls; any device), "kernel" (numba, CPU: query by query over the selected keys),
        "reference" (dense, exact mask), "tiles" (routing="block" only: one fused attention call
        over every query block and its chosen key blocks; any device), or "auto" (with
        routing="block", tiles; else flex on CUDA, and on CPU gather, except the kernel for small
        blocks or narrow heads).
    routing: "token" (each query chooses its blocks: the MoBA paper) or "block" (non-causal
        only: each block of queries chooses by its mean query, and all its queries attend to
        the same blocks).
    """

    block_size: int
    top_k: int
    causal: bool = True
    force_own_block: bool | None = None
    scale: float | None = None
    implementation: str = "auto"
    routing: str = "token"

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size {self.block_size!r} must be >= 1")
        if self.top_k < 1:
            raise ValueError(f"top_k {self.top_k!r} must be >= 1")
        if self.implementation not in IMPLEMENTATIONS:
            raise ValueError(
                f"unknown implementation {self.implementation!r}; choose from: {', '.join(IMPLEMENTATIONS)}"
            )
        check_routing(self.routing, self.causal)
        if self.implementation == "tiles" and self.routing != "block":
            raise ValueError(
                "implementation 'tiles' needs routing='block' (a block of queries sharing its blocks); "
                "with routing='token' choose from: auto, flex, gather, kernel, reference"
            )
        if self.force_own_block is None:
            object.__setattr__(self, "force_own_block", self.causal)
        elif self.causal and not self.force_own_block:
            raise ValueError(
                "causal MoBA always attends to the query's own block; force_own_block=False needs causal=False"
            )

    def scale_for(self, q: torch.Tensor) -> float:
        """The softmax scale for queries q (..., D)."""
        return q.shape[-1] ** -0.5 if self.scale is None else self.scale


def _check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be (batch, heads, sequence, head_dim)")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit together")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} key/value heads")


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
    routing: str = "token",
) -> torch.Tensor:
    """MoBA attention. q (B, Hq, N, D); k, v (B, Hkv, N, D) with Hq a multiple of Hkv.

    block_size, top_k, causal, force_own_block, scale, implementation, routing: the settings of
    `MoBAOptions` (see there for each).
    key_conv: optional depthwise key convolution weight (Hkv, D, width), applied to the keys
    before routing and attention.
    """
    options = MoBAOptions(block_size, top_k, causal, force_own_block, scale, implementation, routing)
    return _attention(q, k, v, options, key_conv)


def moba_attention_packed(
    q: torch.Tensor, kv: torch.Tensor, options: MoBAOptions, key_conv: torch.Tensor | None = None
) -> torch.Tensor:
    """`moba_attention` in the layout of the projections: q (B, N, Hq, D) and kv (B, N, 2, Hkv, D)
    (keys, then values), as `linear(x).view(...)` gives them; returns (B, N, Hq, D). The numba
    kernels read and write this layout as it is, so no copies are made on the way in or out (nor
    for the gradients); the other implementations run on head views of it."""
    if q.dim() != 4 or kv.dim() != 5 or kv.shape[2] != 2:
        raise ValueError(f"q {tuple(q.shape)} must be (B, N, H, D) and kv {tuple(kv.shape)} (B, N, 2, Hkv, D)")
    heads = head_views(q, kv)
    _check_shapes(*heads)
    if q.shape[1] == 0:
        return q.new_zeros(q.shape)
    kernel_dtype = q.dtype == kv.dtype and q.dtype in (torch.float32, torch.float64)
    if _resolve(options, heads[0]) != "kernel" or key_conv is not None or not kernel_dtype:
        return _attention(*heads, options, key_conv).transpose(1, 2)
    return _kernel(q.contiguous(), kv.contiguous(), options, options.scale_for(q))


def _attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, options: MoBAOptions, key_conv: torch.Tensor | None
) -> torch.Tensor:
    """`moba_attention` with its settings checked."""
    _check_shapes(q, k, v)
    if q.shape[2] == 0:  # no tokens: nothing to route or attend to
        return q.new_zeros(q.shape)
    block_size, top_k, causal = options.block_size, options.top_k, options.causal
    force_own_block, routing = options.force_own_block, options.routing
    if key_conv is not None:
        k = key_convolution(k, key_conv, causal)
    scale = options.scale_for(q)
    implementation = _resolve(options, q)
    if implementation == "kernel":  # into the kernels' layout: one copy of q, one of k and v
        kv = torch.stack((_working(k).transpose(1, 2), _working(v).transpose(1, 2)), dim=2)
        out = _kernel(kernels.packed(_working(q)), kv, options, scale)
        return out.transpose(1, 2).to(q.dtype)
    if implementation == "tiles":
        chosen = select_query_blocks(q.detach(), k.detach(), block_size, top_k, force_own_block)[0]
        return tiles.attention(q, k, v, block_size, chosen, force_own_block, scale)
    chosen, valid = select_blocks(q.detach(), k.detach(), block_size, top_k, causal, force_own_block, routing)
    k, v = expand_kv_heads(q, k, v)
    if implementation == "flex":
        flex.check(q, k, v)
        return flex.moba_flex(q, k, v, block_size, chosen, valid, causal, force_own_block, scale)
    if implementation == "reference":
        return _reference(q, k, v, block_size, chosen, valid, causal, force_own_block, scale)
    return _gather(q, k, v, block_size, chosen, valid, causal, force_own_block, scale)


def head_views(q: torch.Tensor, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (B, N, H, D) and kv (B, N, 2, Hkv, D) as (B, heads, N, D) views q, k, v (no copies)."""
    k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
    return q.transpose(1, 2), k, v


def _kernel(q: torch.Tensor, kv: torch.Tensor, options: MoBAOptions, scale: float) -> torch.Tensor:
    """Routing and the numba kernels on q (B, N, H, D), kv (B, N, 2, Hkv, D), C-contiguous."""
    heads, k, _ = head_views(q, kv)
    block_size, causal, own = options.block_size, options.causal, options.force_own_block
    chosen, valid = select_blocks(heads.detach(), k.detach(), block_size, options.top_k, causal, own, options.routing)
    return kernels.attention(q, kv, block_size, chosen, valid, causal, own, scale)


def _resolve(options: MoBAOptions, q: torch.Tensor) -> str:
    """The implementation that runs ("auto" made concrete); an error for "kernel" where it cannot."""
    implementation = options.implementation
    if implementation == "auto" and options.routing == "block":
        # one fused attention call over all the tiles: faster than the kernel at 16K tokens
        # (blocks of 128, heads of 64: 2.7x forward, 1.9x forward + backward) and at 784 ViT
        # tokens (blocks of 16, heads of 16: 1.1-1.2x), slower at 196 for forward + backward
        # (`python bench/attention.py --routing block --vit`)
        return "tiles"
    if implementation == "auto" and flex.preferred(q):
        return "flex"
    if implementation == "auto":
        # on CPU, gather's batched matmuls win when a group's products are big enough (heads of
        # 64, blocks of 128: 1.1-2.4x faster than the kernel); the kernel wins in the ViT's
        # shapes (heads of 16, blocks of 14-16: 1.2-1.5x) (`python bench/attention.py --vit`)
        small = options.block_size < GATHER_MIN_BLOCK or q.shape[-1] < GATHER_MIN_HEAD_DIM
        return "kernel" if small and kernels.usable(q) else "gather"
    if implementation == "kernel" and not kernels.usable(q):
        raise ValueError("implementation 'kernel' needs numba and CPU tensors; use 'gather' or 'auto'")
    return implementation


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


def _gather(q, k, v, block_size, chosen, valid, causal, force_own_block, scale) -> torch.Tensor:
    out = gather.attention(
        _working(q), _working(k), _working(v), block_size, chosen, valid, causal, force_own_block, scale
    )
    return out.to(q.dtype)


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


def square_tile(rows: int, cols: int, block_size: int) -> tuple[int, int]:
    """The most square tile (th, tw) with th * tw = block_size that divides a rows x cols grid."""
    best = None
    for th in range(1, block_size + 1):
        if block_size % th or rows % th or cols % (block_size // th):
            continue
        tw = block_size // th
        if best is None or abs(math.log(th / tw)) < abs(math.log(best[0] / best[1])):
            best = (th, tw)
    if best is None:
        valid = sorted(
            {th * tw for th in range(1, rows + 1) if rows % th == 0 for tw in range(1, cols + 1) if cols % tw == 0}
        )
        raise ValueError(
            f"block_size {block_size} cannot be a tile of the {rows}x{cols} patch grid; "
            f"choose from: {', '.join(map(str, valid[:12]))}{', ...' if len(valid) > 12 else ''}"
        )
    return best


def inverse_order(order: torch.Tensor) -> torch.Tensor:
    """The permutation that undoes `order`: `x[:, order][:, inverse_order(order)]` is x."""
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return inverse
