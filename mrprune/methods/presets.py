"""The settings the papers report, by name: ``mrprune.preset("mr_pruner_90")``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .base import Pruner
from .baselines import DivPrune, RandomPruner
from .graph import GPrune, MRPruner
from .resprune import ResPrune

__all__ = ["PRESETS", "preset"]

#: name -> (constructor, arguments). Percentages in MR-Pruner names are the *pruned* share, as in its tables.
PRESETS: dict[str, tuple[Callable[..., Pruner], dict[str, Any]]] = {
    "mr_pruner_50": (MRPruner, {"keep_ratio": 0.5}),
    "mr_pruner_70": (MRPruner, {"keep_ratio": 0.3}),
    "mr_pruner_90": (MRPruner, {"keep_ratio": 0.1}),
    "mr_pruner_95": (MRPruner, {"keep_ratio": 0.05}),
    "g_prune": (GPrune, {"keep_ratio": 0.5}),
    # ResPrune's LLaVA-1.5 budgets (66.7 / 77.8 / 88.9 % of 576 tokens pruned), alpha 0.75
    "resprune_192": (ResPrune, {"budget": 192, "alpha": "llava"}),
    "resprune_128": (ResPrune, {"budget": 128, "alpha": "llava"}),
    "resprune_64": (ResPrune, {"budget": 64, "alpha": "llava"}),
    "divprune": (DivPrune, {"keep_ratio": 0.098}),
    "random_50": (RandomPruner, {"keep_ratio": 0.5}),
}


def preset(name: str, **overrides: Any) -> Pruner:
    """A pruner configured as in its paper; ``overrides`` replace arguments (e.g. ``official=True``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    cls, kwargs = PRESETS[name]
    return cls(**{**kwargs, **overrides})
