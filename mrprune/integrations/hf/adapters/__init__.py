"""Model adapters: each implements the three stages once for one model family (see :mod:`.base`).

Adapters import transformers; they are loaded only when a model is patched (``ADAPTERS`` names them as strings), so
``import mrprune`` does not need transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["ADAPTERS", "resolve_adapter"]

#: Model classes (by name, matched along the MRO) -> "module:Adapter".
ADAPTERS: dict[str, str] = {
    "LlavaForConditionalGeneration": "mrprune.integrations.hf.adapters.llava:LlavaAdapter",
    "LlavaNextForConditionalGeneration": "mrprune.integrations.hf.adapters.llava_next:LlavaNextAdapter",
    "Qwen2_5_VLForConditionalGeneration": "mrprune.integrations.hf.adapters.qwen2_5_vl:Qwen2_5_VLAdapter",
}


def resolve_adapter(model: Any) -> type:
    """The adapter class of ``model`` (by class name along its MRO); ``TypeError`` for unsupported models."""
    for cls in type(model).__mro__:
        if cls.__name__ in ADAPTERS:
            module, name = ADAPTERS[cls.__name__].split(":")
            return getattr(importlib.import_module(module), name)
    raise TypeError(
        f"mrprune.patch supports {', '.join(sorted(ADAPTERS))} (and their subclasses); got {type(model).__name__}"
    )
