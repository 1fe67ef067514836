"""Dynamic sparse training: the engine, schedules, drop and grow criteria, presets."""

from neuroplast.dst.criteria import DROP_CRITERIA, GROW_CRITERIA, LayerSignals
from neuroplast.dst.engine import Algorithm, DSTEngine, LayerUpdate, UpdateRecord
from neuroplast.dst.presets import METHODS, PRESETS, preset
from neuroplast.dst.schedules import Schedule

__all__ = [
    "DROP_CRITERIA",
    "GROW_CRITERIA",
    "METHODS",
    "PRESETS",
    "Algorithm",
    "DSTEngine",
    "LayerSignals",
    "LayerUpdate",
    "Schedule",
    "UpdateRecord",
    "preset",
]
