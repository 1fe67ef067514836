"""A small Vision Transformer whose attention is dense or MoBA, down to one pixel per token."""

from __future__ import annotations

import torch
from torch import nn

from neuroplast.attention import ATTENTIONS, MoBAttention, TileOrder, square_tile


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, tokens, C * p * p): p x p patches, tokens in raster order."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim: int, attention: nn.Module, mlp_ratio: int, dropout: float):
        super().__init__()
        self.norm1, self.attention = nn.LayerNorm(dim), attention
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp_ratio * dim, dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Patches (patch_size x patch_size) -> linear embedding + learned positions -> `depth`
    blocks -> mean of the tokens -> classifier.

    attention: "dense" or "moba" (non-causal; each block of `block_size` tokens is a square tile
    of the patch grid; `top_k` blocks per query, the own block among them unless
    own_block=False). full_layers: the last layers use dense attention (MoBA's hybrid).
    key_conv: width of MoBA's optional key convolution (None: off). routing: MoBA's "token"
    (per query, the paper's) or "block" (per tile of queries, by its mean query).
    """

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        num_classes: int,
        patch_size: int = 4,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: int = 2,
        attention: str = "dense",
        block_size: int = 16,
        top_k: int = 3,
        own_block: bool = True,
        full_layers: int = 0,
        key_conv: int | None = None,
        routing: str = "token",
        dropout: float = 0.0,
    ):
        super().__init__()
        channels, height, width = image_shape
        if attention not in ATTENTIONS:
            raise ValueError(f"unknown attention {attention!r}; choose from: {', '.join(ATTENTIONS)}")
        if height % patch_size or width % patch_size:
            raise ValueError(f"patch_size {patch_size} does not divide the {height}x{width} image")
        if not 0 <= full_layers <= depth:
            raise ValueError(f"full_layers {full_layers} must be between 0 and depth {depth}")
        grid = (height // patch_size, width // patch_size)
        tokens = grid[0] * grid[1]
        self.patch_size = patch_size
        self.embed = nn.Linear(channels * patch_size * patch_size, dim)
        self.position = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        moba_layers = depth - full_layers if attention == "moba" else 0
        # the tokens run in tile order through all the blocks, so that each MoBA block of
        # block_size tokens is a square tile of the grid; every other operation is per token
        # (or dense attention) and the mean pools in any order, so nothing else changes
        self.tiles = TileOrder(grid, square_tile(*grid, block_size)) if moba_layers else None
        blocks = []
        for layer in range(depth):
            full = attention == "dense" or layer >= depth - full_layers
            mixer = MoBAttention(
                dim,
                heads,
                block_size=block_size,
                top_k=top_k,
                causal=False,
                force_own_block=own_block,
                key_conv=key_conv,
                full=full,
                routing=routing,
            )
            blocks.append(Block(dim, mixer, mlp_ratio, dropout))
        self.blocks = nn.Sequential(*blocks)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        return patchify(x, self.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches, position = self.patches(x), self.position
        if self.tiles is not None:
            patches, position = self.tiles.tiled(patches), self.tiles.tiled(position)
        tokens = self.embed(patches) + position
        return self.head(self.norm(self.blocks(tokens)).mean(1))
