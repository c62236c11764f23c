"""Pruning methods: given each image's visual tokens and layout, the indices to keep (they call ops only)."""

from .base import Pruner
from .baselines import DivPrune, RandomPruner
from .graph import GPrune, MRPruner
from .presets import PRESETS, preset
from .resprune import ALPHA_PRESETS, ResPrune

__all__ = ["ALPHA_PRESETS", "PRESETS", "DivPrune", "GPrune", "MRPruner", "Pruner", "RandomPruner", "ResPrune", "preset"]
