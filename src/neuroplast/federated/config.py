"""A semi-decentralized run's configuration: plain data, loadable from TOML, validated at the boundary."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from neuroplast.data import DATASETS
from neuroplast.dst import PRESETS
from neuroplast.federated.topology import TOPOLOGIES
from neuroplast.sparse import DISTRIBUTIONS
from neuroplast.train.config import ConfigError, PlainConfig, field_kind, has_kind

ALGORITHMS = ("s2s", "s2a", "fedavg", "dsgd")
MODELS = ("linear", "mlp", "cnn")
DEVICES = ("cpu", "cuda", "auto")
MASK_MODES = ("per-device", "shared")
# presets a device can run between rounds: every one but "dense" (density 1 is dense devices).
# The gradient signals come from the round's mini-batch; the others (momentum, activations, neuron
# importance, activity) are gathered from that batch at the device's rewiring (federated/sparse.py)
DEVICE_PRESETS = tuple(n for n in PRESETS if n != "dense")
LINEAR_ONLY_SIGNALS = ("activations", "activity")  # defined on neurons of Linear layers (dst/signals.py)
ALGORITHM_HELP = {
    "s2s": "D2D every round; every H rounds the server averages K sampled devices and sends the "
    "average back to those K (sampled-to-sampled)",
    "s2a": "as s2s, but the average goes to all n devices (sampled-to-all)",
    "fedavg": "no D2D; every H rounds the server averages K sampled devices and sends the average to all",
    "dsgd": "D2D every round, no server (decentralized SGD)",
}


@dataclass
class FederatedConfig(PlainConfig):
    # data and model
    dataset: str = "fashion-mnist"
    model: str = "linear"  # linear: softmax regression (7,850 parameters on 28x28)
    hidden: list[int] = field(default_factory=lambda: [200])  # mlp hidden widths
    cnn_hidden: int = 256  # cnn: width of the dense head (1.07M parameters on 32x32x3)
    # devices and their data
    devices: int = 100
    components: int = 2
    alpha_inter: float = 100.0  # Dirichlet concentration across components (small: skewed)
    alpha_intra: float = 100.0  # ... across the devices of a component
    min_size: int = 10  # samples per device at least (before the local test part)
    local_test_fraction: float = 0.2  # share of each device's samples held out as its local test set
    # communication
    topology: str = "ring"
    edge_probability: float = 0.1  # erdos-renyi
    degree: int = 4  # dynamic: degree of the random regular graph drawn each round
    algorithm: str = "s2s"
    sampled: int = 20  # K: devices the server samples
    period: int = 5  # H: rounds between server rounds
    # sparse devices (docs: "Sparse devices"); density 1 keeps dense devices and dense messages
    density: float = 1.0  # live share of the sparse layers' weights on every device
    sparse_distribution: str = "erk"  # how the density is spread over layers (sparsify)
    masks: str = "per-device"  # per-device: each device rewires its own; shared: only the server changes it
    dst_method: str = "rigl"  # the DST preset that rewires (devices, or the server's schedule when shared)
    dst_every: int = 10  # per-device masks: rounds between a device's topology updates
    # optimisation (plain SGD on every device)
    rounds: int = 500
    local_steps: int = 1
    batch_size: int = 128
    lr: float = 0.1
    weight_decay: float = 5e-4
    # evaluation and run
    eval_every: int = 10  # rounds between evaluations (and metrics.jsonl lines)
    device_eval_samples: int = 2000  # global test images for the per-device models (0: all)
    checkpoint_every: int = 50  # rounds between checkpoints (the last round is always saved)
    seed: int = 0
    device: str = "cpu"

    @property
    def sparse(self) -> bool:
        return self.density < 1.0

    @property
    def uses_d2d(self) -> bool:
        return self.algorithm != "fedavg" and self.topology != "none"

    @property
    def uses_server(self) -> bool:
        return self.algorithm != "dsgd"

    @property
    def server_sends_to_all(self) -> bool:
        return self.algorithm in ("s2a", "fedavg")

    def validate(self) -> FederatedConfig:
        for f in fields(self):
            value, kind = getattr(self, f.name), field_kind(f.type)
            if not has_kind(value, kind):
                raise ConfigError(f"{f.name} {value!r} must be of type {kind.__name__}")
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{f.name} {value!r} must be a finite number")
        choices = {
            "dataset": DATASETS,
            "model": MODELS,
            "topology": TOPOLOGIES,
            "algorithm": ALGORITHMS,
            "device": DEVICES,
            "sparse_distribution": DISTRIBUTIONS,
            "masks": MASK_MODES,
            "dst_method": DEVICE_PRESETS,
        }
        for key, valid in choices.items():
            if getattr(self, key) not in valid:
                raise ConfigError(f"unknown {key} {getattr(self, key)!r}; choose from: {', '.join(valid)}")
        linear_only = [s for s in LINEAR_ONLY_SIGNALS if s in PRESETS[self.dst_method].needs]
        if self.sparse and self.masks == "per-device" and self.model == "cnn" and linear_only:
            raise ConfigError(
                f"dst_method {self.dst_method!r} gathers {linear_only[0]} of Linear layers only and the cnn's "
                "sparse layers include Conv2d ones; choose another dst_method, model mlp, or masks shared"
            )
        for key in (
            "devices",
            "components",
            "rounds",
            "local_steps",
            "batch_size",
            "eval_every",
            "checkpoint_every",
            "min_size",
            "cnn_hidden",
            "degree",
            "dst_every",
        ):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} {getattr(self, key)!r} must be a positive integer")
        if self.devices % self.components:
            divisors = [c for c in range(1, self.devices + 1) if self.devices % c == 0]
            raise ConfigError(
                f"devices {self.devices} are not divisible into components {self.components}; "
                f"choose components from: {', '.join(map(str, divisors))}"
            )
        if self.period < 1:
            raise ConfigError(f"period (H) {self.period!r} must be >= 1 round")
        if self.uses_server:
            if not 1 <= self.sampled <= self.devices:
                raise ConfigError(f"sampled (K) {self.sampled!r} must be in [1, devices = {self.devices}]")
            if self.algorithm == "s2s" and self.sampled < 2:
                raise ConfigError(
                    f"sampled (K) {self.sampled!r} must be in [2, {self.devices}] with s2s "
                    "(averaging one device with itself changes nothing)"
                )
        for key in ("alpha_inter", "alpha_intra"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{key} {getattr(self, key)!r} must be > 0 (e.g. 0.1 skewed, 100 about IID)")
        if not 0.0 < self.density <= 1.0:
            raise ConfigError(f"density {self.density!r} must be in (0, 1] (e.g. 0.1 for 90% sparsity; 1: dense)")
        if not 0.0 <= self.local_test_fraction < 1.0:
            raise ConfigError(f"local_test_fraction {self.local_test_fraction!r} must be in [0, 1)")
        if not 0.0 < self.edge_probability <= 1.0:
            raise ConfigError(f"edge_probability {self.edge_probability!r} must be in (0, 1]")
        m = self.devices // self.components
        if self.topology == "dynamic" and self.uses_d2d and (self.degree >= m or (self.degree * m) % 2):
            raise ConfigError(
                f"degree {self.degree!r} gives no regular graph on {m} devices per component; "
                f"choose 1 <= degree < {m} with degree * {m} even"
            )
        for key in ("lr", "weight_decay"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} {getattr(self, key)!r} must be >= 0")
        if self.device_eval_samples < 0:
            raise ConfigError(f"device_eval_samples {self.device_eval_samples!r} must be >= 0 (0: all)")
        if not self.hidden or not all(has_kind(h, int) and h > 0 for h in self.hidden):
            raise ConfigError(f"hidden {self.hidden!r} must be a non-empty list of positive integers")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"seed {self.seed!r} must be in [0, 2**32)")
        return self
