"""Sparse topology: density distributions, masks, `sparsify(model)`, the masked backend."""

from neuroplast.sparse.distributions import DISTRIBUTIONS, layer_counts, layer_densities
from neuroplast.sparse.kernels import retain_freed_memory
from neuroplast.sparse.topology import BACKENDS, LayerStats, Topology, select_layers, sparsify

__all__ = [
    "BACKENDS",
    "DISTRIBUTIONS",
    "LayerStats",
    "Topology",
    "layer_counts",
    "layer_densities",
    "retain_freed_memory",
    "select_layers",
    "sparsify",
]
