"""Semi-decentralized learning: device-to-device clusters plus a sampling server (S2S vs S2A).

- `topology`: graphs per component (networkx) and Metropolis–Hastings mixing weights;
- `partition`: the two-level Dirichlet split, with each device's local test part;
- `simulator`: every device model stacked as rows of one matrix, trained with torch.func;
- `distributed`: the same rounds on torch.distributed under torchrun;
- `loop`: a per-device loop of ordinary modules, the reference the simulator is tested against;
- `run`: a run with metrics, checkpoints and resume (`neuroplast federate`).
"""

from neuroplast.federated.config import ALGORITHMS, FederatedConfig
from neuroplast.federated.partition import Partition, two_level_dirichlet
from neuroplast.federated.run import federate
from neuroplast.federated.simulator import Federation
from neuroplast.federated.topology import TOPOLOGIES, Mixing, metropolis_hastings, spectral_gap

__all__ = [
    "ALGORITHMS",
    "TOPOLOGIES",
    "FederatedConfig",
    "Federation",
    "Mixing",
    "Partition",
    "federate",
    "metropolis_hastings",
    "spectral_gap",
    "two_level_dirichlet",
]
