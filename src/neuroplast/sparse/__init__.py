"""Sparse topology: density distributions, masks, `sparsify(model)`, the masked and csr backends."""

from neuroplast.sparse.connectivity import connections_per_input
from neuroplast.sparse.csr import CSRLinear
from neuroplast.sparse.distributions import DISTRIBUTIONS, layer_counts, layer_densities
from neuroplast.sparse.kernels import retain_freed_memory
from neuroplast.sparse.topology import BACKENDS, LayerStats, Topology, select_layers, sparsify

__all__ = [
    "BACKENDS",
    "CSRLinear",
    "DISTRIBUTIONS",
    "LayerStats",
    "Topology",
    "connections_per_input",
    "layer_counts",
    "layer_densities",
    "retain_freed_memory",
    "select_layers",
    "sparsify",
]
