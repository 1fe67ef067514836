"""Multi-head attention modules: dense (scaled_dot_product_attention) and MoBA."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from neuroplast.attention.moba import (
    MoBAOptions,
    expand_kv_heads,
    head_views,
    inverse_order,
    key_convolution,
    moba_attention_packed,
    tile_order,
)

ATTENTIONS = ("dense", "moba")


class TileOrder(nn.Module):
    """Image tokens in tile order and back: for a (rows, cols) grid of tokens in raster order
    and a (rows, cols) tile, `tiled(x)` reorders x (batch, tokens, ...) so that each run of
    tile-area consecutive tokens is one tile (see `tile_order`), and `raster(x)` puts them back.
    A MoBA block of one tile's tokens is then a square patch of the image, not a raster strip.
    The permutations are buffers (they follow the module's device), not saved in state_dict."""

    def __init__(self, grid: tuple[int, int], tile: tuple[int, int]):
        super().__init__()
        order = tile_order(*grid, *tile)
        self.register_buffer("order", order, persistent=False)
        self.register_buffer("restore", inverse_order(order), persistent=False)

    def tiled(self, x: torch.Tensor) -> torch.Tensor:
        """x (batch, tokens, ...) in raster order, reordered tile by tile."""
        if x.shape[1] != self.order.numel():
            raise ValueError(f"{x.shape[1]} tokens, but the tile order was built for {self.order.numel()}")
        return x[:, self.order]

    def raster(self, x: torch.Tensor) -> torch.Tensor:
        """x (batch, tokens, ...) in tile order, put back in raster order."""
        return x[:, self.restore]


class MoBAttention(nn.Module):
    """Multi-head self-attention over (batch, tokens, dim) with MoBA routing, or dense attention
    (`full=True`: the "hybrid" layers of a MoBA model).

    kv_heads < heads shares each key/value head among heads // kv_heads query heads (GQA).
    key_conv: width of the optional depthwise key convolution (None: off); it starts as the
    identity. grid / tile: for image tokens, the (rows, cols) patch grid and the (rows, cols)
    tile that makes one block: tokens are reordered tile by tile before attention and put back
    after, so a block is a square tile rather than a raster strip (block_size must equal the
    tile's area). routing: "token" (each query picks its blocks, as in the MoBA paper) or
    "block" (non-causal: a block of queries picks by its mean query, and all of them read the
    same blocks; computed as tiles).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        block_size: int,
        top_k: int,
        kv_heads: int | None = None,
        causal: bool = False,
        force_own_block: bool | None = None,
        key_conv: int | None = None,
        grid: tuple[int, int] | None = None,
        tile: tuple[int, int] | None = None,
        full: bool = False,
        implementation: str = "auto",
        routing: str = "token",
    ):
        super().__init__()
        kv_heads = kv_heads or heads
        if dim % heads:
            raise ValueError(f"dim {dim} is not a multiple of heads {heads}")
        if heads % kv_heads:
            raise ValueError(f"heads {heads} is not a multiple of kv_heads {kv_heads}")
        if (grid is None) != (tile is None):
            raise ValueError("give both grid and tile (or neither)")
        if tile is not None and tile[0] * tile[1] != block_size:
            raise ValueError(
                f"a {tile[0]}x{tile[1]} tile holds {tile[0] * tile[1]} tokens, not block_size {block_size}"
            )
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.causal, self.full = causal, full
        # dense layers route nothing: their routing settings are not checked against causal
        self.options = MoBAOptions(
            block_size,
            top_k,
            causal=causal and not full,
            force_own_block=force_own_block if not full else None,
            implementation=implementation,
            routing=routing,
        )
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.head_dim)
        self.out = nn.Linear(dim, dim)
        self.key_conv = None
        if key_conv is not None:
            weight = torch.zeros(kv_heads, self.head_dim, key_conv)
            weight[..., -1 if causal else key_conv // 2] = 1.0  # identity at the current token
            self.key_conv = nn.Parameter(weight)
        self.tiles = TileOrder(grid, tile) if grid is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Self-attention over x (batch, tokens, dim); returns the same shape, tokens in x's order."""
        batch, n, dim = x.shape
        if self.tiles is not None:
            x = self.tiles.tiled(x)
        q = self.q(x).view(batch, n, self.heads, self.head_dim)
        kv = self.kv(x).view(batch, n, 2, self.kv_heads, self.head_dim)  # keys, values
        if self.full:
            q, k, v = head_views(q, kv)
            if self.key_conv is not None:
                k = key_convolution(k, self.key_conv, self.causal)
            k, v = expand_kv_heads(q, k, v)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal).transpose(1, 2)
        else:
            y = moba_attention_packed(q, kv, self.options, key_conv=self.key_conv)
        y = self.out(y.reshape(batch, n, dim))
        return self.tiles.raster(y) if self.tiles is not None else y

    def extra_repr(self) -> str:
        options = self.options
        kind = (
            "full" if self.full else f"moba block={options.block_size} top_k={options.top_k} routing={options.routing}"
        )
        return f"heads={self.heads}, kv_heads={self.kv_heads}, {kind}, causal={self.causal}"
