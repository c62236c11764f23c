"""Argument checks every pruner shares: construction arguments and the inputs of ``select`` / ``select_batch``.

:class:`~mrprune.methods.base.Pruner` runs :func:`batch_inputs` on every call, so a new method gets the input checks
for free; its ``__init__`` checks its own arguments with the helpers here. The messages come from
:mod:`mrprune._validation` (the ops' checks), named after the method instead of an op: ``mrprune.MRPruner: beta must
be a finite number, got nan``. Nothing is silently coerced: a float or bool where a count belongs, ``None`` where a
tensor or flag belongs, a tuple where a layout belongs all raise.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Sequence
from typing import Any

import torch

from .. import _validation
from ..layouts import GridLayout, LlavaNextLayout

__all__ = [
    "batch_inputs",
    "count",
    "flag",
    "generator_seed",
    "graph_params",
    "item_seeds",
    "keep_ratio",
    "non_negative",
    "real",
    "single_input",
    "token_norms",
    "tolerance",
]

LAYOUT_TYPES = (LlavaNextLayout, GridLayout)

#: The seeds ``torch.Generator.manual_seed`` accepts.
SEED_RANGE = (-(2**63), 2**64 - 1)


# --- construction arguments ------------------------------------------------------------------------------------


def keep_ratio(owner: str, value: Any) -> float:
    """A ratio in ``(0, 1]`` (a real number, not a bool or string)."""
    if isinstance(value, bool) or not (isinstance(value, int | float) and 0 < value <= 1):
        raise ValueError(f"mrprune.{owner}: keep_ratio must lie in (0, 1], got {value!r}")
    return float(value)


def count(owner: str, name: str, value: Any, minimum: int = 0) -> int:
    """An int ``>= minimum`` (a token budget, a number of steps); floats and bools are rejected, not truncated."""
    value = _validation.integer(owner, name, value)
    if value < minimum:
        raise ValueError(f"mrprune.{owner}: {name} must be >= {minimum}, got {value}")
    return value


def flag(owner: str, name: str, value: Any) -> bool:
    """A bool (``None`` or ``0`` would silently mean False)."""
    return _validation.boolean(owner, name, value)


def real(owner: str, name: str, value: Any) -> float:
    """A finite real number."""
    return _validation.real(owner, name, value)


def non_negative(owner: str, name: str, value: Any) -> float:
    """A finite real number ``>= 0``."""
    if real(owner, name, value) < 0:
        raise ValueError(f"mrprune.{owner}: {name} must be >= 0, got {value!r}")
    return float(value)


def tolerance(owner: str, name: str, value: Any) -> float:
    """A relative tolerance in ``[0, 1)``."""
    _validation.tolerance(owner, value, name)
    return float(value)


def graph_params(owner: str, threshold: Any, temperature: Any, iterations: Any = 1) -> tuple[float, float, int]:
    """The cosine-graph hyper-parameters, in the domain the graph ops accept (docs/numerics.md)."""
    _validation.graph_hyper(owner, threshold, temperature)
    _validation.iterations(owner, iterations)
    return float(threshold), float(temperature), int(iterations)


def generator_seed(owner: str, value: Any) -> int:
    """A seed ``torch.Generator.manual_seed`` accepts: an int in ``[-2**63, 2**64)``."""
    value = _validation.integer(owner, "seed", value)
    if not SEED_RANGE[0] <= value <= SEED_RANGE[1]:
        raise ValueError(f"mrprune.{owner}: seed must lie in [-2**63, 2**64 - 1], got {value}")
    return value


# --- call inputs -----------------------------------------------------------------------------------------------


def single_input(
    owner: str, features: Any, layout: Any, text: Any
) -> tuple[torch.Tensor, list[Any], torch.Tensor, list[Any] | None]:
    """``select``'s arguments as a batch of one: ``features [1, N, D]``, ``[layout]``, ``lengths [1]``, texts."""
    if not isinstance(features, torch.Tensor) or features.dim() != 2:
        raise ValueError(
            f"mrprune.{owner}: features must be a [N, D] tensor, got {_describe(features, with_shape=True)}"
        )
    if text is not None and not isinstance(text, torch.Tensor):
        raise TypeError(f"mrprune.{owner}: text must be a [M, D] Tensor or None, got {_describe(text)}")
    lengths = torch.tensor([features.shape[0]], device=features.device)
    return features[None], [layout], lengths, None if text is None else [text]


def batch_inputs(
    owner: str,
    features: Any,
    layouts: Any,
    lengths: Any,
    texts: Any,
    uses_text: bool,
) -> tuple[torch.Tensor, list[GridLayout | LlavaNextLayout]]:
    """Check ``select_batch``'s inputs; return ``lengths`` (int64 ``[B]`` on the features' device) and the layouts
    (``None`` entries as flat ``GridLayout(1, 1, n)``).

    Raises ``ValueError`` / ``TypeError`` naming ``owner`` and the argument for: features that are not a float
    ``[B, N, D]`` tensor; lengths that are not B integers in ``[1, N]`` (float and bool lengths included); a layouts
    argument that is not a sequence of B ``LlavaNextLayout`` / ``GridLayout`` / ``None`` entries, or a layout that
    does not describe ``lengths[b]`` tokens; texts that are not B entries of ``None`` or ``[M, D]`` float tensors,
    or texts given to a method without text.
    """
    if not isinstance(features, torch.Tensor) or features.dim() != 3:
        raise ValueError(f"mrprune.{owner}: features must be [B, N, D], got {_describe(features, with_shape=True)}")
    _validation.features(owner, "features", features)
    batch, tokens, dim = features.shape
    lengths = _lengths(owner, lengths, features)
    if isinstance(layouts, str | torch.Tensor) or not isinstance(layouts, Sequence):
        raise TypeError(f"mrprune.{owner}: layouts must be a sequence of {batch} layouts, got {_describe(layouts)}")
    if len(layouts) != batch:
        raise ValueError(f"mrprune.{owner}: expected {batch} layouts, got {len(layouts)}")
    sizes = lengths.tolist()
    if min(sizes, default=1) < 1:
        raise ValueError(f"mrprune.{owner}: every image needs at least one token, got lengths {sizes}")
    checked = []
    for b, (layout, n) in enumerate(zip(layouts, sizes, strict=True)):
        if layout is None:
            layout = GridLayout(1, 1, n)
        elif not isinstance(layout, LAYOUT_TYPES):
            raise TypeError(
                f"mrprune.{owner}: layouts[{b}] must be a LlavaNextLayout, GridLayout or None, got {_describe(layout)}"
            )
        if layout.num_tokens != n:
            raise ValueError(
                f"mrprune.{owner}: item {b} has {n} tokens but its layout {layout} describes {layout.num_tokens}"
            )
        checked.append(layout)
    if texts is not None:
        if isinstance(texts, torch.Tensor) or not isinstance(texts, Sequence):
            raise TypeError(f"mrprune.{owner}: texts must be a sequence of {batch} entries, got {_describe(texts)}")
        if len(texts) != batch:
            raise ValueError(f"mrprune.{owner}: expected {batch} text entries, got {len(texts)}")
        if not uses_text:
            raise ValueError(f"mrprune.{owner}: this method does not use text; pass texts=None")
        for b, text in enumerate(texts):
            if text is None:
                continue
            if not isinstance(text, torch.Tensor) or text.dim() != 2 or text.shape[1] != dim:
                raise ValueError(
                    f"mrprune.{owner}: texts[{b}] must be None or [M, D={dim}] text embeddings, got "
                    f"{_describe(text, with_shape=True)}"
                )
            _validation.features(owner, f"texts[{b}]", text, rank=2)
    return lengths, checked


def item_seeds(owner: str, seeds: Any, lengths: torch.Tensor) -> torch.Tensor:
    """One seed index per item (negative: none) as int64 ``[B]`` on ``lengths``' device, each ``< lengths[b]``."""
    if not isinstance(seeds, torch.Tensor):
        seeds = _as_index_tensor(owner, "seeds", seeds)
    _validation.index_tensor(owner, "seeds", seeds, tuple(lengths.shape))
    seeds = seeds.to(device=lengths.device, dtype=torch.int64)
    message = f"mrprune.{owner}: seeds must be < lengths (or negative for none)"
    _validation._check(seeds, lambda: ~(seeds >= lengths).any(), message)
    return seeds


def token_norms(owner: str, features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """float32 L2 norm of every token ``[B, N]``; with ``MRPRUNE_CHECK_FINITE`` on, a valid token whose norm is not
    finite (NaN/Inf features, or entries so large the float32 squared norm overflows) raises. Padding is ignored.
    Features without padding then need no second NaN/Inf scan by the ops (:func:`mrprune._validation.vouch_finite`).
    """
    norms = _float32_norms(features)
    if _validation.check_finite_enabled() and norms.numel():
        valid = torch.arange(features.shape[1], device=features.device) < lengths[:, None]
        bad = ~torch.isfinite(norms) & valid
        message = (
            f"mrprune.{owner}: features contain NaN or Inf, or entries so large that their float32 squared norms "
            "overflow (see docs/numerics.md)"
        )
        _validation._check(norms, lambda: ~bad.any(), message)  # a device assertion on GPUs, no host sync
        if features.device.type == "cpu" and bool(valid.all()):
            _validation.vouch_finite(features)
    return norms


def unconditional_tokens(owner: str, features: torch.Tensor, kept: Sequence[torch.Tensor]) -> None:
    """Tokens a method keeps without scoring them (LLaVA-NeXT newlines, ``kept[b]`` indices into item ``b``) reach no
    op and no budget norm: with ``MRPRUNE_CHECK_FINITE`` on, a NaN/Inf among them raises as anywhere else."""
    if not _validation.check_finite_enabled():
        return
    for b, index in enumerate(kept):
        if index.numel():
            rows = features[b].index_select(0, index)[None]
            token_norms(owner, rows, torch.tensor([index.numel()], device=features.device))


# --- helpers ---------------------------------------------------------------------------------------------------


#: Per thread: the float32 buffer :func:`_float32_norms` upcasts half-precision chunks into (2 MiB, kept).
_upcast = threading.local()


def _float32_norms(features: torch.Tensor) -> torch.Tensor:
    """``features.float().norm(dim=-1)`` ``[B, N]``, bit for bit. Half-precision features on the CPU are upcast 2**19
    values (128 tokens at D = 4096) at a time into one float32 buffer kept per thread: a fresh float32 copy per chunk
    or of the whole image is mostly page faults whenever the allocator maps new memory (1 to 7 ms against 0.8 ms,
    2304 x 4096 bfloat16, 2 threads)."""
    if features.dtype == torch.float32 or features.device.type != "cpu" or not features.numel():
        return features.float().norm(dim=-1)
    batch, tokens, dim = features.shape
    step = max(1, 2**19 // (batch * dim))
    rows = min(step, tokens)
    buffer = getattr(_upcast, "buffer", None)
    if buffer is None or buffer.numel() < batch * rows * dim:
        buffer = _upcast.buffer = torch.empty(max(batch * rows * dim, 2**19), dtype=torch.float32)
    chunk = buffer[: batch * rows * dim].view(batch, rows, dim)
    norms = torch.empty(batch, tokens, dtype=torch.float32)
    for start in range(0, tokens, step):
        count = min(step, tokens - start)
        upcast = chunk[:, :count]
        upcast.copy_(features[:, start : start + count])
        norms[:, start : start + count] = torch.linalg.vector_norm(upcast, dim=-1)
    return norms


def _describe(value: Any, with_shape: bool = False) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}" if with_shape else f"a {value.dtype} tensor"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _as_index_tensor(owner: str, name: str, values: Any) -> torch.Tensor:
    """A sequence of ints as a tensor, keeping its dtype (floats and bools stay float/bool and are rejected later)."""
    if isinstance(values, str | bytes) or not isinstance(values, Sequence):
        raise TypeError(
            f"mrprune.{owner}: {name} must be a 1-D integer tensor or a sequence of ints, got {_describe(values)}"
        )
    for i, v in enumerate(values):
        _validation.integer(owner, f"{name}[{i}]", v)
    return torch.tensor([int(v) for v in values], dtype=torch.int64)


def _lengths(owner: str, lengths: Any, features: torch.Tensor) -> torch.Tensor:
    batch, tokens, _ = features.shape
    if lengths is None:
        return torch.full((batch,), tokens, dtype=torch.int64, device=features.device)
    if not isinstance(lengths, torch.Tensor):
        lengths = _as_index_tensor(owner, "lengths", lengths)
    _validation.lengths(owner, lengths, batch, tokens)
    return lengths.to(device=features.device, dtype=torch.int64)


def keywords(owner: str, method: Any, given: Any) -> None:
    """Reject keyword arguments of ``select`` / ``select_batch`` that ``method`` never reads (a misspelt option
    would otherwise be ignored silently): those of its declared needs (:data:`~mrprune.methods.stages.NEED_KEYWORDS`),
    those of its stage (``llm``: :data:`~mrprune.methods.stages.LLM_KEYWORDS`) and those its ``_select_batch``
    names."""
    from .stages import LLM_KEYWORDS, NEED_KEYWORDS, Stage

    positional = {"self", "features", "layouts", "lengths", "texts"}
    parameters = inspect.signature(type(method)._select_batch).parameters.values()
    known = {p.name for p in parameters if p.name not in positional and p.kind is not p.VAR_KEYWORD}
    for need in method.needs:
        known.update(NEED_KEYWORDS.get(need.value, ()))
    if getattr(method, "stage", None) is Stage.LLM:
        known.update(LLM_KEYWORDS)
    unknown = sorted(set(given) - known)
    if unknown:
        raise TypeError(
            f"mrprune.{owner}: unexpected keyword argument(s) {unknown}; {type(method).__name__} reads "
            f"{sorted(known) or 'none'}"
        )
