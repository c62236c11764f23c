"""Shared pieces of the property / fuzz suites (tests/test_fuzz_*.py): the hypothesis profile, input strategies and
the rule every rejection must follow.

The ``mrprune-ci`` profile (the default) is derandomized, so CI runs the same examples every time and a failure
reproduces locally; ``HYPOTHESIS_PROFILE=mrprune-explore`` draws 10x more, random examples for a local hunt.
"""

from __future__ import annotations

import math
import os
import re

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

settings.register_profile(
    "mrprune-ci",
    max_examples=25,
    derandomize=True,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "mrprune-explore",
    max_examples=250,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "mrprune-ci"))

#: Values no float argument (threshold, temperature, tolerances, alpha, beta) may take.
NON_FINITE = [math.nan, math.inf, -math.inf]
#: Values that are not a flag (``None`` and ints used to mean False / True silently).
NOT_BOOL = [None, 0, 1, "yes", 1.0]
#: Values that are not an int (the dispatcher coerces a bool to 0/1 and ``None`` to the default).
NOT_INT = [True, False, 2.0, 2.5, None, "3", math.nan]


def assert_names_cause(error: BaseException, owner: str, argument: str) -> None:
    """A rejection is a ``ValueError`` / ``TypeError`` whose message names the owner (``mrprune.<op>`` or the
    method) and the argument; anything else (IndexError, AttributeError, RuntimeError from a kernel) is a defect.
    The one exception: torch's schema parser rejecting a non-tensor for a ``Tensor`` argument (a RuntimeError naming
    ``mrprune::<op>`` and the argument) before any mrprune code runs."""
    message = str(error)
    if isinstance(error, RuntimeError) and re.match(r"mrprune::\w+\(\) Expected a value of type", message):
        assert f"for argument '{argument}'" in message, message[:300]
        return
    assert isinstance(error, ValueError | TypeError), f"{type(error).__name__}: {error}"
    assert owner in message, f"message does not name {owner!r}: {message}"
    assert re.search(argument, message), f"message does not name {argument!r}: {message}"


def raises_naming(call, owner: str, argument: str) -> None:
    """``call()`` must raise a ValueError/TypeError naming ``owner`` and ``argument`` (a regex)."""
    with pytest.raises(Exception) as info:
        call()
    assert_names_cause(info.value, owner, argument)


@st.composite
def ragged_lengths(draw, tokens: int = 6, minimum: int = 0, max_batch: int = 3):
    """``B`` item sizes in ``[minimum, tokens]``, the largest equal to ``tokens``."""
    sizes = draw(st.lists(st.integers(minimum, tokens), min_size=1, max_size=max_batch))
    sizes = sizes or [tokens]
    sizes[draw(st.integers(0, len(sizes) - 1))] = tokens
    return sizes


def features_from_seed(seed: int, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Gaussian features plus a shared offset (so cosine graphs have edges), reproducible from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) + 0.4).to(dtype)


def padded_items(items: list[torch.Tensor], garbage: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``[n_i, ...]`` tensors with ``garbage`` in the padding (which every op must ignore)."""
    n_max = max(t.shape[0] for t in items)
    out = torch.full((len(items), n_max, *items[0].shape[1:]), garbage, dtype=items[0].dtype)
    for b, t in enumerate(items):
        out[b, : t.shape[0]] = t
    return out, torch.tensor([t.shape[0] for t in items], dtype=torch.int64)
