"""A training run's configuration: plain data, loadable from TOML, validated at the boundary."""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from neuroplast.attention import ATTENTIONS, ROUTINGS
from neuroplast.data import DATASETS
from neuroplast.data.articulated import ALL_FAMILIES, max_parts_and_joints
from neuroplast.data.dataset import STANDARDIZE
from neuroplast.dst import PRESETS, knob_fields, preset
from neuroplast.models import MODELS
from neuroplast.sparse import BACKENDS, DISTRIBUTIONS

OPTIMIZERS = ("sgd", "adamw")
LR_SCHEDULES = ("cosine", "step", "constant")
DEVICES = ("cpu", "cuda", "auto")
ARTICULATED_SPLITS = ("iid", "ood")
ARTICULATED_SIZES = (28, 32, 64)
PRECISIONS = ("float32", "bfloat16")  # activations; weights and optimizer state are float32 either way


class ConfigError(ValueError):
    """Bad configuration value; the message names it and the valid choices."""


def field_kind(annotation) -> type:
    """The type behind a RunConfig annotation (`int | None` -> int, `list[int]` -> list)."""
    text = str(annotation)
    for name, kind in (
        ("list[int]", list),
        ("dict", dict),
        ("bool", bool),
        ("int", int),
        ("float", float),
        ("str", str),
    ):
        if text.startswith(name):
            return kind
    raise TypeError(f"unsupported config field type {annotation!r}")


def has_kind(value, kind: type) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


class PlainConfig:
    """What every run configuration (a dataclass of plain values) shares: comparison with a saved
    one, TOML, and construction from a dict with unknown keys refused."""

    def changed_from(self, saved: dict) -> list[str]:
        """The settings in which this config differs from a saved one (its `asdict`). A setting
        the saved config does not have (written before the setting existed) counts as its default."""
        saved = self.normalized(saved)
        defaults = asdict(self.defaults_for(saved))
        return sorted(key for key, value in asdict(self).items() if saved.get(key, defaults[key]) != value)

    def defaults_for(self, saved: dict):
        """The defaults a saved config's missing settings take."""
        return type(self)()

    def to_toml(self) -> str:
        """Plain settings as `key = value` lines, then each dict setting as a `[key]` table."""
        values = asdict(self)
        lines = [f"{k} = {json.dumps(v)}" for k, v in values.items() if v is not None and not isinstance(v, dict)]
        for table, entries in values.items():
            if isinstance(entries, dict) and entries:
                lines += ["", f"[{table}]", *(f"{k} = {json.dumps(v)}" for k, v in entries.items())]
        return "\n".join(lines) + "\n"

    @classmethod
    def normalized(cls, values: dict) -> dict:
        """`values` in this config's current layout (older layouts are read, never written)."""
        return values

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, values: dict, source: str = "config"):
        values = cls.normalized(values)
        unknown = sorted(set(values) - set(cls.keys()))
        if unknown:
            raise ConfigError(f"unknown key {unknown[0]!r} in {source}; valid keys: {', '.join(cls.keys())}")
        return cls(**values)


@dataclass
class RunConfig(PlainConfig):
    """Everything one training run needs, as plain data: what to train (dataset, model), how
    sparse and with which method, how to optimize, and the seed. Loaded from TOML with
    `load_toml` (or `neuroplast train --config`), overridden by command-line flags, checked by
    `validate`, and written next to the run as `config.toml`."""

    # what to train
    dataset: str = "digits"
    model: str = "mlp"
    hidden: list[int] = field(default_factory=lambda: [1000, 1000, 1000])
    dropout: float = 0.0
    cnn_hidden: int = 128  # cnn: width of the dense head
    # ViT (model "vit")
    attention: str = "dense"  # dense or moba
    patch_size: int | None = None  # 1: one token per pixel; None: 4 (1 for moba-parts)
    vit_dim: int = 64
    vit_depth: int | None = None  # None: 4 for vit, 2 for the parts models
    vit_heads: int = 4
    block_size: int = 16  # MoBA: tokens per block (a square tile of the patch grid)
    top_k: int = 3  # MoBA: blocks per query, the own block included
    own_block: bool = True  # MoBA: always attend to the query's own block
    full_layers: int = 0  # MoBA: the last layers use dense attention (hybrid)
    key_conv: int | None = None  # MoBA: width of the depthwise key convolution (None: off)
    routing: str = "token"  # MoBA: token (each query picks its blocks) or block (per tile of queries)
    # part-query encoder ("parts", "moba-parts"; patch_size, vit_dim, vit_depth, vit_heads,
    # block_size and top_k above apply to it too)
    parts: int = 8  # K learned part queries (masks compete over them at every pixel)
    part_iterations: int = 3  # rounds of query refinement
    part_supervision: bool = False  # articulated data: Hungarian-matched part-mask loss
    joint_head: bool = False  # articulated data: predict joint angles as (sin, cos)
    # articulated shapes (dataset "articulated")
    articulated_size: int = 32  # canvas side: 28, 32 or 64
    articulated_families: str = "arm2,arm3,lamp,scissors,stick"  # comma-separated
    articulated_split: str = "iid"  # test on in-distribution joint angles, or "ood" ones
    articulated_train: int = 20000  # training samples
    articulated_test: int = 4000  # test samples
    standardize: str = "channel"  # images: per-channel or per-feature training statistics
    validation: int = 0  # > 0: evaluate on the last N training samples, never on the test set
    # sparsity
    method: str = "set"
    density: float = 0.05
    distribution: str = "erk"
    epsilon: float | None = None  # with distribution "er": SET's budget-free epsilon
    dense_first: bool = False
    dense_last: bool = False
    backend: str = "masked"
    precision: str = "float32"  # bfloat16: activations under torch.autocast (weights stay float32)
    # DST knobs by name (the [dst] table): any knob of the schedule and the registered drop and
    # grow criteria (`neuroplast.dst.knob_fields()`); a knob not given takes the method's value
    dst: dict = field(default_factory=dict)
    # optimisation
    epochs: int = 20
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    lr_schedule: str = "cosine"
    lr_step_size: int = 10  # epochs, for the "step" schedule
    lr_gamma: float = 0.1
    # run
    seed: int = 0
    device: str = "cpu"

    def validate(self) -> RunConfig:
        """Check every setting's type and range, and that names are among the valid choices;
        raises `ConfigError` naming the bad value. Returns self, with model-dependent defaults set."""
        for f in fields(self):
            value, kind = getattr(self, f.name), field_kind(f.type)
            if value is not None and not has_kind(value, kind):
                raise ConfigError(f"{f.name} {value!r} must be of type {kind.__name__}")
        choices = {
            "dataset": DATASETS,
            "model": MODELS,
            "method": tuple(PRESETS),
            "distribution": DISTRIBUTIONS,
            "backend": BACKENDS,
            "precision": PRECISIONS,
            "optimizer": OPTIMIZERS,
            "lr_schedule": LR_SCHEDULES,
            "device": DEVICES,
            "attention": ATTENTIONS,
            "routing": ROUTINGS,
            "standardize": STANDARDIZE,
        }
        if self.patch_size is None:
            self.patch_size = 1 if self.model == "moba-parts" else 4
        if self.vit_depth is None:
            self.vit_depth = 2 if self.model in ("parts", "moba-parts") else 4
        choices["articulated_split"] = ARTICULATED_SPLITS
        for key, valid in choices.items():
            value = getattr(self, key)
            if value not in valid:
                raise ConfigError(f"unknown {key} {value!r}; choose from: {', '.join(valid)}")
        if not 0.0 < self.density <= 1.0:
            raise ConfigError(f"density {self.density!r} is outside (0, 1]; e.g. 0.05 for 95% sparsity")
        for key in (
            "epochs",
            "batch_size",
            "lr_step_size",
            "patch_size",
            "vit_dim",
            "vit_depth",
            "vit_heads",
            "block_size",
            "top_k",
            "part_iterations",
            "cnn_hidden",
            "articulated_train",
            "articulated_test",
        ):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} {getattr(self, key)!r} must be a positive integer")
        if not self.hidden or not all(has_kind(h, int) and h > 0 for h in self.hidden):
            raise ConfigError(f"hidden {self.hidden!r} must be a non-empty list of positive integers")
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{f.name} {value!r} must be a finite number")
        for key in ("lr", "weight_decay", "momentum"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} {getattr(self, key)!r} must be >= 0")
        if self.validation < 0:
            raise ConfigError(f"validation {self.validation!r} must be >= 0 (0: evaluate on the test set)")
        if self.lr_gamma <= 0:
            raise ConfigError(f"lr_gamma {self.lr_gamma!r} must be > 0")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"seed {self.seed!r} must be in [0, 2**32)")
        if self.epsilon is not None and self.epsilon <= 0:
            raise ConfigError(f"epsilon {self.epsilon!r} must be > 0")
        if not 0.0 <= self.dropout <= 1.0:
            raise ConfigError(f"dropout {self.dropout!r} must be in [0, 1]")
        if self.key_conv is not None and self.key_conv < 1:
            raise ConfigError(f"key_conv {self.key_conv!r} must be a positive kernel width")
        if self.full_layers < 0:
            raise ConfigError(f"full_layers {self.full_layers!r} must be >= 0")
        if self.epsilon is not None and self.distribution != "er":
            raise ConfigError(f"epsilon is only used with distribution 'er', not {self.distribution!r}")
        if self.parts < 2:
            raise ConfigError(f"parts {self.parts!r} must be >= 2 (the background takes one part query)")
        if self.articulated_size not in ARTICULATED_SIZES:
            raise ConfigError(
                f"articulated_size {self.articulated_size!r} is not supported; choose from: "
                f"{', '.join(map(str, ARTICULATED_SIZES))}"
            )
        for family in self.families():
            if family not in ALL_FAMILIES:
                raise ConfigError(f"unknown articulated family {family!r}; choose from: {', '.join(ALL_FAMILIES)}")
        if not self.families():
            raise ConfigError("articulated_families is empty; give comma-separated names, e.g. arm2,lamp")
        repeated = sorted({f for f in self.families() if self.families().count(f) > 1})
        if repeated:
            raise ConfigError(f"articulated_families lists {repeated[0]!r} more than once")
        is_parts = self.model in ("parts", "moba-parts")
        if is_parts:
            for key in ("own_block", "full_layers", "key_conv", "routing"):
                if getattr(self, key) != getattr(RunConfig, key):
                    raise ConfigError(
                        f"{key} {getattr(self, key)!r} is a vit setting; parts models always attend to their own "
                        f"block, route per token and have no key convolution or dense layers"
                    )
        if self.part_supervision:
            needed = max_parts_and_joints(self.families())[0] + 1
            if self.parts < needed:
                raise ConfigError(
                    f"parts {self.parts} is too few for part_supervision on {self.articulated_families}: "
                    f"one query per true part and the background needs parts >= {needed}"
                )
        for key in ("part_supervision", "joint_head"):
            if getattr(self, key) and not (is_parts and self.dataset == "articulated"):
                raise ConfigError(
                    f"{key} needs a parts model on the articulated dataset, not {self.model!r} on {self.dataset!r}"
                )
        self.validate_dst()
        return self

    def validate_dst(self) -> None:
        """Every [dst] key a knob of some part, of the knob's type, in the range its part accepts."""
        knobs = knob_fields()
        for key, value in self.dst.items():
            if key not in knobs:
                raise ConfigError(f"unknown dst setting {key!r}; choose from: {', '.join(knobs)}")
            kind = field_kind(knobs[key].type)
            if value is not None and not has_kind(value, kind):
                raise ConfigError(f"{key} {value!r} must be of type {kind.__name__}")
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{key} {value!r} must be a finite number")
        try:
            preset(self.method, **self.dst)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc

    @classmethod
    def normalized(cls, values: dict) -> dict:
        """DST knobs given at the top level (as configs saved before the [dst] table have them)
        move into `dst`, over the table's values."""
        knobs = knob_fields()
        flat = {k: v for k, v in values.items() if k in knobs and k not in cls.keys()}
        if not flat:
            return values
        rest = {k: v for k, v in values.items() if k not in flat}
        return {**rest, "dst": {**rest.get("dst", {}), **{k: v for k, v in flat.items() if v is not None}}}

    def defaults_for(self, saved: dict) -> RunConfig:
        """The defaults a saved config's missing settings take: those of its own model, since some
        (patch_size, vit_depth) depend on it."""
        return RunConfig(model=saved.get("model", self.model)).validate()

    def families(self) -> list[str]:
        """The articulated-shape families of `articulated_families`, as a list."""
        return [name.strip() for name in self.articulated_families.split(",") if name.strip()]

    def dataset_options(self) -> dict:
        """Keyword arguments of `load_dataset` beyond the name (the articulated set's options, a
        standardisation other than per channel)."""
        if self.dataset != "articulated":
            return {} if self.standardize == "channel" else {"standardize": self.standardize}
        options = dict(
            size=self.articulated_size,
            families=tuple(self.families()),
            split=self.articulated_split,
            train=self.articulated_train,
            test=self.articulated_test,
        )
        return {"articulated": options}


def load_toml(path: str | Path) -> dict:
    """The key/value pairs of a TOML config file (validated later, with CLI overrides applied)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {str(path)!r}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from exc
