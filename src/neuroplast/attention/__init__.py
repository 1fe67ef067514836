"""Attention: Mixture of Block Attention (MoBA) and a dense baseline. Imports nothing else of neuroplast
but the numba runtime (`neuroplast.compiled`)."""

from neuroplast.attention import kernels
from neuroplast.attention.layers import ATTENTIONS, MoBAttention
from neuroplast.attention.moba import (
    IMPLEMENTATIONS,
    ROUTINGS,
    inverse_order,
    key_convolution,
    moba_attention,
    moba_attention_packed,
    select_blocks,
    select_query_blocks,
    selection_mask,
    tile_order,
)

__all__ = [
    "ATTENTIONS",
    "IMPLEMENTATIONS",
    "MoBAttention",
    "ROUTINGS",
    "inverse_order",
    "kernels",
    "key_convolution",
    "moba_attention",
    "moba_attention_packed",
    "select_blocks",
    "select_query_blocks",
    "selection_mask",
    "tile_order",
]
