"""neuroplast: sparse neural networks in PyTorch."""

from neuroplast.dst import DSTEngine, preset
from neuroplast.sparse import Topology, sparsify

__version__ = "0.1.0"
__all__ = ["DSTEngine", "Topology", "__version__", "preset", "sparsify"]
