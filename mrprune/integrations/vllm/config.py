"""Which pruner the vLLM plugin runs, and how many tokens it keeps per image before the image is encoded.

vLLM sizes each image's placeholder tokens when it processes the prompt, before the vision encoder runs, so the
number of tokens a pruner keeps must follow from the image's layout alone. The default (``official=False``) modes of
the projector-stage methods guarantee this (``round(keep_ratio * T)`` per image); each method gives that number
without features (:meth:`mrprune.Pruner.kept_count`, read through :func:`kept_count`), and the plugin checks every
selection against it.

The switch is read from the model's Hugging Face config (``hf_overrides={"mrprune": {...}}``, so it is part of the
model's identity in vLLM's caches) or, when absent, from the environment variable ``MRPRUNE_VLLM``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ... import methods
from ...layouts import GridLayout
from ...methods import DivPrune, GPrune, L2Norm, MRPruner, Pruner, RandomPruner
from ...methods.base import KeptCountUnknown, Layout
from ...methods.stages import Need, Stage

__all__ = ["ENV_VAR", "METHODS", "PruneConfig", "grid_layout", "kept_count", "resolve_config"]

logger = logging.getLogger(__name__)

#: The environment variable read when the model config carries no ``mrprune`` entry.
ENV_VAR = "MRPRUNE_VLLM"

#: Method names accepted by the plugin (projector-stage methods whose kept count follows from the layout).
METHODS: dict[str, type[Pruner]] = {
    "mr_pruner": MRPruner,
    "g_prune": GPrune,
    "divprune": DivPrune,
    "random": RandomPruner,
    "l2norm": L2Norm,
}


@dataclass(frozen=True)
class PruneConfig:
    """The plugin's switch: a method name, its constructor arguments, and how many selections to record.

    Parameters
    ----------
    method : str
        A key of :data:`METHODS`, or the class name of any pruner :mod:`mrprune.methods` exports (``"MRPruner"``):
        a new method needs no plugin edit, and :meth:`build` refuses, saying why, the ones vLLM cannot serve.
    kwargs : dict
        Constructor arguments of the method (``keep_ratio`` for all of them; ``budget`` for ``l2norm``).
    record : int
        Keep the last ``record`` selections (features, layout, kept indices) on the model for inspection
        (tests, debugging); 0 keeps none.
    """

    method: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    record: int = 0

    def __post_init__(self) -> None:
        if _method_class(self.method) is None:
            raise ValueError(
                f"mrprune vLLM plugin: unknown method {self.method!r}; choose one of {sorted(METHODS)} or a pruner "
                "class name of mrprune.methods"
            )
        if self.kwargs.get("official", False):
            raise ValueError(
                "mrprune vLLM plugin: official=True budgets are not all known before the encoder runs; use the "
                "default mode (official=False)"
            )
        if not isinstance(self.record, int) or isinstance(self.record, bool) or self.record < 0:
            raise ValueError(f"mrprune vLLM plugin: record must be an int >= 0, got {self.record!r}")

    def build(self) -> Pruner:
        """The configured pruner (checked: projector stage, no text, no signal besides the layout, a kept count that
        follows from the layout)."""
        pruner = _method_class(self.method)(**self.kwargs)
        kept_count(pruner, GridLayout(1, 1, 1))  # refuses, saying why, a pruner whose count needs the features
        extra = sorted(need.value for need in set(pruner.needs) - {Need.LAYOUT})
        if pruner.stage is not Stage.PROJECTOR or extra:
            raise ValueError(
                f"mrprune vLLM plugin: {pruner!r} is not offered for vLLM: it is a {pruner.stage.value}-stage method "
                f"reading {', '.join(extra) or 'signals'} besides its tokens, and the plugin hands a method only each "
                "image's tokens after the projector and their layout"
            )
        return pruner

    @classmethod
    def parse(cls, value: str | Mapping[str, Any]) -> PruneConfig:
        """From a mapping ``{"method": ..., "record": ..., **kwargs}``, its JSON text, or ``"method:keep_ratio"``."""
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("{"):
                value = json.loads(text)
            else:
                method, _, ratio = text.partition(":")
                value = {"method": method.strip()}
                if ratio:
                    value["keep_ratio"] = float(ratio)
        if not isinstance(value, Mapping) or "method" not in value:
            raise ValueError(f"mrprune vLLM plugin: expected {{'method': ..., ...}}, got {value!r}")
        options = dict(value)
        method, record = options.pop("method"), options.pop("record", 0)
        return cls(method=method, kwargs=options, record=record)


def _method_class(name: str) -> type[Pruner] | None:
    """The pruner class of a plugin method name (:data:`METHODS`, else an exported class name), or None."""
    if name in METHODS:
        return METHODS[name]
    cls = getattr(methods, name, None) if name in methods.__all__ else None
    return cls if isinstance(cls, type) and issubclass(cls, Pruner) and cls is not Pruner else None


def resolve_config(hf_config: Any) -> PruneConfig | None:
    """The switch for a model: ``hf_config.mrprune`` (from ``hf_overrides``), else ``$MRPRUNE_VLLM``, else None."""
    value = getattr(hf_config, "mrprune", None)
    source = "hf_overrides"
    if value is None:
        value, source = os.environ.get(ENV_VAR) or None, ENV_VAR
    if value is None:
        return None
    config = PruneConfig.parse(value)
    logger.debug("mrprune vLLM plugin: %s %s (from %s)", config.method, config.kwargs, source)
    return config


def kept_count(pruner: Pruner, layout: Layout) -> int:
    """Tokens ``pruner`` keeps of an image with ``layout``: the method's own :meth:`~mrprune.Pruner.kept_count`.

    Parameters
    ----------
    pruner : Pruner
        In a mode whose count follows from the layout (the default modes of the projector-stage methods).
    layout : LlavaNextLayout or GridLayout

    Returns
    -------
    int, the length of ``pruner.select(features, layout)`` for any features of that layout.

    Raises
    ------
    ValueError
        For methods whose count is not known before the features are (merging, ``llm``-stage, adaptive counts,
        ``official=True``): the message says why they are not offered for vLLM.
    """
    try:
        return pruner.kept_count(layout)
    except KeptCountUnknown as error:
        raise ValueError(
            f"mrprune vLLM plugin: {pruner!r} is not offered for vLLM: vLLM reserves each image's placeholder tokens "
            f"when it processes the prompt, before the encoder runs, so the kept count must follow from the image's "
            f"layout alone, and here it does not ({error})"
        ) from error


def grid_layout(grid_thw: Any, merge_size: int) -> GridLayout:
    """The layout of a Qwen2.5-VL image or video from its ``grid_thw`` row."""
    return GridLayout.from_grid_thw([int(v) for v in grid_thw], merge_size)
