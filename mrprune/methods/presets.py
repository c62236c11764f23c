"""The settings the papers report, by name: ``mrprune.preset("mr_pruner_90")``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .agilepruner import AgilePruner
from .base import Pruner
from .baselines import DivPrune, RandomPruner
from .cdpruner import CDPruner
from .dart import DART
from .fastervlm import FasterVLM
from .graph import GPrune, MRPruner
from .hired import HiRED
from .l2norm import L2Norm
from .pdrop import PDrop, pyramid_ratios
from .prumerge import PruMerge
from .resprune import ResPrune
from .scope import SCOPE
from .sparsevlm import SparseVLM
from .tome import ToMe
from .visionzip import VisionZip
from .vispruner import VisPruner

__all__ = ["PRESETS", "preset", "table_settings"]


def table_settings(
    name: str, cls: Callable[..., Pruner], qwen: dict[str, Any] | None = None, **fixed: Any
) -> dict[str, tuple[Callable[..., Pruner], dict[str, Any]]]:
    """The settings of the MR-Pruner / ResPrune / G-Prune tables for one method: ``<name>_192`` / ``_128`` / ``_64``
    (LLaVA-1.5 tokens kept per image), ``<name>_next_640`` / ``_next_320`` (LLaVA-NeXT tokens kept per image) and
    ``<name>_qwen_667`` / ``_778`` / ``_889`` (Qwen2.5-VL: 66.7 / 77.8 / 88.9 % of each image's tokens pruned, with
    ``qwen`` overriding arguments there)."""
    settings = {f"{name}_{n}": (cls, {**fixed, "budget": n}) for n in (192, 128, 64)}
    settings.update({f"{name}_next_{n}": (cls, {**fixed, "budget": n}) for n in (640, 320)})
    for label, keep in (("667", 1 / 3), ("778", 2 / 9), ("889", 1 / 9)):
        settings[f"{name}_qwen_{label}"] = (cls, {**fixed, **(qwen or {}), "keep_ratio": keep})
    return settings


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
    # Qwen2.5-VL's vision signal is the received attention of its last (full-attention) block
    **table_settings("fastervlm", FasterVLM, qwen={"layer": -1}),
    **table_settings("l2norm", L2Norm),
    **table_settings("hired", HiRED, qwen={"select_layer": -1}),
    **table_settings("scope", SCOPE, qwen={"layer": -1}),
    **table_settings("vispruner", VisPruner, qwen={"layer": -1}),
    # CDPruner needs the user's CLIP model for its relevance: preset("cdpruner_64", clip=..., clip_tokenizer=...)
    **table_settings("cdpruner", CDPruner, qwen={"layer": -1}),
    # AgilePruner: reconstructed from the paper (no code); erank_avg and tau_max are guesses
    **table_settings("agilepruner", AgilePruner, qwen={"layer": -1}),
    # SparseVLM: the official schedules (tokens left after layers 2 / 6 / 15, named by the LLaVA-1.5 budget they
    # average to over the layers); LLaVA-NeXT 640 / 320 and Qwen2.5-VL's pruned shares use the schedule of the same
    # share of an image's tokens (the default mode scales the counts to the image)
    **{f"sparsevlm_{n}": (SparseVLM, {"budget": n}) for n in (192, 128, 96, 64)},
    "sparsevlm_next_640": (SparseVLM, {"budget": 128}),
    "sparsevlm_next_320": (SparseVLM, {"budget": 64}),
    "sparsevlm_qwen_667": (SparseVLM, {"budget": 192}),
    "sparsevlm_qwen_778": (SparseVLM, {"budget": 128}),
    "sparsevlm_qwen_889": (SparseVLM, {"budget": 64}),
    # SparseVLM's first release: rank-based counts at layers 2 / 6 / 15 / 19 with its scripts' scale and bias
    **{f"sparsevlm_rank_{n}": (SparseVLM, {"budget": n, "rank": True}) for n in (192, 128, 64)},
    # SparseVLM v2.0 (its v2.0 branch, USE_VERSION=2_0): gravity-corrected attention of the top-14 heads, the v2.0
    # schedules, no recycling; 1-D RoPE only (LLaVA-1.5, LLaVA-NeXT: 640 / 320 are the shares of 128 / 64 of 576)
    **{f"sparsevlm_v2_{n}": (SparseVLM, {"budget": n, "version": "2.0"}) for n in (192, 128, 96, 64)},
    "sparsevlm_v2_next_640": (SparseVLM, {"budget": 128, "version": "2.0"}),
    "sparsevlm_v2_next_320": (SparseVLM, {"budget": 64, "version": "2.0"}),
    # VisionZip: dominant + contextual = 54 + 10 / 108 + 20 / 162 + 30 (contextual_ratio 5/32); Qwen: last block
    **table_settings("visionzip", VisionZip, qwen={"layer": -1}),
    # PruMerge(+): the official adaptive IQR share, and the tables' fixed budgets (extra token included)
    "prumerge_plus": (PruMerge, {}),
    "prumerge": (PruMerge, {"plus": False}),
    **table_settings("prumerge_plus", PruMerge),
    **table_settings("prumerge", PruMerge, plus=False),
    # PDrop: the official scripts' pyramid (LLaVA-1.5 and LLaVA-NeXT: layers 8 / 16 / 24, 50 / 25 / 12.5 % of the
    # image's tokens); the official code and the papers' repositories give no settings for the tables' token counts,
    # so pdrop_* are derived (pyramid_ratios): layers 2 / 8 / 16 (the maintainer's suggestion, Cooperx521/PyramidDrop
    # #29), ratios lambda, lambda^2, lambda^3 whose tokens averaged over the 32 decoder layers (PyramidDrop's
    # "equivalent tokens") are the budget: lambda = 0.560 / 0.420 / 0.192 for 192 / 128 / 64 of 576; LLaVA-NeXT's
    # 640 / 320 of at most 2880 tokens are the shares of 128 / 64 of 576
    "pdrop": (PDrop, {}),
    **{f"pdrop_{n}": (PDrop, {"layers": (2, 8, 16), "ratios": pyramid_ratios(n / 576)}) for n in (192, 128, 64)},
    **{f"pdrop_next_{n}": (PDrop, {"layers": (2, 8, 16), "ratios": pyramid_ratios(n / 2880)}) for n in (640, 320)},
    # DART: pivots at layer 2; dart_*: the tables' budgets (official=True keeps image_pivots + 8 * (budget // 8))
    **table_settings("dart", DART),
    # ToMe: LLaVA-1.5 / LLaVA-NeXT only (Qwen2.5-VL's windowed tower is refused); tome_r16 is LightCompress' config
    **{f"tome_{n}": (ToMe, {"budget": n}) for n in (192, 128, 64)},
    **{f"tome_next_{n}": (ToMe, {"budget": n}) for n in (640, 320)},
    "tome_r16": (ToMe, {"r": 16, "official": True}),
}


def preset(name: str, **overrides: Any) -> Pruner:
    """A pruner configured as in its paper; ``overrides`` replace arguments (e.g. ``official=True``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    cls, kwargs = PRESETS[name]
    return cls(**{**kwargs, **overrides})
