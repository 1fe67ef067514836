"""neuroplast: sparse neural networks in PyTorch."""

import os as _os

# Back large CPU tensors with transparent huge pages. A big sparse model allocates activations
# of hundreds of MB every step; on 4 KiB pages each costs tens of thousands of page faults
# (a ReLU over a 333k x 128 activation: 51 ms, against 14 ms on huge pages). PyTorch reads
# this setting at its first allocation, so it takes effect when neuroplast is imported before
# torch (the `neuroplast` command; bench/scale_set_mlp.py sets it itself). THP_MEM_ALLOC_ENABLE=0
# opts out.
_os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from neuroplast.dst import DSTEngine, preset
from neuroplast.sparse import Topology, sparsify

__version__ = "0.1.0"
__all__ = ["DSTEngine", "Topology", "__version__", "preset", "sparsify"]
