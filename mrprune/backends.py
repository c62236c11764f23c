"""Which implementation serves an op: the eager reference, the C++ CPU kernels, Triton or CUDA C++.

Every public op routes through :func:`resolve` on each call. ``"auto"`` (the default) takes the fastest available
implementation for the device; a preference set with :func:`use_backend` or the ``MRPRUNE_BACKEND`` environment
variable is used wherever the op implements it for that device, and ``"auto"`` elsewhere. float64 inputs always go to
the reference (the kernels compute in float32).

A kernel backend that fails while compiling or launching (Triton without a C compiler for its launcher, an
unsupported GPU, ``OutOfResources``, a CUDA launch error) is demoted for that op and device type for the rest of the
process: :func:`call` warns once and hands the call to the next backend, so a model's ``generate`` never sees the
compiler's traceback. It does not demote a backend that was asked for explicitly (:func:`use_backend`,
``MRPRUNE_BACKEND``), after ``MRPRUNE_FALLBACK=0`` (the tests set it, so that a broken kernel fails them), nor on
errors that another backend would hit too: out of memory, and sticky CUDA errors (illegal address, device-side
assert), after which the CUDA context is unusable. Argument errors never get here: the ops validate before dispatch.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import re
import warnings
from collections.abc import Callable, Iterator

import torch

__all__ = [
    "BACKENDS",
    "available",
    "call",
    "current",
    "demoted",
    "implementations",
    "reset_demotions",
    "resolve",
    "use_backend",
]

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "reference", "cpp", "triton", "cuda", "torch")

# Fastest first, per device type (measured by the benchmarks; Triton owns the graph ops on GPUs, CUDA C++ the
# sequential selections, and each list ends with the reference that serves everything). "torch" (mrprune._batched:
# batched eager torch, no host synchronisation) serves GPU ops without a kernel; on the CPU the reference does.
_AUTO_ORDER = {"cpu": ("cpp", "reference"), "cuda": ("cuda", "triton", "torch", "reference")}
_AUTO_ORDER_OVERRIDES = {
    ("graph_scores", "cuda"): ("triton", "cuda", "reference"),
    ("cosine_graph", "cuda"): ("triton", "cuda", "reference"),
    ("transfer_scores", "cuda"): ("triton", "cuda", "reference"),
}

_preference: contextvars.ContextVar[str | None] = contextvars.ContextVar("mrprune_backend", default=None)
_registry: dict[str, dict[str, Callable]] = {}
#: ``(op, device type, backend)`` that failed to compile or launch in this process (:func:`call`).
_demoted: set[tuple[str, str, str]] = set()


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
    if backend in ("reference", "torch"):
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
    impls = {b: f for b, f in _registry.get(op, {}).items() if (op, device_type, b) not in _demoted}
    ranked = [b for b in order if b in impls and _serves(b, device_type)]
    return ranked + [b for b in impls if b not in ranked and _serves(b, device_type)]


def _resolve_name(op: str, device: torch.device | str, dtype: torch.dtype) -> str:
    if dtype == torch.float64:
        return "reference"
    candidates = available(op, device)
    preference = current()
    return preference if preference in candidates else candidates[0]


def resolve(op: str, device: torch.device, dtype: torch.dtype) -> Callable:
    """The implementation that serves this call of ``op``."""
    return _registry[op][_resolve_name(op, device, dtype)]


def demoted() -> set[tuple[str, str, str]]:
    """The ``(op, device type, backend)`` triples demoted after a failure in this process."""
    return set(_demoted)


def reset_demotions() -> None:
    """Give every demoted backend another chance (tests; after fixing the environment)."""
    _demoted.clear()


# CUDA errors after which the context is unusable: no other backend can serve the call either.
_STICKY = re.compile(
    r"illegal memory access|illegal address|misaligned address|unspecified launch failure|device-side assert|"
    r"illegal instruction|hardware stack error"
)


def _may_demote(backend: str, error: Exception) -> bool:
    if backend == "reference" or os.environ.get("MRPRUNE_FALLBACK", "1") == "0" or current() == backend:
        return False
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return False
    return _STICKY.search(str(error)) is None


def call(op: str, device: torch.device, dtype: torch.dtype, args: tuple):
    """Run ``op`` on the backend :func:`resolve` picks; if that backend fails (and may be demoted), warn once, demote
    it for ``device``'s type and retry on the next one, down to the reference."""
    device_type = torch.device(device).type
    tried: set[str] = set()
    while True:
        backend = _resolve_name(op, device, dtype)
        try:
            return _registry[op][backend](*args)
        except Exception as error:
            if backend in tried or not _may_demote(backend, error):
                raise
            tried.add(backend)
            _demoted.add((op, device_type, backend))
            summary = str(error).strip().splitlines()
            summary = f"{type(error).__name__}: {summary[-1] if summary else ''}"[:300]
            following = _resolve_name(op, device, dtype)
            message = (
                f"mrprune.{op}: the {backend} backend failed on {device_type} ({summary}); {following} serves this "
                f"op on {device_type} for the rest of the process (set MRPRUNE_FALLBACK=0 to raise instead)"
            )
            warnings.warn(message, RuntimeWarning, stacklevel=2)
            logger.debug("mrprune.%s: %s backend failure", op, backend, exc_info=error)
