"""Multi-head attention modules: dense (scaled_dot_product_attention) and MoBA."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from neuroplast.attention.moba import (
    IMPLEMENTATIONS,
    check_routing,
    expand_kv_heads,
    head_views,
    inverse_order,
    key_convolution,
    moba_attention_packed,
    tile_order,
)

ATTENTIONS = ("dense", "moba")


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
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"unknown implementation {implementation!r}; choose from: {', '.join(IMPLEMENTATIONS)}")
        check_routing(routing, causal and not full)  # dense layers route nothing
        if (grid is None) != (tile is None):
            raise ValueError("give both grid and tile (or neither)")
        if tile is not None and tile[0] * tile[1] != block_size:
            raise ValueError(
                f"a {tile[0]}x{tile[1]} tile holds {tile[0] * tile[1]} tokens, not block_size {block_size}"
            )
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.block_size, self.top_k, self.causal = block_size, top_k, causal
        self.force_own_block, self.full, self.implementation = force_own_block, full, implementation
        self.routing = routing
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.head_dim)
        self.out = nn.Linear(dim, dim)
        self.key_conv = None
        if key_conv is not None:
            weight = torch.zeros(kv_heads, self.head_dim, key_conv)
            weight[..., -1 if causal else key_conv // 2] = 1.0  # identity at the current token
            self.key_conv = nn.Parameter(weight)
        if grid is not None:
            order = tile_order(*grid, *tile)
            self.register_buffer("order", order, persistent=False)
            self.register_buffer("restore", inverse_order(order), persistent=False)
        else:
            self.order = self.restore = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, n, dim = x.shape
        if self.order is not None:
            if n != self.order.numel():
                raise ValueError(f"{n} tokens, but the tile order was built for {self.order.numel()}")
            x = x[:, self.order]
        q = self.q(x).view(batch, n, self.heads, self.head_dim)
        kv = self.kv(x).view(batch, n, 2, self.kv_heads, self.head_dim)  # keys, values
        if self.full:
            q, k, v = head_views(q, kv)
            if self.key_conv is not None:
                k = key_convolution(k, self.key_conv, self.causal)
            k, v = expand_kv_heads(q, k, v)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal).transpose(1, 2)
        else:
            y = moba_attention_packed(
                q,
                kv,
                self.block_size,
                self.top_k,
                causal=self.causal,
                force_own_block=self.force_own_block,
                key_conv=self.key_conv,
                implementation=self.implementation,
                routing=self.routing,
            )
        y = self.out(y.reshape(batch, n, dim))
        return y[:, self.restore] if self.restore is not None else y

    def extra_repr(self) -> str:
        kind = "full" if self.full else f"moba block={self.block_size} top_k={self.top_k} routing={self.routing}"
        return f"heads={self.heads}, kv_heads={self.kv_heads}, {kind}, causal={self.causal}"
