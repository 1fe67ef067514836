"""Device-to-device graphs: one connected graph per component, Metropolis–Hastings weights.

n devices form C components of m = n / C devices each; D2D links exist only inside a component,
so the mixing matrix W is block-diagonal. Graph generators come from networkx; the weights are
the Metropolis–Hastings rule W_ij = 1 / (1 + max(deg_i, deg_j)) on edges, W_ii = 1 - sum_j W_ij:
symmetric, doubly stochastic and non-negative.

A `dynamic` topology draws a fresh random regular graph per component every round. Every graph
is a function of (seed, round, component), so the simulator, every rank of the distributed
engine and a resumed run all build the same W.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch

from neuroplast.train.config import ConfigError

if TYPE_CHECKING:
    import networkx as nx

TOPOLOGIES = ("ring", "grid", "complete", "erdos-renyi", "dynamic", "none")
MAX_TRIES = 1000  # random graphs redrawn until connected


class TopologyError(ConfigError):
    """A topology that cannot be built; the message names the bad value and the valid range."""


def grid_shape(m: int) -> tuple[int, int]:
    """The most square r x c with r * c = m and r <= c (50 -> 5 x 10)."""
    rows = max(r for r in range(1, math.isqrt(m) + 1) if m % r == 0)
    return rows, m // rows


def _connected(draw, what: str) -> nx.Graph:
    import networkx as nx

    for attempt in range(MAX_TRIES):
        graph = draw(attempt)
        if nx.is_connected(graph):
            return graph
    raise TopologyError(f"no connected {what} in {MAX_TRIES} draws; raise the edge probability or degree")


def component_graph(topology: str, m: int, seed: int = 0, edge_probability: float = 0.1, degree: int = 4) -> nx.Graph:
    """One component's graph on nodes 0..m-1 (`seed` drives the random kinds)."""
    import networkx as nx  # here: importing it takes longer than all of neuroplast

    if topology not in TOPOLOGIES:
        raise TopologyError(f"unknown topology {topology!r}; choose from: {', '.join(TOPOLOGIES)}")
    if topology == "none" or m == 1:
        graph = nx.empty_graph(m)
    elif topology == "ring":
        graph = nx.cycle_graph(m) if m >= 3 else nx.path_graph(m)
    elif topology == "grid":
        rows, cols = grid_shape(m)
        graph = nx.convert_node_labels_to_integers(nx.grid_2d_graph(rows, cols), ordering="sorted")
    elif topology == "complete":
        graph = nx.complete_graph(m)
    elif topology == "erdos-renyi":
        if not 0.0 < edge_probability <= 1.0:
            raise TopologyError(f"edge_probability {edge_probability!r} must be in (0, 1]")
        graph = _connected(
            lambda a: nx.erdos_renyi_graph(m, edge_probability, seed=seed * MAX_TRIES + a),
            f"Erdős–Rényi graph G({m}, {edge_probability})",
        )
    else:  # dynamic: a random regular graph
        if not 1 <= degree < m or (degree * m) % 2:
            raise TopologyError(
                f"degree {degree!r} does not give a regular graph on {m} devices; "
                f"choose 1 <= degree < {m} with degree * {m} even"
            )
        graph = _connected(
            lambda a: nx.random_regular_graph(degree, m, seed=seed * MAX_TRIES + a),
            f"{degree}-regular graph on {m} devices",
        )
    return graph


def metropolis_hastings(graph: nx.Graph) -> np.ndarray:
    """W_ij = 1 / (1 + max(deg_i, deg_j)) on edges, W_ii = 1 - sum_{j != i} W_ij (float64)."""
    m = graph.number_of_nodes()
    degree = np.array([graph.degree(i) for i in range(m)])
    w = np.zeros((m, m))
    for i, j in graph.edges():
        w[i, j] = w[j, i] = 1.0 / (1 + max(degree[i], degree[j]))
    w[np.diag_indices(m)] = 1.0 - w.sum(axis=1)
    return w


def second_eigenvalue(w: np.ndarray) -> float:
    """λ₂: the second-largest eigenvalue modulus of a symmetric doubly stochastic W."""
    if len(w) < 2:
        return 0.0
    moduli = np.sort(np.abs(np.linalg.eigvalsh(w)))[::-1]
    return float(moduli[1])


def spectral_gap(w: np.ndarray) -> float:
    """The connectivity constant p = 1 - λ₂² (Koloskova et al. 2020): one mixing step shrinks the
    distance to the component average by at least the factor 1 - p."""
    return 1.0 - second_eigenvalue(w) ** 2


def _round_seed(seed: int, round_: int, component: int) -> int:
    return (seed * 1_000_003 + round_) * 1_009 + component


def component_weights(
    topology: str,
    m: int,
    component: int,
    seed: int,
    round_: int = 0,
    edge_probability: float = 0.1,
    degree: int = 4,
) -> np.ndarray:
    """The m x m MH matrix of one component in one round (only `dynamic` depends on the round)."""
    rnd = round_ if topology == "dynamic" else 0
    graph = component_graph(topology, m, _round_seed(seed, rnd, component), edge_probability, degree)
    return metropolis_hastings(graph)


class Mixing:
    """The block-diagonal D2D matrix of n devices in C components, round by round.

    Static topologies are built once; `dynamic` builds a fresh graph per component each round.
    `matrix(round)` is a float64 numpy array; `apply(round, X)` computes W @ X as one product
    (a sparse product when W is sparse).
    """

    def __init__(
        self,
        topology: str,
        devices: int,
        components: int,
        seed: int,
        edge_probability: float = 0.1,
        degree: int = 4,
    ):
        if topology not in TOPOLOGIES:
            raise TopologyError(f"unknown topology {topology!r}; choose from: {', '.join(TOPOLOGIES)}")
        if components < 1 or devices % components:
            raise TopologyError(f"devices {devices} are not divisible into {components} equal components")
        self.topology = topology
        self.devices, self.components = devices, components
        self.size = devices // components
        self.seed = seed
        self.edge_probability, self.degree = edge_probability, degree
        self._static = None if topology == "dynamic" else self._build(0)

    def _build(self, round_: int) -> np.ndarray:
        blocks = [
            component_weights(self.topology, self.size, c, self.seed, round_, self.edge_probability, self.degree)
            for c in range(self.components)
        ]
        w = np.zeros((self.devices, self.devices))
        for c, block in enumerate(blocks):
            s = slice(c * self.size, (c + 1) * self.size)
            w[s, s] = block
        return w

    def matrix(self, round_: int) -> np.ndarray:
        return self._static if self._static is not None else self._build(round_)

    def spectral_gaps(self, round_: int = 0) -> list[float]:
        """p of each component's W (for `dynamic`, of the given round's graph)."""
        w = self.matrix(round_)
        return [
            spectral_gap(w[c * self.size : (c + 1) * self.size, c * self.size : (c + 1) * self.size])
            for c in range(self.components)
        ]

    def component_of(self, device: int) -> int:
        return device // self.size

    def torch_matrix(self, round_: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
        """W as a tensor: sparse CSR when at most a tenth of its entries are non-zero."""
        w = torch.as_tensor(self.matrix(round_), dtype=dtype, device=device)
        if torch.count_nonzero(w).item() <= 0.1 * w.numel():
            return w.to_sparse_csr()
        return w

    def apply(self, round_: int, x: torch.Tensor) -> torch.Tensor:
        """W @ X for the stacked parameters X (n x d)."""
        if self.topology == "none":
            return x
        key = (round_ if self._static is None else 0, x.dtype, x.device)
        if getattr(self, "_cached_key", None) != key:
            self._cached = self.torch_matrix(round_, x.dtype, x.device)
            self._cached_key = key
        w = self._cached
        return torch.sparse.mm(w, x) if w.layout == torch.sparse_csr else w @ x

    def messages(self, round_: int) -> int:
        """Directed D2D messages in one round: each device sends its model to each neighbour."""
        w = self.matrix(round_)
        return int(np.count_nonzero(w) - np.count_nonzero(np.diag(w)))
