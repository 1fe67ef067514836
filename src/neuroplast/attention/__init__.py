"""Attention: Mixture of Block Attention (MoBA) and a dense baseline. Imports nothing else of neuroplast
but the numba runtime (`neuroplast.compiled`)."""

from neuroplast.attention import kernels
from neuroplast.attention.layers import ATTENTIONS, MoBAttention, TileOrder
from neuroplast.attention.moba import (
    IMPLEMENTATIONS,
    ROUTINGS,
    MoBAOptions,
    inverse_order,
    key_convolution,
    moba_attention,
    moba_attention_packed,
    select_blocks,
    select_query_blocks,
    selection_mask,
    square_tile,
    tile_order,
)

__all__ = [
    "ATTENTIONS",
    "IMPLEMENTATIONS",
    "MoBAOptions",
    "MoBAttention",
    "ROUTINGS",
    "TileOrder",
    "inverse_order",
    "kernels",
    "key_convolution",
    "moba_attention",
    "moba_attention_packed",
    "select_blocks",
    "select_query_blocks",
    "selection_mask",
    "square_tile",
    "tile_order",
]
