"""Which implementation serves an op: the eager reference, the C++ CPU kernels, Triton or CUDA C++.

Every public op routes through :func:`resolve` on each call. ``"auto"`` (the default) takes the fastest available
implementation for the device; a preference set with :func:`use_backend` or the ``MRPRUNE_BACKEND`` environment
variable is used wherever the op implements it for that device, and ``"auto"`` elsewhere. float64 inputs always go to
the reference (the kernels compute in float32).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Callable, Iterator

import torch

__all__ = ["BACKENDS", "available", "current", "implementations", "resolve", "use_backend"]

BACKENDS = ("auto", "reference", "cpp", "triton", "cuda")

# Fastest first, per device type (measured by the benchmarks; Triton owns the graph ops on GPUs, CUDA C++ the
# sequential selections, and each list ends with the reference that serves everything).
_AUTO_ORDER = {"cpu": ("cpp", "reference"), "cuda": ("cuda", "triton", "reference")}
_AUTO_ORDER_OVERRIDES = {
    ("graph_scores", "cuda"): ("triton", "cuda", "reference"),
    ("cosine_graph", "cuda"): ("triton", "cuda", "reference"),
    ("transfer_scores", "cuda"): ("triton", "cuda", "reference"),
}

_preference: contextvars.ContextVar[str | None] = contextvars.ContextVar("mrprune_backend", default=None)
_registry: dict[str, dict[str, Callable]] = {}


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown mrprune backend {name!r}; choose one of {BACKENDS}")
    return name


def current() -> str:
    """The preferred backend: the innermost :func:`use_backend`, else ``MRPRUNE_BACKEND``, else ``"auto"``."""
    preference = _preference.get()
    return preference if preference is not None else _check_name(os.environ.get("MRPRUNE_BACKEND", "auto"))


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Prefer ``name`` (one of :data:`BACKENDS`) for the ops called inside the ``with`` block."""
    token = _preference.set(_check_name(name))
    try:
        yield
    finally:
        _preference.reset(token)


def register(op: str, backend: str, fn: Callable) -> None:
    """Make ``fn`` the ``backend`` implementation of ``op`` (called by the kernel modules as they load)."""
    _registry.setdefault(op, {})[_check_name(backend)] = fn


def implementations(op: str) -> dict[str, Callable]:
    """All registered implementations of ``op``, by backend name."""
    return dict(_registry.get(op, {}))


def _serves(backend: str, device_type: str) -> bool:
    if backend == "reference":
        return True
    if backend == "cpp":
        return device_type == "cpu"
    if backend == "cuda":
        return device_type == "cuda"
    # Triton runs on CUDA, and on the CPU only under the interpreter (tests).
    return device_type == "cuda" or (device_type == "cpu" and _triton_interpreting())


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available(op: str, device: torch.device | str) -> list[str]:
    """Backends that implement ``op`` on ``device`` (by preference for ``"auto"``)."""
    device_type = torch.device(device).type
    order = _AUTO_ORDER_OVERRIDES.get((op, device_type), _AUTO_ORDER.get(device_type, ("reference",)))
    impls = _registry.get(op, {})
    ranked = [b for b in order if b in impls and _serves(b, device_type)]
    return ranked + [b for b in impls if b not in ranked and _serves(b, device_type)]


def resolve(op: str, device: torch.device, dtype: torch.dtype) -> Callable:
    """The implementation that serves this call of ``op``."""
    if dtype == torch.float64:
        return _registry[op]["reference"]
    candidates = available(op, device)
    preference = current()
    name = preference if preference in candidates else candidates[0]
    return _registry[op][name]
