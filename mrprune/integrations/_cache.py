"""The KV cache argument under both of its transformers names.

transformers 5.24 renamed ``past_key_values`` to ``cache`` in every model's and decoder layer's ``forward``, in
``generate``'s model inputs and in model outputs (the old name stays a deprecated alias until 5.40). mrprune
supports 5.17 through the newest release, so the integration never spells either name itself: it reads the cache
with :func:`cache_of` and passes it with :func:`cache_keyword`, which asks the callee's signature.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["CACHE_NAMES", "cache_keyword", "cache_of"]

#: The cache's name from transformers 5.24 on, then its name before.
CACHE_NAMES = ("cache", "past_key_values")


def cache_of(mapping: Mapping[str, Any]) -> Any:
    """The cache in a call's arguments or a model output (``None`` if it has none), under either name."""
    for name in CACHE_NAMES:
        value = mapping.get(name)
        if value is not None:
            return value
    return None


def cache_keyword(function: Callable, cache: Any) -> dict[str, Any]:
    """``{name: cache}`` with the name ``function`` declares (the new one when it declares neither)."""
    parameters = inspect.signature(function).parameters
    name = next((n for n in CACHE_NAMES if n in parameters), CACHE_NAMES[0])
    return {name: cache}
